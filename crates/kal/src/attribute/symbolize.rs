//! Step 4a: return addresses to function, file and line, with blazesym (DWARF, debug links
//! under `/usr/lib/debug`, C++ and Rust demangling, inlined calls expanded).

use crate::capture::procfs::Mapping;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use std::collections::HashMap;

/// One symbolized frame.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    /// Demangled function name, `??` when unknown.
    pub function: String,
    /// Source file (full path when known), empty when unknown.
    pub file: String,
    /// Source line, 0 when unknown.
    pub line: u32,
    /// Path of the module (executable or shared library).
    pub module: String,
    /// Return address in the target.
    pub address: u64,
    /// The return address inside its module, as the module's own virtual address (what
    /// `nm` and `objdump` show); 0 when there is no module.
    #[serde(default)]
    pub offset: u64,
}

/// Symbolizes addresses of one captured process.
pub struct Symbols {
    inner: Symbolizer,
    /// Module paths never opened: not the file the addresses were captured with (a core
    /// file's module missing on this host, or another build of it).
    unusable: Vec<String>,
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbols {
    /// A symbolizer that reads debug info and demangles mangled names.
    pub fn new() -> Symbols {
        Symbols {
            inner: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                // Demangled here, and only what is mangled (see `demangle`).
                .enable_demangling(false)
                .build(),
            unusable: Vec::new(),
        }
    }

    /// This symbolizer, never opening the modules at `paths`: their frames show the
    /// module and the file offset of the return address (`lib.so+0x1234`).
    pub fn without(mut self, paths: Vec<String>) -> Symbols {
        self.unusable = paths;
        self
    }

    /// Symbolizes return addresses `addrs` against the mappings they were captured with.
    /// Each address gives one frame, or several when calls were inlined (innermost first).
    pub fn resolve(&self, maps: &[Mapping], addrs: &[u64]) -> HashMap<u64, Vec<Frame>> {
        // Per module: (return address, file offset of the call, module address of the
        // return address).
        let mut by_module: HashMap<&str, Vec<(u64, u64, u64)>> = HashMap::new();
        let mut segments: HashMap<&str, Vec<crate::agent::elf::Segment>> = HashMap::new();
        let mut out = HashMap::new();
        for &a in addrs {
            // Return addresses point after the call: look up the call instruction itself.
            let pc = a.saturating_sub(1);
            match maps.iter().find(|m| m.contains(pc) && m.is_file()) {
                Some(m) if self.unusable.contains(&m.path) => {
                    let mut f = unknown(a, &m.path);
                    f.offset = a - m.start + m.offset;
                    out.insert(a, vec![f]);
                }
                Some(m) => {
                    let segs = segments
                        .entry(&m.path)
                        .or_insert_with(|| crate::agent::elf::load_segments(m.path.as_ref()));
                    let off = crate::agent::elf::vaddr_of(segs, a - m.start + m.offset);
                    by_module
                        .entry(&m.path)
                        .or_default()
                        .push((a, pc - m.start + m.offset, off))
                }
                None => {
                    out.insert(a, vec![unknown(a, "")]);
                }
            }
        }
        for (path, list) in by_module {
            let offsets: Vec<u64> = list.iter().map(|x| x.1).collect();
            let src = Source::Elf(Elf::new(path));
            let syms = self.inner.symbolize(&src, Input::FileOffset(&offsets));
            for (i, &(a, _, off)) in list.iter().enumerate() {
                let mut frames = match syms.as_ref().ok().and_then(|s| s.get(i)) {
                    Some(Symbolized::Sym(sym)) => expand(sym, a, path),
                    _ => vec![unknown(a, path)],
                };
                for f in &mut frames {
                    f.offset = off;
                }
                out.insert(a, frames);
            }
        }
        out
    }
}

/// The readable form of a symbol name: C++ (`_Z…`) and Rust (`_R…`, and the legacy
/// `_ZN…17h<hash>E`) names are demangled; anything else is a name as written (a C
/// function `f` must not become `float`).
pub fn demangle(name: &str) -> String {
    if name.starts_with("_R") || name.starts_with("_ZN") {
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            return format!("{d:#}");
        }
    }
    if name.starts_with("_Z") {
        if let Some(d) = cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|s| s.demangle().ok())
        {
            return d;
        }
    }
    name.to_string()
}

fn unknown(address: u64, module: &str) -> Frame {
    Frame {
        function: "??".into(),
        file: String::new(),
        line: 0,
        module: module.into(),
        address,
        offset: 0,
    }
}

fn location(ci: Option<&blazesym::symbolize::CodeInfo<'_>>) -> (String, u32) {
    match ci {
        Some(ci) => (
            ci.to_path().to_string_lossy().into_owned(),
            ci.line.unwrap_or(0),
        ),
        None => (String::new(), 0),
    }
}

/// One frame per function at this address: the inlined ones innermost first, then the
/// function that contains them all. (blazesym gives each inlined function the location
/// inside it, and the containing symbol the location of the outermost inlined call.)
fn expand(sym: &blazesym::symbolize::Sym<'_>, address: u64, module: &str) -> Vec<Frame> {
    let frame = |function: &str, (file, line): (String, u32)| Frame {
        function: demangle(function),
        file,
        line,
        module: module.into(),
        address,
        offset: 0,
    };
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|f| frame(&f.name, location(f.code_info.as_ref())))
        .collect();
    frames.push(frame(&sym.name, location(sym.code_info.as_deref())));
    frames
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn only_mangled_names_are_demangled() {
        for plain in [
            "f",
            "i",
            "d",
            "main",
            "_start",
            "Z",
            "_Zebra_not_mangled_but_tries",
        ] {
            let out = demangle(plain);
            assert!(out == plain || plain.starts_with("_Z"), "{plain} -> {out}");
        }
        assert_eq!(demangle("f"), "f");
        assert_eq!(demangle("i"), "i");
        assert_eq!(demangle("_Z4makei"), "make(int)");
        assert_eq!(
            demangle("_ZN9kal_agent5hooks6malloc17h0123456789abcdefE"),
            "kal_agent::hooks::malloc"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
    }
}
