//! The report as a pprof profile (`--pprof FILE`): a gzip'd `profile.proto`, as
//! `go tool pprof`, Pyroscope and Parca read it.
//!
//! One sample per record (a class and an allocation stack), with four values:
//! `lost_objects/count` and `lost_space/bytes` (definitely and indirectly lost blocks) and
//! `inuse_objects/count` and `inuse_space/bytes` (every live block, lost ones included);
//! the default is `lost_space`. Each sample is labelled `kind` (direct, indirect, possible,
//! reachable) and `api` (malloc, calloc, …). Locations carry their functions, files and
//! lines (inlined calls as several lines), and mappings the modules' paths and GNU build
//! ids (read from the files on this host).
//!
//! The messages are written by hand for prost (no protoc at build time), after
//! <https://github.com/google/pprof/blob/main/proto/profile.proto>.

use crate::act::report::{Record, Report};
use crate::act::sink::{Context, Sink};
use crate::reach::Kind;
use anyhow::{Context as _, Result};
use prost::Message;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;

/// Writes the report as a gzip'd pprof profile to `path`.
pub struct Pprof {
    /// Where.
    pub path: PathBuf,
}

impl Sink for Pprof {
    fn write(&mut self, report: &Report, _: &Context<'_>) -> Result<()> {
        let bytes = encode(report, std::time::SystemTime::now());
        let write = || -> Result<()> {
            let f = std::fs::File::create(&self.path)?;
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            gz.write_all(&bytes)?;
            gz.finish()?.sync_all()?;
            Ok(())
        };
        write().with_context(|| format!("cannot write pprof profile to {}", self.path.display()))
    }
}

/// The profile of `report`, taken at `now`, encoded (not compressed).
pub fn encode(report: &Report, now: std::time::SystemTime) -> Vec<u8> {
    let mut b = Builder::default();
    b.string("");
    let sample_type = ["lost_objects", "lost_space", "inuse_objects", "inuse_space"]
        .iter()
        .zip(["count", "bytes", "count", "bytes"])
        .map(|(t, u)| ValueType {
            r#type: b.string(t),
            unit: b.string(u),
        })
        .collect();
    for (i, m) in report.modules.iter().enumerate() {
        let build_id = crate::capture::corefile::build_id_of(&m.path)
            .map(|id| id.iter().map(|x| format!("{x:02x}")).collect::<String>())
            .unwrap_or_default();
        let mapping = Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.offset,
            filename: b.string(&m.path),
            build_id: b.string(&build_id),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        };
        b.mapping_of.insert(m.path.clone(), mapping.id);
        b.profile.mapping.push(mapping);
    }
    let kind_key = b.string("kind");
    let api_key = b.string("api");
    for r in report.leaks.iter().chain(&report.unlisted_reachable) {
        let location_id = b.locations(r);
        let lost = matches!(r.kind, Kind::Direct | Kind::Indirect);
        let (objects, bytes) = (r.blocks as i64, r.bytes as i64);
        let value = if lost {
            vec![objects, bytes, objects, bytes]
        } else {
            vec![0, 0, objects, bytes]
        };
        let label = vec![
            Label {
                key: kind_key,
                str: b.string(kind_name(r.kind)),
                ..Default::default()
            },
            Label {
                key: api_key,
                str: b.string(r.api),
                ..Default::default()
            },
        ];
        b.profile.sample.push(Sample {
            location_id,
            value,
            label,
        });
    }
    let comment = b.string(&format!(
        "kal leak report for {} (pid {})",
        report.program, report.pid
    ));
    b.profile.sample_type = sample_type;
    b.profile.comment = vec![comment];
    b.profile.default_sample_type = b.string("lost_space");
    b.profile.time_nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    b.profile.string_table = b.strings;
    b.profile.encode_to_vec()
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Direct => "direct",
        Kind::Indirect => "indirect",
        Kind::Possible => "possible",
        Kind::Reachable => "reachable",
    }
}

/// The profile being built, with its tables' indexes.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: Vec<String>,
    string_of: HashMap<String, i64>,
    mapping_of: HashMap<String, u64>,
    function_of: HashMap<(String, String), u64>,
    location_of: HashMap<u64, u64>,
}

impl Builder {
    /// Index of `s` in the string table.
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_of.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_of.insert(s.to_string(), i);
        i
    }

    /// Location ids of a record's stack, innermost first: one location per return
    /// address, its frames (an address's inlined calls, innermost first) as its lines.
    fn locations(&mut self, r: &Record) -> Vec<u64> {
        let mut ids = Vec::new();
        let stack = r.stack_or_what();
        let mut frames = stack.iter().peekable();
        while let Some(first) = frames.next() {
            let mut same = vec![first];
            while let Some(f) = frames.next_if(|f| f.address == first.address) {
                same.push(f);
            }
            // Pseudo-frames (no stack) have no address: one location per name.
            let key = if first.address == 0 {
                u64::MAX - self.string(&first.function) as u64
            } else {
                first.address
            };
            if let Some(&id) = self.location_of.get(&key) {
                ids.push(id);
                continue;
            }
            let line = same
                .iter()
                .map(|f| {
                    let name = if f.function.is_empty() || f.function == "??" {
                        crate::attribute::site::describe(f)
                    } else {
                        f.function.clone()
                    };
                    Line {
                        function_id: self.function(&name, &f.file),
                        line: i64::from(f.line),
                    }
                })
                .collect();
            let id = self.profile.location.len() as u64 + 1;
            self.profile.location.push(Location {
                id,
                mapping_id: self.mapping_of.get(&first.module).copied().unwrap_or(0),
                address: first.address,
                line,
                is_folded: false,
            });
            self.location_of.insert(key, id);
            ids.push(id);
        }
        ids
    }

    /// Id of the function `name` in `file`.
    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.function_of.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let (n, f) = (self.string(name), self.string(file));
        self.profile.function.push(Function {
            id,
            name: n,
            system_name: n,
            filename: f,
            start_line: 0,
        });
        self.function_of.insert(key, id);
        id
    }
}

/// `perftools.profiles.Profile` (the fields kal writes).
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    /// What each sample value is.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Where modules were mapped.
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    /// Code locations.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string, referred to by index; the first is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// When the profile was taken, in nanoseconds since the epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// Free-form notes (string indexes).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// The sample type shown by default (string index).
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `ValueType`: a sample value's type and unit (string indexes).
#[derive(Clone, Copy, PartialEq, Message)]
pub struct ValueType {
    /// Type, e.g. `lost_space`.
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// Unit, e.g. `bytes`.
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `Sample`: values for one stack.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Location ids, innermost first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `Label`: a key with a string or a number.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Label {
    /// Key (string index).
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String value (string index).
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// Numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
    /// Unit of the numeric value (string index).
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `Mapping`: where a module was mapped.
#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    /// Id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// First address.
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    /// One past the last address.
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    /// Offset in the file.
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// Path (string index).
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// GNU build id in hex (string index).
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    /// Locations here have function names.
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    /// … file names.
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    /// … line numbers.
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    /// … inlined calls expanded.
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `Location`: one return address and the calls it stands for.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    /// Id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its mapping's id, 0 when unknown.
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    /// The address.
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Its calls, innermost (inlined) first, the caller last.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    /// Whether folded (never).
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// `Line`: a function and a line in it.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Line {
    /// Function id.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// Source line, 0 when unknown.
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `Function`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Function {
    /// Id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Name (string index).
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// Name as the linker knows it (string index; the same here).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// Source file (string index).
    #[prost(int64, tag = "4")]
    pub filename: i64,
    /// First line (0: unknown).
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::report::{Module, Record};
    use crate::attribute::symbolize::Frame;

    fn frame(function: &str, line: u32, address: u64) -> Frame {
        Frame {
            function: function.into(),
            file: "/src/a.c".into(),
            line,
            module: "/nonexistent/prog".into(),
            address,
            offset: address - 0x1000,
        }
    }

    fn record(kind: Kind, bytes: u64, blocks: u64, stack: Vec<Frame>) -> Record {
        Record {
            kind,
            bytes,
            blocks,
            api: "malloc",
            stack,
            site: 0,
            contents: None,
        }
    }

    #[test]
    fn inlined_calls_share_a_location_and_values_follow_the_class() {
        let mut r = Report {
            pid: 1,
            program: "/nonexistent/prog".into(),
            summary: Default::default(),
            leaks: Vec::new(),
            suppressed: Default::default(),
            untracked_allocations: 0,
            tracking_complete: true,
            lost_reliable: true,
            gaps: Default::default(),
            memory: Default::default(),
            reclaimed: Default::default(),
            pause_ms: None,
            scan_ms: None,
            note: None,
            freeres_skipped_threads: None,
            unlisted_reachable: Vec::new(),
            modules: Vec::new(),
        };
        // `helper` inlined into `leak` at one return address; `main` calls it.
        let stack = vec![
            frame("helper", 3, 0x1100),
            frame("leak", 9, 0x1100),
            frame("main", 20, 0x1200),
        ];
        r.leaks = vec![record(Kind::Direct, 300, 3, stack.clone())];
        r.unlisted_reachable = vec![record(Kind::Reachable, 64, 1, stack[2..].to_vec())];
        r.modules = vec![Module {
            path: "/nonexistent/prog".into(),
            start: 0x1000,
            end: 0x2000,
            offset: 0,
        }];
        let p = Profile::decode(encode(&r, std::time::UNIX_EPOCH).as_slice()).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<_> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("lost_objects", "count"),
                ("lost_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes")
            ]
        );
        assert_eq!(s(p.default_sample_type), "lost_space");
        assert_eq!(p.sample[0].value, [3, 300, 3, 300]);
        assert_eq!(p.sample[1].value, [0, 0, 1, 64]);
        // Two locations: 0x1100 with two lines (inlined first), 0x1200; shared by both
        // samples.
        assert_eq!(p.location.len(), 2);
        assert_eq!(p.sample[0].location_id, [1, 2]);
        assert_eq!(p.sample[1].location_id, [2]);
        let names: Vec<_> = p.location[0]
            .line
            .iter()
            .map(|l| s(p.function[l.function_id as usize - 1].name))
            .collect();
        assert_eq!(names, ["helper", "leak"]);
        assert_eq!(p.location[0].mapping_id, 1);
        assert_eq!(s(p.mapping[0].filename), "/nonexistent/prog");
        // No file, no build id: the empty string.
        assert_eq!(s(p.mapping[0].build_id), "");
    }
}
