//! kal's own diagnostics, switched on by environment variables read once:
//! `KAL_DEBUG_TIMING` (where a check's time goes, on stderr) and `KAL_DEBUG_ROOTS` (which
//! root region reaches what). Neither changes any result.

use std::sync::OnceLock;

/// Whether `KAL_DEBUG_TIMING` is set: print the time of each step of a check.
pub fn timing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KAL_DEBUG_TIMING").is_some())
}

/// Whether `KAL_DEBUG_ROOTS` is set: say which root region reaches the blocks reported.
pub fn roots() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KAL_DEBUG_ROOTS").is_some())
}
