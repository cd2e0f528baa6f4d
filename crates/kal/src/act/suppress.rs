//! Suppressions: patterns on function, file or module that silence leak records.
//!
//! One pattern a line; `#` starts a comment; an optional `leak:` prefix (as in LSan files)
//! is accepted. `*` matches any run of characters, `?` one character. A record is
//! suppressed when any frame's function, source file or module — or the file's or module's
//! base name — matches any pattern.
//!
//! As in LeakSanitizer, suppressed blocks are roots: [`suppressed_blocks`] names them and
//! [`crate::classify_with`] classifies again with them as roots, so blocks a suppressed leak
//! owns are not reported as indirect leaks.

use crate::attribute::symbolize::{Frame, Symbols};
use crate::capture::Capture;
use crate::reach::Kind;
use anyhow::{Context, Result};
use std::path::Path;

/// A parsed suppressions file.
#[derive(Debug, Default, Clone)]
pub struct Suppressions {
    patterns: Vec<String>,
}

impl Suppressions {
    /// Parses suppressions text.
    pub fn parse(text: &str) -> Suppressions {
        let patterns = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_prefix("leak:").unwrap_or(l).trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        Suppressions { patterns }
    }

    /// Reads a suppressions file.
    pub fn load(path: &Path) -> Result<Suppressions> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read suppressions file {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    /// Number of patterns.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a stack is suppressed.
    pub fn matches(&self, stack: &[Frame]) -> bool {
        let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
        self.patterns.iter().any(|p| {
            stack.iter().any(|f| {
                [
                    &f.function,
                    &f.file,
                    &f.module,
                    &base(&f.file),
                    &base(&f.module),
                ]
                .iter()
                .any(|s| !s.is_empty() && glob(p.as_bytes(), s.as_bytes()))
            })
        })
    }
}

/// Indices (into `c.blocks`) of the lost blocks (direct, indirect or possible) whose
/// allocation stack `supp` suppresses.
pub fn suppressed_blocks(
    c: &Capture,
    kinds: &[Kind],
    supp: &Suppressions,
    symbols: &Symbols,
) -> Vec<usize> {
    let lost = |i: usize| kinds[i] != Kind::Reachable;
    let mut ids: Vec<u32> = (0..c.blocks.len())
        .filter(|&i| lost(i))
        .map(|i| c.blocks[i].stack)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut addrs: Vec<u64> = ids
        .iter()
        .filter_map(|id| c.stacks.get(id))
        .flatten()
        .copied()
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    let resolved = symbols.resolve(&c.maps, &addrs);
    let matched: std::collections::HashSet<u32> = ids
        .into_iter()
        .filter(|id| {
            let frames: Vec<Frame> = c
                .stacks
                .get(id)
                .map(|s| {
                    s.iter()
                        .flat_map(|a| resolved.get(a).cloned().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default();
            supp.matches(&frames)
        })
        .collect();
    (0..c.blocks.len())
        .filter(|&i| lost(i) && matched.contains(&c.blocks[i].stack))
        .collect()
}

/// Glob match of the whole text with `*` and `?`.
pub fn glob(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str, module: &str) -> Frame {
        Frame {
            function: function.into(),
            file: file.into(),
            line: 1,
            module: module.into(),
            address: 0,
            offset: 0,
        }
    }

    #[test]
    fn glob_handles_stars_and_anchoring() {
        assert!(glob(b"lib*.so*", b"libfoo.so.1"));
        assert!(glob(b"*alloc", b"xmalloc"));
        assert!(!glob(b"alloc", b"malloc"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
    }

    #[test]
    fn matches_function_file_or_module_basename() {
        let s = Suppressions::parse("# comment\nleak:third_party_*\n\nlibvendor.so\n");
        assert_eq!(s.len(), 2);
        assert!(s.matches(&[
            frame("main", "/src/a.c", "/bin/a"),
            frame("third_party_init", "", "")
        ]));
        assert!(s.matches(&[frame("f", "/x/y.c", "/usr/lib/libvendor.so")]));
        assert!(!s.matches(&[frame("f", "/x/y.c", "/usr/lib/libother.so")]));
    }
}
