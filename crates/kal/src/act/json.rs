//! The JSON report: one pretty document a file, or one line appended to a JSON Lines
//! file (`kal run --check-every`). README documents the shape.

use crate::act::report::Report;
use crate::act::sink::{Context, Sink};
use anyhow::{Context as _, Result};
use serde::Serialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes the report as one pretty JSON document to `path`.
pub struct Json {
    /// Where.
    pub path: PathBuf,
}

impl Sink for Json {
    fn write(&mut self, report: &Report, _: &Context<'_>) -> Result<()> {
        write_json(report, &self.path)
    }
}

/// Appends the report to the JSON Lines file `path` as an exit line (`"at_exit": true`).
pub struct ExitLine {
    /// Where.
    pub path: PathBuf,
}

impl Sink for ExitLine {
    fn write(&mut self, report: &Report, _: &Context<'_>) -> Result<()> {
        append_exit_line(&self.path, report)
            .with_context(|| format!("cannot write JSON report to {}", self.path.display()))
    }
}

/// Writes the JSON report.
fn write_json(r: &Report, path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)
        .with_context(|| format!("cannot write JSON report to {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let wrote = serde_json::to_writer_pretty(&mut w, r)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::io::Write::write_all(&mut w, b"\n").map_err(Into::into))
        .and_then(|()| std::io::Write::flush(&mut w).map_err(Into::into));
    wrote.with_context(|| format!("cannot write JSON report to {}", path.display()))
}

/// Appends a process's exit report to the JSON lines file, marked `"at_exit": true`.
fn append_exit_line(path: &Path, r: &Report) -> Result<()> {
    #[derive(Serialize)]
    struct Exit<'a> {
        at_exit: bool,
        time: String,
        #[serde(flatten)]
        report: &'a Report,
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    serde_json::to_writer(
        &mut f,
        &Exit {
            at_exit: true,
            time: crate::run::periodic::timestamp(std::time::SystemTime::now()),
            report: r,
        },
    )?;
    f.write_all(b"\n")?;
    Ok(())
}
