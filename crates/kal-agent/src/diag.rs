//! Last-resort diagnostics that need no allocation.

/// Writes `msg` to stderr with a raw `write(2)`.
pub fn say(msg: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; the result is deliberately ignored.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Writes `msg` and aborts: used only where the target could not go on correctly anyway.
pub fn fatal(msg: &[u8]) -> ! {
    say(msg);
    // SAFETY: abort never returns and has no preconditions.
    unsafe { libc::abort() }
}
