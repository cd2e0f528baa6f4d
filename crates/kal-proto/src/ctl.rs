//! The agent's control protocol: requests from the CLI over the agent's unix socket.
//!
//! A request is a 16-byte [`ReqHeader`] followed, for [`Op::Reclaim`] and [`Op::Park`], by
//! `count` entries of 16 bytes (block address, allocation sequence number). A park request
//! may carry a descriptor of `/dev/userfaultfd` (`SCM_RIGHTS`) with its header. A response
//! is a 64-byte [`Response`] followed, for a reclaim, by a bitmap of `count` bits (bit *i*
//! set when entry *i* was freed), for a park by `count` little-endian u32 (pages parked for
//! entry *i*), for stats by a [`ParkStats`]. Everything is little-endian and bounded; a
//! request that does not decode is answered with [`Status::BadRequest`] and changes
//! nothing.

/// Magic number of requests and responses ("KCTL").
pub const CTL_MAGIC: u32 = u32::from_le_bytes(*b"KCTL");
/// Protocol version.
pub const CTL_VERSION: u16 = 2;
/// Most entries one reclaim request may carry.
pub const MAX_RECLAIM: u32 = 1 << 20;
/// Size of a request header.
pub const REQ_HEADER_SIZE: usize = 16;
/// Size of one reclaim entry.
pub const ENTRY_SIZE: usize = 16;
/// Size of a response (without the reclaim bitmap).
pub const RESPONSE_SIZE: usize = 64;
/// Size of a [`ParkStats`].
pub const STATS_SIZE: usize = 96;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Free the listed blocks if each is still the same allocation.
    Reclaim = 1,
    /// Return free memory the allocator keeps to the OS (`malloc_trim(0)`).
    Trim = 2,
    /// Make a copy-on-write snapshot: the agent's server thread forks the process (the
    /// CLI holds every other thread stopped), answers with the copy's pid in
    /// `Response::freed_blocks`, and reaps the copy once the CLI closes the connection (the
    /// copy exits then, or when the CLI dies).
    Snapshot = 3,
    /// Park the listed blocks' pages if each is still the same allocation; `arg` is the
    /// store limit ([`park_limit_mib`], [`park_limit_percent`], or 0 for the default).
    Park = 4,
    /// Report the parking counters ([`ParkStats`]).
    Stats = 5,
    /// Detach an agent loaded by `kal attach`: restore every GOT slot it redirected, make
    /// its hooks forward only, and end its threads once the answer is sent
    /// (`Response::freed_blocks` is 1 when done, 0 when the agent was not attached).
    Detach = 6,
}

/// Park request argument: a store limit of `mib` MiB (at least 1).
pub fn park_limit_mib(mib: u32) -> u32 {
    mib.clamp(1, (1 << 31) - 1)
}

/// Park request argument: a store limit of `pct` % of the bytes parked (16 MiB at least).
pub fn park_limit_percent(pct: u32) -> u32 {
    (1 << 31) | pct.min(0xffff)
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReqHeader {
    /// The operation.
    pub op: Op,
    /// Number of entries that follow (0 unless `op` is `Reclaim` or `Park`).
    pub count: u32,
    /// Operation argument (the store limit of `Park`; 0 otherwise).
    pub arg: u32,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Wrong magic or version.
    Foreign,
    /// Unknown operation.
    UnknownOp,
    /// Too many entries, or entries where none belong.
    BadCount,
}

impl ReqHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQ_HEADER_SIZE] {
        let mut b = [0u8; REQ_HEADER_SIZE];
        b[0..4].copy_from_slice(&CTL_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&CTL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; REQ_HEADER_SIZE]) -> Result<ReqHeader, DecodeError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let version = u16::from_le_bytes([b[4], b[5]]);
        if magic != CTL_MAGIC || version != CTL_VERSION {
            return Err(DecodeError::Foreign);
        }
        let op = match u16::from_le_bytes([b[6], b[7]]) {
            1 => Op::Reclaim,
            2 => Op::Trim,
            3 => Op::Snapshot,
            4 => Op::Park,
            5 => Op::Stats,
            6 => Op::Detach,
            _ => return Err(DecodeError::UnknownOp),
        };
        let count = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let arg = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let ok = match op {
            Op::Reclaim => count <= MAX_RECLAIM && arg == 0,
            Op::Park => count <= MAX_RECLAIM,
            Op::Trim | Op::Stats | Op::Snapshot | Op::Detach => count == 0 && arg == 0,
        };
        if !ok {
            return Err(DecodeError::BadCount);
        }
        Ok(ReqHeader { op, count, arg })
    }
}

/// Encodes one reclaim entry.
pub fn encode_entry(addr: u64, seq: u64) -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

/// Decodes one reclaim entry: `(addr, seq)`.
pub fn decode_entry(b: &[u8; ENTRY_SIZE]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut s = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    s.copy_from_slice(&b[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(s))
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The request did not decode; nothing was done.
    BadRequest = 1,
    /// The allocator cannot do this (e.g. trim with a non-glibc allocator).
    Unsupported = 2,
    /// The peer could not ptrace the process (not root, and another uid or gid, or the
    /// process is not dumpable): only [`Op::Stats`] is served to it; nothing was done.
    Denied = 3,
}

/// The fixed part of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Response {
    /// A [`Status`] value.
    pub status: u32,
    /// Reclaim: blocks freed. Trim: 1 if memory was released. Snapshot: the copy's pid.
    pub freed_blocks: u64,
    /// Reclaim: bytes freed.
    pub freed_bytes: u64,
    /// Reclaim: entries refused because the block is no longer that allocation.
    pub stale: u64,
    /// Reclaim, park: entries refused because their site contradicted an earlier reclaim.
    pub banned: u64,
    /// Park: runs not parked because the store limit (or the limit on registered ranges)
    /// was reached; parking stopped there for this request.
    pub skipped: u64,
    /// Park, stats: why parking is unavailable (a [`ParkStats::note`] value), or 0.
    pub note: u32,
}

impl Response {
    /// Encodes the response.
    pub fn encode(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..4].copy_from_slice(&CTL_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.freed_blocks.to_le_bytes());
        b[16..24].copy_from_slice(&self.freed_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.stale.to_le_bytes());
        b[32..40].copy_from_slice(&self.banned.to_le_bytes());
        b[40..48].copy_from_slice(&self.skipped.to_le_bytes());
        b[48..52].copy_from_slice(&self.note.to_le_bytes());
        b
    }

    /// Decodes a response; `None` if it is not one.
    pub fn decode(b: &[u8; RESPONSE_SIZE]) -> Option<Response> {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != CTL_MAGIC {
            return None;
        }
        Some(Response {
            status: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            freed_blocks: u64_at(8),
            freed_bytes: u64_at(16),
            stale: u64_at(24),
            banned: u64_at(32),
            skipped: u64_at(40),
            note: u32::from_le_bytes([b[48], b[49], b[50], b[51]]),
        })
    }
}

/// The agent's parking counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParkStats {
    /// 0: never asked to park; 1: parking; 2: userfaultfd unavailable; 3: stopped.
    pub state: u32,
    /// Why unavailable or stopped: low byte 1 no userfaultfd, 2 no write protection,
    /// 3 no memory, 4 a run could not be restored exactly, 5 exiting; errno above.
    pub note: u32,
    /// Bytes parked now.
    pub parked_bytes: u64,
    /// Bytes parked since the start.
    pub parked_total: u64,
    /// Bytes restored because the program touched them.
    pub restored_bytes: u64,
    /// Runs restored because the program touched them.
    pub restores: u64,
    /// Touches of a parked block's own bytes (the site is then banned).
    pub contradictions: u64,
    /// Bytes the compressed store holds.
    pub store_bytes: u64,
    /// Runs parked now.
    pub runs: u64,
    /// Registered ranges.
    pub spans: u64,
    /// Runs not parked because a limit was reached.
    pub skipped: u64,
    /// Runs left in place because the program wrote to them while they were being parked.
    pub raced: u64,
}

impl ParkStats {
    /// Encodes the counters.
    pub fn encode(&self) -> [u8; STATS_SIZE] {
        let mut b = [0u8; STATS_SIZE];
        b[0..4].copy_from_slice(&self.state.to_le_bytes());
        b[4..8].copy_from_slice(&self.note.to_le_bytes());
        let words = [
            self.parked_bytes,
            self.parked_total,
            self.restored_bytes,
            self.restores,
            self.contradictions,
            self.store_bytes,
            self.runs,
            self.spans,
            self.skipped,
            self.raced,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes the counters.
    pub fn decode(b: &[u8; STATS_SIZE]) -> ParkStats {
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[8 + i * 8..16 + i * 8]);
            u64::from_le_bytes(x)
        };
        ParkStats {
            state: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            note: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            parked_bytes: w(0),
            parked_total: w(1),
            restored_bytes: w(2),
            restores: w(3),
            contradictions: w(4),
            store_bytes: w(5),
            runs: w(6),
            spans: w(7),
            skipped: w(8),
            raced: w(9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let h = ReqHeader {
            op: Op::Reclaim,
            count: 3,
            arg: 0,
        };
        assert_eq!(ReqHeader::decode(&h.encode()), Ok(h));
        assert_eq!(decode_entry(&encode_entry(0x1234, 99)), (0x1234, 99));
        let r = Response {
            status: 0,
            freed_blocks: 2,
            freed_bytes: 100,
            stale: 1,
            banned: 0,
            skipped: 4,
            note: 5,
        };
        assert_eq!(Response::decode(&r.encode()), Some(r));
        let st = ParkStats {
            state: 1,
            parked_bytes: 7,
            skipped: 9,
            ..Default::default()
        };
        assert_eq!(ParkStats::decode(&st.encode()), st);
        let p = ReqHeader {
            op: Op::Park,
            count: 2,
            arg: park_limit_percent(25),
        };
        assert_eq!(ReqHeader::decode(&p.encode()), Ok(p));
    }

    #[test]
    fn rejects_bad_counts_and_foreign_headers() {
        let big = ReqHeader {
            op: Op::Reclaim,
            count: MAX_RECLAIM + 1,
            arg: 0,
        };
        assert_eq!(ReqHeader::decode(&big.encode()), Err(DecodeError::BadCount));
        let trim_with_entries = ReqHeader {
            op: Op::Trim,
            count: 1,
            arg: 0,
        };
        assert_eq!(
            ReqHeader::decode(&trim_with_entries.encode()),
            Err(DecodeError::BadCount)
        );
        let mut b = ReqHeader {
            op: Op::Trim,
            count: 0,
            arg: 0,
        }
        .encode();
        b[6] = 9;
        assert_eq!(ReqHeader::decode(&b), Err(DecodeError::UnknownOp));
        b[0] = 0;
        assert_eq!(ReqHeader::decode(&b), Err(DecodeError::Foreign));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic_and_stay_bounded(bytes in proptest::array::uniform16(any::<u8>())) {
            if let Ok(h) = ReqHeader::decode(&bytes) {
                prop_assert!(h.count <= MAX_RECLAIM);
                prop_assert!(matches!(h.op, Op::Reclaim | Op::Park) || h.count == 0);
                prop_assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn valid_headers_round_trip(count in 0..=MAX_RECLAIM, reclaim in any::<bool>(), arg in any::<u32>()) {
            let h = if reclaim { ReqHeader { op: Op::Park, count, arg } } else { ReqHeader { op: Op::Trim, count: 0, arg: 0 } };
            prop_assert_eq!(ReqHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn any_response_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), RESPONSE_SIZE)) {
            let mut b = [0u8; RESPONSE_SIZE];
            b.copy_from_slice(&bytes);
            if let Some(r) = Response::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }
    }
}
