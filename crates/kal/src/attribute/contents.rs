//! Step 4b: what lost blocks are when no allocation stack says where they come from (a
//! check without the agent). Blocks are grouped by their C++ dynamic type — the first word
//! is a vtable pointer into a loaded module, past the start of a `vtable for T` symbol
//! (`_ZTV…`, demangled) — else by their size and by what their first words point into
//! (module and symbol, from the modules' ELF symbol tables). Each group shows a short
//! sample of one block's contents: its text when it starts with one, else its first bytes
//! in hex.

use crate::act::report::{Record, Totals};
use crate::attribute::symbolize::demangle;
use crate::capture::procfs::Mapping;
use crate::capture::Capture;
use crate::reach::Kind;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Leading words of each block whose targets are looked up.
const WORDS: usize = 16;
/// Bytes of a block shown as a sample.
const SAMPLE_BYTES: usize = 48;
/// Targets named per group, at most.
const MAX_TARGETS: usize = 4;
/// glibc's `vtable for T` starts with the offset to top and the type info: an object's
/// vtable pointer points at least this far into it.
const VTABLE_HEADER: u64 = 16;

/// What the blocks of one record are, for a report without allocation stacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Contents {
    /// The C++ dynamic type (demangled), when the blocks' first word is a vtable pointer.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_name: Option<String>,
    /// The size of each block (usable size), when the blocks are grouped by size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
    /// What the blocks' first words point into: `symbol (module)`, or the module alone
    /// when no symbol covers the address.
    pub points_into: Vec<String>,
    /// The first bytes of one block: `"text"` when it starts with printable text, else
    /// hex bytes.
    pub sample: String,
    /// Where the blocks come from, when that is why they have no stack ("allocated
    /// before kal attached").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<&'static str>,
}

/// How blocks are grouped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Type(String),
    Shape(u64, Vec<String>),
}

/// A symbol found for an address in a module.
struct Target {
    /// The symbol's raw name.
    raw: String,
    /// How far into the symbol the address is.
    offset: u64,
    /// The module's file name.
    module: String,
}

/// The mappings of loaded modules (ELF files), sorted by address, for lookups.
fn file_maps(maps: &[Mapping]) -> Vec<&Mapping> {
    let mut elf: HashMap<&str, bool> = HashMap::new();
    let mut v: Vec<&Mapping> = maps
        .iter()
        .filter(|m| {
            m.is_file()
                && *elf.entry(m.path.as_str()).or_insert_with(|| {
                    !crate::agent::elf::load_segments(m.path.as_ref()).is_empty()
                })
        })
        .collect();
    v.sort_by_key(|m| m.start);
    v
}

fn module_of<'a>(files: &[&'a Mapping], a: u64) -> Option<&'a Mapping> {
    let i = files.partition_point(|m| m.start <= a);
    let m = *files.get(i.checked_sub(1)?)?;
    m.contains(a).then_some(m)
}

/// Symbols for addresses into modules, from the modules' ELF symbol tables (data symbols
/// such as vtables included; no debug info needed).
fn symbols_of(files: &[&Mapping], addrs: &BTreeSet<u64>) -> HashMap<u64, Target> {
    // Each module's load bias, from its lowest mapping: addresses become the module's
    // own virtual addresses (file offsets would miss `.bss`, which has none).
    let mut bias: HashMap<&str, u64> = HashMap::new();
    for m in files {
        bias.entry(m.path.as_str()).or_insert_with(|| {
            let segs = crate::agent::elf::load_segments(m.path.as_ref());
            m.start
                .wrapping_sub(crate::agent::elf::vaddr_of(&segs, m.offset))
        });
    }
    let mut by_module: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for &a in addrs {
        if let Some(m) = module_of(files, a) {
            let b = bias.get(m.path.as_str()).copied().unwrap_or(0);
            by_module
                .entry(m.path.as_str())
                .or_default()
                .push((a, a.wrapping_sub(b)));
        }
    }
    let symbolizer = Symbolizer::builder()
        .enable_code_info(false)
        .enable_inlined_fns(false)
        .enable_demangling(false)
        .build();
    let mut out = HashMap::new();
    for (path, list) in by_module {
        let module = crate::attribute::site::base_name(path).to_string();
        let mut elf = Elf::new(path);
        elf.debug_syms = false;
        let vaddrs: Vec<u64> = list.iter().map(|x| x.1).collect();
        let syms = symbolizer.symbolize(&Source::Elf(elf), Input::VirtOffset(&vaddrs));
        for (i, &(a, _)) in list.iter().enumerate() {
            let (raw, offset) = match syms.as_ref().ok().and_then(|s| s.get(i)) {
                Some(Symbolized::Sym(s)) => (s.name.to_string(), s.offset as u64),
                _ => (String::new(), 0),
            };
            out.insert(
                a,
                Target {
                    raw,
                    offset,
                    module: module.clone(),
                },
            );
        }
    }
    out
}

/// A readable name for a target: `symbol (module)`, or the module.
fn target_name(t: &Target) -> String {
    if t.raw.is_empty() {
        t.module.clone()
    } else {
        format!("{} ({})", demangle(&t.raw), t.module)
    }
}

/// The C++ class whose vtable `t` is in, if it is one.
fn class_of(t: &Target) -> Option<String> {
    if !t.raw.starts_with("_ZTV") || t.offset < VTABLE_HEADER {
        return None;
    }
    // `vtable for T` (c++filt's words) or `{vtable(T)}` (cpp_demangle's).
    let d = demangle(&t.raw);
    d.strip_prefix("vtable for ")
        .or_else(|| d.strip_prefix("{vtable(")?.strip_suffix(")}"))
        .map(str::to_string)
}

/// The sample of a block's first bytes: `"text"` when it starts with at least 4
/// printable characters (up to a NUL), else hex.
pub fn sample(bytes: &[u8]) -> String {
    let text_len = bytes
        .iter()
        .take_while(|&&c| c == b'\t' || c == b'\n' || (0x20..0x7f).contains(&c))
        .count();
    let ends = text_len == bytes.len() || bytes[text_len] == 0;
    if text_len >= 4 && ends {
        let t: String = bytes[..text_len].iter().map(|&c| c as char).collect();
        let more = if text_len == bytes.len() { "…" } else { "" };
        format!("\"{}\"{more}", t.escape_debug())
    } else {
        let hex: Vec<String> = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
        let more = if bytes.len() > 32 { " …" } else { "" };
        format!("{}{more}", hex.join(" "))
    }
}

fn read_bytes(c: &Capture, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    c.heap.read(addr, &mut buf).ok().map(|_| buf)
}

/// Records for the blocks of the classes `include` admits, grouped by what they are (see
/// the module doc), largest first within each class. Reads the blocks' first bytes: the
/// capture's heap must still be readable.
pub fn describe(c: &Capture, kinds: &[Kind], include: impl Fn(Kind) -> bool) -> Vec<Record> {
    describe_where(c, kinds, |_, k| include(k))
}

/// [`describe`] for the blocks `include` admits (by block and class).
pub fn describe_where(
    c: &Capture,
    kinds: &[Kind],
    include: impl Fn(&crate::blocks::Block, Kind) -> bool,
) -> Vec<Record> {
    let files = file_maps(&c.maps);
    // First words of each chosen block (16 at most), and every address into a module.
    let mut chosen: Vec<(usize, u64, Vec<u64>)> = Vec::new();
    let mut addrs = BTreeSet::new();
    for (i, (b, &k)) in c.blocks.iter().zip(kinds).enumerate() {
        if !include(b, k) {
            continue;
        }
        let n = (b.size as usize / 8).min(WORDS);
        let words: Vec<u64> = read_bytes(c, b.addr, n * 8)
            .map(|v| {
                v.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                    .collect()
            })
            .unwrap_or_default();
        let into: Vec<u64> = words
            .iter()
            .copied()
            .filter(|&w| module_of(&files, w).is_some())
            .collect();
        addrs.extend(into.iter().copied());
        chosen.push((i, words.first().copied().unwrap_or(0), into));
    }
    let targets = symbols_of(&files, &addrs);
    // (kind, key) -> (totals, first block)
    let mut groups: BTreeMap<(Kind, Key), (Totals, usize)> = BTreeMap::new();
    for (i, first, into) in chosen {
        let b = &c.blocks[i];
        let key = match targets.get(&first).and_then(class_of) {
            Some(t) => Key::Type(t),
            None => {
                let mut names: Vec<String> = into
                    .iter()
                    .filter_map(|a| targets.get(a))
                    .map(target_name)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if names.len() > MAX_TARGETS {
                    names.truncate(MAX_TARGETS);
                    names.push("…".to_string());
                }
                Key::Shape(b.size, names)
            }
        };
        let g = groups
            .entry((kinds[i], key))
            .or_insert((Totals::default(), i));
        g.0.bytes += b.size;
        g.0.blocks += 1;
    }
    let mut out: Vec<Record> = groups
        .into_iter()
        .map(|((kind, key), (t, first))| {
            let b = &c.blocks[first];
            let n = (b.size as usize).min(SAMPLE_BYTES);
            let sample = read_bytes(c, b.addr, n)
                .map(|v| sample(&v))
                .unwrap_or_else(|| "(unreadable)".to_string());
            let contents = match key {
                Key::Type(name) => Contents {
                    type_name: Some(name),
                    block_size: None,
                    points_into: Vec::new(),
                    sample,
                    origin: None,
                },
                Key::Shape(size, points_into) => Contents {
                    type_name: None,
                    block_size: Some(size),
                    points_into,
                    sample,
                    origin: None,
                },
            };
            Record {
                kind,
                bytes: t.bytes,
                blocks: t.blocks,
                api: kal_proto::Api::Malloc.name(),
                stack: Vec::new(),
                site: kal_proto::STACK_UNKNOWN,
                contents: Some(contents),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(b.bytes.cmp(&a.bytes))
            .then(b.blocks.cmp(&a.blocks))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn samples_show_text_else_hex() {
        assert_eq!(sample(b"hello world\0\x01\x02"), "\"hello world\"");
        assert_eq!(sample(b"tab\there"), "\"tab\\there\"…");
        assert_eq!(sample(b"ab\0cd"), "61 62 00 63 64");
        assert_eq!(
            sample(&[0x5a; 40]),
            "\"ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ\"…"
        );
        let bin = [0u8, 1, 2, 0xff];
        assert_eq!(sample(&bin), "00 01 02 ff");
    }
}
