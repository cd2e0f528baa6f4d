//! Where target memory comes from: one [`Memory`] trait for every source, and an [`Image`]
//! (copied segments) that the scanner reads.

use anyhow::Result;

/// A source of target memory: a live (frozen) process, a snapshot child, a core file…
pub trait Memory {
    /// Fills `buf` from address `addr`; unreadable pages are left as zeros.
    /// Returns how many bytes were really read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize;
}

/// Memory of a live process read with `process_vm_readv`.
pub struct ProcessMemory {
    pid: i32,
}

impl ProcessMemory {
    /// Memory of process `pid` (it should be frozen for a consistent view).
    pub fn new(pid: i32) -> ProcessMemory {
        ProcessMemory { pid }
    }

    fn readv(&self, addr: u64, buf: &mut [u8]) -> usize {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: both iovecs describe valid memory of the stated length (ours is `buf`;
        // the remote one is checked by the kernel).
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        n.max(0) as usize
    }
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
        const CHUNK: usize = 1 << 20;
        let mut done = 0;
        let mut total = 0;
        while done < buf.len() {
            let end = (done + CHUNK).min(buf.len());
            let n = self.readv(addr + done as u64, &mut buf[done..end]);
            total += n;
            if n < end - done {
                // Partial: step over the unreadable page and go on.
                let at = addr + (done + n) as u64;
                let next_page = ((at / 4096) + 1) * 4096;
                done = ((next_page - addr) as usize)
                    .min(buf.len())
                    .max(done + n + 1);
                continue;
            }
            done = end;
        }
        total
    }
}

/// A copied segment of target memory.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Address of the first byte.
    pub start: u64,
    /// The bytes, as 8-byte words (so scanning needs no unaligned reads).
    pub words: Vec<u64>,
}

impl Segment {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.words.len() as u64 * 8
    }
}

/// Copied target memory: non-overlapping segments sorted by address.
#[derive(Debug, Default, Clone)]
pub struct Image {
    segments: Vec<Segment>,
}

impl Image {
    /// Copies the 8-aligned ranges `ranges` (sorted, non-overlapping) from `mem`.
    pub fn copy(mem: &dyn Memory, ranges: &[(u64, u64)]) -> Result<Image> {
        let mut segments = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges {
            let (s, e) = (s & !7, (e + 7) & !7);
            if e <= s {
                continue;
            }
            let mut words = vec![0u64; ((e - s) / 8) as usize];
            // SAFETY: a u64 slice viewed as bytes, same length in bytes, u8 has no alignment.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
            };
            mem.read(s, bytes);
            segments.push(Segment { start: s, words });
        }
        segments.sort_by_key(|s| s.start);
        Ok(Image { segments })
    }

    /// Builds an image from segments (sorted here).
    pub fn from_segments(mut segments: Vec<Segment>) -> Image {
        segments.sort_by_key(|s| s.start);
        Image { segments }
    }

    /// The words covering `[addr, addr+len)`, if one segment holds them all
    /// (`addr` rounded down and the end rounded up to 8).
    pub fn words(&self, addr: u64, len: u64) -> Option<&[u64]> {
        let (s, e) = (addr & !7, (addr + len + 7) & !7);
        let i = self.segments.partition_point(|g| g.start <= s);
        let g = self.segments.get(i.checked_sub(1)?)?;
        if e > g.end() {
            return None;
        }
        let a = ((s - g.start) / 8) as usize;
        Some(&g.words[a..a + ((e - s) / 8) as usize])
    }

    /// Calls `f` with the copied words of every segment piece overlapping `[start, end)`.
    pub fn for_each_piece(&self, start: u64, end: u64, mut f: impl FnMut(&[u64])) {
        let (s, e) = (start & !7, (end + 7) & !7);
        let first = self.segments.partition_point(|g| g.end() <= s);
        for g in &self.segments[first..] {
            if g.start >= e {
                break;
            }
            let a = ((s.max(g.start) - g.start) / 8) as usize;
            let b = ((e.min(g.end()) - g.start) / 8) as usize;
            if a < b {
                f(&g.words[a..b]);
            }
        }
    }

    /// The 8-byte word at `addr` (8-aligned), if copied.
    pub fn word(&self, addr: u64) -> Option<u64> {
        self.words(addr, 8).map(|w| w[0])
    }

    /// All segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Total copied bytes.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.words.len() as u64 * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((addr + i as u64) & 0xff) as u8;
            }
            buf.len()
        }
    }

    #[test]
    fn image_lookups_stay_inside_segments() {
        let img = Image::copy(&Fake, &[(0x1000, 0x1010), (0x2000, 0x2008)]).unwrap();
        assert_eq!(
            img.word(0x1008),
            Some(u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]))
        );
        assert_eq!(img.words(0x1000, 16).map(|w| w.len()), Some(2));
        assert!(img.words(0x1008, 16).is_none());
        assert!(img.word(0x1800).is_none());
        assert_eq!(img.bytes(), 24);
        let mut pieces = Vec::new();
        img.for_each_piece(0x1008, 0x2008, |w| pieces.push(w.len()));
        assert_eq!(pieces, vec![1, 1]);
    }

    #[test]
    fn live_read_of_own_memory_and_of_a_hole() {
        let data = [7u8; 64];
        let mem = ProcessMemory::new(std::process::id() as i32);
        let mut buf = [0u8; 64];
        assert_eq!(mem.read(data.as_ptr() as u64, &mut buf), 64);
        assert_eq!(buf, data);
        assert_eq!(mem.read(8, &mut buf[..8]), 0);
    }
}
