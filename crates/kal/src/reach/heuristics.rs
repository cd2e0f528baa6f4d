//! Interior pointers that memcheck's default heuristics (and so kal) treat as pointing to
//! the start of a block, because common layouts put the "real" pointer inside the block:
//!
//! * **stdstring** — an old-ABI (COW) `std::string` rep `{length, capacity, refcount,
//!   chars…}`, pointed to at its characters (+24);
//! * **length64** — a block that starts with the length of the rest (+8; sqlite);
//! * **newarray** — `new T[n]` of a type with a destructor: an element count, then the
//!   array (+8);
//! * **multipleinheritance** — a pointer to a later base of an object whose first word,
//!   and the word pointed at, are both vtable pointers;
//! * **loaderaligned** (blocks from before a `kal attach` only) — an over-aligned block of
//!   the dynamic loader pointed to at its aligned part, whose second word is the block's
//!   start (`to_free`).

use crate::blocks::Block;
use crate::capture::memory::Memory;
use crate::capture::procfs::Mapping;
use std::collections::HashMap;
use std::sync::Mutex;

/// Decides whether an interior pointer into a block counts as a start pointer.
pub struct Heuristics<'a> {
    mem: &'a (dyn Memory + Sync),
    /// File mappings `(start, end, readable, executable)`, sorted: where vtables and the
    /// code they point to live.
    files: Vec<(u64, u64, bool, bool)>,
    vtables: Mutex<HashMap<u64, bool>>,
    /// Block sizes are usable sizes (a heap walk without the agent): the heuristics that
    /// compare a size with the block's accept any size the program may have asked for.
    usable_sizes: bool,
}

/// How many words of a candidate vtable are looked at.
const VTABLE_WORDS: usize = 20;

impl<'a> Heuristics<'a> {
    /// Heuristics reading block contents and vtables from `mem`.
    pub fn new(mem: &'a (dyn Memory + Sync), maps: &[Mapping]) -> Heuristics<'a> {
        let mut files: Vec<(u64, u64, bool, bool)> = maps
            .iter()
            .filter(|m| m.is_file())
            .map(|m| (m.start, m.end, m.read, m.exec))
            .collect();
        files.sort_unstable();
        Heuristics {
            mem,
            files,
            vtables: Mutex::new(HashMap::new()),
            usable_sizes: false,
        }
    }

    /// Whether block sizes are usable sizes rather than requested ones (see
    /// `requested_sizes`).
    pub fn with_usable_sizes(mut self, usable: bool) -> Self {
        self.usable_sizes = usable;
        self
    }

    /// The sizes `b`'s program may have asked for, `(lowest, highest)`: its size with the
    /// agent. Without it, a heap chunk of usable size `u` (chunk - 8) serves requests from
    /// `u - 15` (chunks go by 16 bytes; the smallest, of 24 usable bytes, from 0) to `u`;
    /// an mmapped one (whose span is its whole usable size) any request needing its pages.
    #[inline]
    fn requested_sizes(&self, b: &Block) -> (u64, u64) {
        if !self.usable_sizes {
            return (b.size, b.size);
        }
        let slack = if b.span() == b.size { 4095 } else { 15 };
        (b.size.saturating_sub(slack), b.size)
    }

    fn word(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.mem
            .read(addr, &mut b)
            .is_ok()
            .then(|| u64::from_le_bytes(b))
    }

    /// The file mapping holding `addr`: `(end, readable, executable)`.
    #[inline]
    fn file_mapping(&self, addr: u64) -> Option<(u64, bool, bool)> {
        let i = self.files.partition_point(|f| f.0 <= addr).checked_sub(1)?;
        let (_, end, read, exec) = self.files[i];
        (addr < end).then_some((end, read, exec))
    }

    /// Whether `ptr`, inside `b` but not at its start, should count as reaching it.
    pub fn reaches(&self, b: &Block, ptr: u64) -> bool {
        self.reaches_with(b, ptr, |a| self.word(a))
    }

    /// [`reaches`](Self::reaches), reading the block's words (8-aligned addresses) with
    /// `word` (for instance from pages the scanner already holds).
    #[inline]
    pub fn reaches_with(&self, b: &Block, ptr: u64, word: impl Fn(u64) -> Option<u64>) -> bool {
        let off = ptr - b.addr;
        let (lo, hi) = self.requested_sizes(b);
        if off == 24 {
            if let (Some(len), Some(cap)) = (word(b.addr), word(b.addr + 8)) {
                if cap.checked_add(25).is_some_and(|s| lo <= s && s <= hi) && len <= cap {
                    return true; // stdstring
                }
            }
        }
        if off == 8 {
            if let Some(n) = word(b.addr) {
                // length64 (n == size - 8) is a special case of newarray (n divides size - 8):
                // the largest multiple of n at most hi - 8 must be at least lo - 8.
                let (lo, hi) = (lo.max(8) - 8, hi - 8);
                if n > 0 && hi - hi % n >= lo {
                    return true;
                }
            }
        }
        if crate::blocks::before_attach::is_before(b) && ptr.is_multiple_of(8) && off <= 64 {
            // An over-aligned allocation of the loader (its `_dl_find_object` segments,
            // made by the dlopen of the agent): pointed to at its aligned part, whose
            // second word (`to_free`) is the block's start. Blocks from before an attach
            // only: memcheck has no such heuristic.
            if word(ptr + 8) == Some(b.addr) {
                return true; // loaderaligned
            }
        }
        if ptr.is_multiple_of(8) {
            if let (Some(inner), Some(first)) = (word(ptr), word(b.addr)) {
                if self.is_vtable(inner) && self.is_vtable(first) {
                    return true; // multipleinheritance
                }
            }
        }
        false
    }

    /// A vtable: aligned, in a readable file mapping, its first non-null entries (at least
    /// two among the first 20 words) all pointing into executable file mappings.
    fn is_vtable(&self, addr: u64) -> bool {
        if !addr.is_multiple_of(8) || addr < 4096 || !self.file_mapping(addr).is_some_and(|m| m.1) {
            return false;
        }
        if let Some(&known) = self
            .vtables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            return known;
        }
        let verdict = self.check_vtable(addr);
        self.vtables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, verdict);
        verdict
    }

    fn check_vtable(&self, addr: u64) -> bool {
        let Some((end, true, _)) = self.file_mapping(addr) else {
            return false;
        };
        let words = (((end - addr) / 8) as usize).min(VTABLE_WORDS);
        let mut found = 0;
        for i in 0..words {
            let Some(f) = self.word(addr + 8 * i as u64) else {
                return false;
            };
            if f == 0 {
                continue;
            }
            if !self.file_mapping(f).is_some_and(|m| m.2) {
                return false;
            }
            found += 1;
            if found == 2 {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::memory::Unreadable;

    /// Memory made of a few words at fixed addresses.
    struct Words(Vec<(u64, u64)>);
    impl Memory for Words {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            match self.0.iter().find(|w| w.0 == addr) {
                Some(w) if buf.len() == 8 => {
                    buf.copy_from_slice(&w.1.to_le_bytes());
                    Ok(())
                }
                _ => Err(Unreadable { read: 0 }),
            }
        }
    }

    fn block(addr: u64, size: u64) -> Block {
        Block {
            addr,
            size,
            seq: 1,
            stack: 0,
            api: 0,
            tail: 0,
        }
    }

    #[test]
    fn layouts_with_a_header_count_and_others_do_not() {
        let maps: Vec<Mapping> = Vec::new();
        let mem = Words(vec![
            (0x1000, 3),
            (0x2000, 40),
            (0x3000, 5),
            (0x3008, 10),
            (0x4000, 7),
        ]);
        let h = Heuristics::new(&mem, &maps);
        assert!(
            h.reaches(&block(0x1000, 8 + 3 * 16), 0x1008),
            "new[] of 3 16-byte objects"
        );
        assert!(h.reaches(&block(0x2000, 48), 0x2008), "length64");
        assert!(
            h.reaches(&block(0x3000, 24 + 10 + 1), 0x3018),
            "stdstring rep"
        );
        assert!(
            !h.reaches(&block(0x4000, 8 + 20), 0x4008),
            "7 does not divide 20"
        );
        assert!(
            !h.reaches(&block(0x2000, 48), 0x2010),
            "other offsets are just interior"
        );
    }

    #[test]
    fn usable_sizes_accept_any_size_the_chunk_could_have_been_asked_for() {
        // A heap walk's heap chunk (span = usable - 8): 77 usable bytes come from requests
        // of 73 to 88 bytes (chunk 96).
        let maps: Vec<Mapping> = Vec::new();
        let mem = Words(vec![(0x1000, 40), (0x1008, 48), (0x2000, 7), (0x3000, 100)]);
        let heap = |addr, usable| Block {
            tail: 8,
            ..block(addr, usable)
        };
        let exact = Heuristics::new(&mem, &maps);
        let usable = Heuristics::new(&mem, &maps).with_usable_sizes(true);
        // length64: malloc(8 + 40) has 56 usable bytes.
        assert!(!exact.reaches(&heap(0x1000, 56), 0x1008));
        assert!(usable.reaches(&heap(0x1000, 56), 0x1008));
        // stdstring rep of capacity 48 (73 bytes asked for, 88 usable).
        assert!(!exact.reaches(&heap(0x1000, 88), 0x1018));
        assert!(usable.reaches(&heap(0x1000, 88), 0x1018));
        // 24 usable bytes serve requests up to 24: 8 + 2 * 7 = 22 is one.
        assert!(usable.reaches(&heap(0x2000, 24), 0x2008));
        // 100 elements fit in none of the requests a 40-byte chunk serves.
        assert!(!usable.reaches(&heap(0x3000, 40), 0x3008));
    }
}
