//! One way to write a report: every output is a [`Sink`], and [`Outputs`] — parsed once
//! from the command line — says which sinks `kal check`, `kal run` and `kal reclaim` write.

use crate::act::report::Report;
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};

/// One periodic check's totals, for outputs that show growth over checks.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Point {
    /// Seconds since the process's first check.
    pub secs: f64,
    /// Resident set size, bytes.
    pub rss: u64,
    /// Bytes in live heap blocks (lost ones included).
    pub live: u64,
    /// Bytes definitely and indirectly lost.
    pub lost: u64,
}

/// What a sink may use beside the report itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Context<'a> {
    /// The process's periodic checks so far, oldest first (empty without them).
    pub history: &'a [Point],
}

/// One output of a report.
pub trait Sink {
    /// Writes `report` (with what `cx` adds) to this output.
    fn write(&mut self, report: &Report, cx: &Context<'_>) -> Result<()>;
}

/// Which outputs a command writes, parsed once from its options.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// The text report on stderr (not when quiet).
    pub text: bool,
    /// Frames shown per record (text and HTML).
    pub frames: usize,
    /// The JSON report's file.
    pub json: Option<PathBuf>,
    /// The JSON file is a JSON Lines file (`kal run --check-every`): the report is appended
    /// to it as an exit line instead of replacing it.
    pub json_lines: bool,
    /// The pprof profile's file.
    pub pprof: Option<PathBuf>,
    /// The flame graph's file (SVG).
    pub flamegraph: Option<PathBuf>,
    /// The HTML report's file.
    pub html: Option<PathBuf>,
}

impl Outputs {
    /// Fails early, naming the file, when an output file cannot be written (each is
    /// created, empty, now).
    pub fn check_files(&self) -> Result<()> {
        for (what, path) in self.files() {
            std::fs::File::create(path)
                .map_err(|e| anyhow!("cannot write {what} to {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// The outputs of another process than the one the files were named for (a forked
    /// child under `kal run`): each file gets `.PID` appended; a JSON Lines file is
    /// shared.
    pub fn for_process(&self, pid: i32) -> Outputs {
        let own = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| PathBuf::from(format!("{}.{pid}", p.display())))
        };
        Outputs {
            json: if self.json_lines {
                self.json.clone()
            } else {
                own(&self.json)
            },
            pprof: own(&self.pprof),
            flamegraph: own(&self.flamegraph),
            html: own(&self.html),
            ..self.clone()
        }
    }

    /// Whether any output is asked for.
    pub fn any(&self) -> bool {
        self.text || !self.files().is_empty()
    }

    /// The output files, with what each holds.
    fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut v = Vec::new();
        if let Some(p) = &self.json {
            v.push(("JSON report", p.as_path()));
        }
        if let Some(p) = &self.pprof {
            v.push(("pprof profile", p.as_path()));
        }
        if let Some(p) = &self.flamegraph {
            v.push(("flame graph", p.as_path()));
        }
        if let Some(p) = &self.html {
            v.push(("HTML report", p.as_path()));
        }
        v
    }

    /// The sinks, in the order they write: the text first.
    pub fn sinks(&self) -> Vec<Box<dyn Sink>> {
        let mut v: Vec<Box<dyn Sink>> = Vec::new();
        let frames = self.frames;
        if self.text {
            v.push(Box::new(crate::act::text::Text { frames }));
        }
        if let Some(path) = &self.json {
            let path = path.clone();
            v.push(if self.json_lines {
                Box::new(crate::act::json::ExitLine { path })
            } else {
                Box::new(crate::act::json::Json { path })
            });
        }
        if let Some(path) = &self.pprof {
            v.push(Box::new(crate::act::pprof::Pprof { path: path.clone() }));
        }
        if let Some(path) = &self.flamegraph {
            let path = path.clone();
            v.push(Box::new(crate::act::flamegraph::Flamegraph { path }));
        }
        if let Some(path) = &self.html {
            let path = path.clone();
            v.push(Box::new(crate::act::html::Html { path, frames }));
        }
        v
    }

    /// Writes `report` to every sink; one failing does not keep the others from writing.
    /// The error names every output that failed.
    pub fn write(&self, report: &Report, cx: &Context<'_>) -> Result<()> {
        let failed: Vec<String> = self
            .sinks()
            .iter_mut()
            .filter_map(|s| s.write(report, cx).err())
            .map(|e| format!("{e:#}"))
            .collect();
        match failed.len() {
            0 => Ok(()),
            _ => Err(anyhow!("{}", failed.join("; "))),
        }
    }
}
