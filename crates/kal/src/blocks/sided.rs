//! Several threads filling one vector at once, each item to one of two sides (low or
//! high), ending with every low item before every high one: the table read's way of
//! splitting millions of blocks at an address for two sorting threads without a second
//! copy of them. Fresh memory is slow to fault in (the kernel clears every new page), so
//! the result is the only large vector written: each thread stages a chunk of items per
//! side in a small buffer it reuses, copies a full chunk into the next free chunk of the
//! result, and at the end the chunks are swapped into place and the partly filled
//! buffers put between and after them.

use std::mem::MaybeUninit;
use std::sync::{Mutex, PoisonError};

/// Items in a chunk.
pub const CHUNK: usize = 2048;

/// The free chunks of a vector's spare capacity, handed out in order.
pub struct Chunks<'v, T> {
    /// The index of the next chunk, and the chunks not handed out.
    next: Mutex<(usize, std::slice::ChunksExactMut<'v, MaybeUninit<T>>)>,
}

impl<'v, T: Copy> Chunks<'v, T> {
    /// The whole chunks of `spare` (a vector's spare capacity while it is empty).
    pub fn new(spare: &'v mut [MaybeUninit<T>]) -> Chunks<'v, T> {
        Chunks {
            next: Mutex::new((0, spare.chunks_exact_mut(CHUNK))),
        }
    }

    /// Copies `items` (exactly [`CHUNK`] of them) into the next free chunk: its index, or
    /// `None` if none is left.
    fn put(&self, items: &[T]) -> Option<usize> {
        debug_assert_eq!(items.len(), CHUNK);
        let (k, chunk) = {
            let mut g = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let chunk = g.1.next()?;
            g.0 += 1;
            (g.0 - 1, chunk)
        };
        for (d, &x) in chunk.iter_mut().zip(items) {
            d.write(x);
        }
        Some(k)
    }
}

/// One thread's writer: a staging buffer per side.
pub struct Writer<'c, 'v, T> {
    chunks: &'c Chunks<'v, T>,
    staged: Staged<T>,
}

/// What one writer wrote: its chunks, and the items still staged.
pub struct Staged<T> {
    /// Index and side (`true`: high) of each chunk written.
    filled: Vec<(usize, bool)>,
    /// Items not in a chunk, low and high (fewer than a chunk each, unless the chunks ran
    /// out).
    rest: [Vec<T>; 2],
}

impl<'c, 'v, T: Copy> Writer<'c, 'v, T> {
    /// A writer into `chunks`.
    pub fn new(chunks: &'c Chunks<'v, T>) -> Writer<'c, 'v, T> {
        Writer {
            chunks,
            staged: Staged {
                filled: Vec::new(),
                rest: [Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK)],
            },
        }
    }

    /// Adds `x` to the low side, or to the high side if `high`.
    #[inline]
    pub fn push(&mut self, high: bool, x: T) {
        let s = &mut self.staged.rest[usize::from(high)];
        s.push(x);
        // If no chunk is left (cannot happen when the capacity is at least the number of
        // items), the items stay staged: still correct.
        if s.len() == CHUNK {
            if let Some(k) = self.chunks.put(s) {
                s.clear();
                self.staged.filled.push((k, high));
            }
        }
    }

    /// What this writer wrote.
    pub fn finish(self) -> Staged<T> {
        self.staged
    }
}

/// Puts the items of `parts` (every writer of chunks cut from `out`'s spare capacity
/// while `out` was empty) in order in `out`: every low item before every high one, each
/// side in no particular order. Returns the number of low items.
pub fn assemble<T: Copy>(out: &mut Vec<T>, parts: Vec<Staged<T>>) -> usize {
    assert!(out.is_empty(), "the chunks were cut from an empty vector");
    let mut high: Vec<bool> = Vec::new();
    let mut rest: [Vec<T>; 2] = [Vec::new(), Vec::new()];
    for p in parts {
        for (k, h) in p.filled {
            if high.len() <= k {
                high.resize(k + 1, false);
            }
            high[k] = h;
        }
        for (all, mine) in rest.iter_mut().zip(&p.rest) {
            all.extend_from_slice(mine);
        }
    }
    let n = high.len() * CHUNK;
    assert!(n <= out.capacity());
    // SAFETY: chunks are handed out in order from the start of the spare capacity and
    // each one is written whole when it is handed out (`Chunks::put`), so the chunks of
    // every index up to the highest one filled, that is the first `n` items, are
    // initialised; T is Copy (nothing to drop).
    unsafe { out.set_len(n) };
    // Low chunks first: swap a high chunk from the front with a low one from the back.
    let (mut i, mut j) = (0, high.len());
    while i < j {
        if !high[i] {
            i += 1;
        } else if high[j - 1] {
            j -= 1;
        } else {
            let (a, b) = out.split_at_mut((j - 1) * CHUNK);
            a[i * CHUNK..(i + 1) * CHUNK].swap_with_slice(&mut b[..CHUNK]);
            high.swap(i, j - 1);
            i += 1;
            j -= 1;
        }
    }
    let low_full = i * CHUNK;
    // The staged low items go right after the low chunks: the high items there move to
    // the end (order inside a side does not matter).
    let [low_rest, high_rest] = rest;
    let high_full = n - low_full;
    if high_full <= low_rest.len() {
        let moved = out.split_off(low_full);
        out.extend_from_slice(&low_rest);
        out.extend_from_slice(&moved);
    } else {
        let m = low_rest.len();
        out.extend_from_within(low_full..low_full + m);
        out[low_full..low_full + m].copy_from_slice(&low_rest);
    }
    out.extend_from_slice(&high_rest);
    low_full + low_rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills a vector of `cap` capacity from `threads` threads, each pushing its share of
    /// `items` with odd items on the high side; checks the result holds each item once
    /// with every low item first.
    fn fill(items: &[u64], threads: usize, cap: usize) {
        let mut out: Vec<u64> = Vec::with_capacity(cap);
        let per = items.len().div_ceil(threads.max(1)).max(1);
        let chunks = Chunks::new(out.spare_capacity_mut());
        let parts: Vec<Staged<u64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = items
                .chunks(per)
                .map(|share| {
                    let chunks = &chunks;
                    sc.spawn(move || {
                        let mut w = Writer::new(chunks);
                        for &x in share {
                            w.push(x % 2 == 1, x);
                        }
                        w.finish()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n_low = assemble(&mut out, parts);
        assert_eq!(out.len(), items.len());
        assert!(out[..n_low].iter().all(|x| x % 2 == 0), "low side");
        assert!(out[n_low..].iter().all(|x| x % 2 == 1), "high side");
        let mut got = out.clone();
        got.sort_unstable();
        let mut want = items.to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn every_item_once_and_low_before_high() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for n in [
            0,
            1,
            5,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK,
            20 * CHUNK + 17,
        ] {
            let random: Vec<u64> = (0..n).map(|_| next() >> 1).collect();
            // Mostly low, mostly high, random, and runs of each side.
            let low: Vec<u64> = (0..n as u64)
                .map(|i| 2 * i + u64::from(i % 97 == 0))
                .collect();
            let high: Vec<u64> = (0..n as u64)
                .map(|i| 2 * i + u64::from(i % 97 != 0))
                .collect();
            let runs: Vec<u64> = (0..n as u64).map(|i| 2 * i + (i / 5000) % 2).collect();
            for items in [&random, &low, &high, &runs] {
                for threads in [1, 2, 3] {
                    fill(items, threads, n);
                    fill(items, threads, n + 5 * CHUNK);
                }
            }
        }
    }

    #[test]
    fn items_stay_staged_when_the_chunks_run_out() {
        // A capacity below the item count: fewer chunks than needed, nothing lost.
        let items: Vec<u64> = (0..10 * CHUNK as u64).collect();
        let mut out: Vec<u64> = Vec::with_capacity(3 * CHUNK);
        let parts = {
            let chunks = Chunks::new(out.spare_capacity_mut());
            let mut w = Writer::new(&chunks);
            for &x in &items {
                w.push(x % 3 == 0, x);
            }
            vec![w.finish()]
        };
        let n_low = assemble(&mut out, parts);
        assert!(out[..n_low].iter().all(|x| x % 3 != 0));
        assert!(out[n_low..].iter().all(|x| x % 3 == 0));
        out.sort_unstable();
        assert_eq!(out, items);
    }
}
