//! Last-resort diagnostics that need no allocation.

/// Writes `msg` to stderr with a raw `write(2)`.
pub fn say(msg: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; the result is deliberately ignored.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Writes `n` in decimal at the end of `buf` and returns those digits.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes `msg` and aborts: used only where the target could not go on correctly anyway.
pub fn fatal(msg: &[u8]) -> ! {
    say(msg);
    // SAFETY: abort never returns and has no preconditions.
    unsafe { libc::abort() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimals() {
        let mut b = [0u8; 20];
        assert_eq!(super::decimal(0, &mut b), b"0");
        assert_eq!(super::decimal(4_194_304, &mut b), b"4194304");
        assert_eq!(super::decimal(u64::MAX, &mut b), b"18446744073709551615");
    }
}
