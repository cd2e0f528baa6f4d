//! Arithmetic on sorted, half-open address ranges.

/// `a` minus every range in `b`; both sorted by start, `b` may overlap itself.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        let first = b.partition_point(|r| r.1 <= s);
        for &(bs, be) in &b[first..] {
            if bs >= e {
                break;
            }
            if be <= cur {
                continue;
            }
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
            if cur >= e {
                break;
            }
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// `a` minus every range of `b`, in one pass over both: `a` sorted and disjoint, `b` any
/// iterator of ranges sorted by start (they may overlap), such as the blocks of a heap.
pub fn subtract_sorted(
    a: &[(u64, u64)],
    b: impl IntoIterator<Item = (u64, u64)>,
) -> Vec<(u64, u64)> {
    let mut b = b.into_iter().peekable();
    let mut out = Vec::new();
    // The furthest end of the ranges of `b` taken so far: they all start before the
    // current range of `a`, so together they cover it up to there.
    let mut reach = 0;
    for &(s, e) in a {
        let mut cur = s.max(reach);
        while let Some(&(bs, be)) = b.peek() {
            if bs >= e {
                break;
            }
            b.next();
            reach = reach.max(be);
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// Sorts ranges and merges overlapping or touching ones.
pub fn normalize(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.1 > r.0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_cuts_holes_and_keeps_edges() {
        let b = normalize(vec![(20, 30), (25, 40), (50, 60), (0, 5)]);
        assert_eq!(b, vec![(0, 5), (20, 40), (50, 60)]);
        assert_eq!(
            subtract(&[(0, 100)], &b),
            vec![(5, 20), (40, 50), (60, 100)]
        );
        assert_eq!(subtract(&[(21, 39)], &b), vec![]);
        assert_eq!(
            subtract(&[(60, 70), (80, 90)], &b),
            vec![(60, 70), (80, 90)]
        );
    }

    #[test]
    fn subtract_sorted_matches_subtract() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..300 {
            let a = normalize((0..next(8)).map(|_| (next(200), next(200))).collect());
            let mut b: Vec<(u64, u64)> = (0..next(12))
                .map(|_| {
                    let s = next(200);
                    (s, s + next(40))
                })
                .collect();
            b.sort_unstable_by_key(|r| r.0);
            let want = normalize(subtract(&a, &normalize(b.clone())));
            assert_eq!(
                normalize(subtract_sorted(&a, b.iter().copied())),
                want,
                "{a:?} - {b:?}"
            );
        }
    }
}
