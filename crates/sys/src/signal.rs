//! Signal dispositions.

/// Die quietly on a closed pipe (`shoal status | head -1`), as Unix tools
/// do, instead of Rust's default of ignoring SIGPIPE and then panicking in
/// `println!` on EPIPE. Only for short-lived client commands: servers keep
/// SIGPIPE ignored so a vanished peer is an error, not a death.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with a valid signal number and SIG_DFL; no handler
    // code runs, so nothing async-signal-unsafe can happen.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
