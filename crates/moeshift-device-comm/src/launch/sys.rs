//! The few operating-system calls the launcher needs that `std` does not offer: signalling a
//! process group, tying a child's life to the launcher's, catching termination signals, and
//! killing the current process on purpose (test fail points).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sends `signal` to every process of the process group `pgid`. A group that no longer
/// exists is not an error.
pub(crate) fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pid out of range",
        ));
    };
    if pgid <= 1 {
        // Never signal "every process" (0, -1) or init's group by accident.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal group <= 1",
        ));
    }
    // SAFETY: `kill` has no memory-safety preconditions; a negative pid addresses the group.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Makes the kernel SIGKILL the child that `cmd` spawns when the launcher thread that
/// spawned it dies (even by SIGKILL), so a dead launcher leaves no rank behind.
pub(crate) fn die_with_launcher(cmd: &mut Command) {
    // SAFETY: `getpid` has no preconditions and cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only calls
    // `die_with_parent`, which makes async-signal-safe system calls (prctl, getppid) and
    // allocates nothing on success.
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent));
    }
}

/// Runs in a forked child before `exec`: asks the kernel to SIGKILL the child when the
/// launcher's thread that spawned it dies, and gives up if the launcher is already gone.
/// Only async-signal-safe calls are made.
fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: `prctl(PR_SET_PDEATHSIG, sig)` only sets a flag on the calling process; its
    // extra arguments are ignored for this option.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `getppid` has no preconditions and cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::other(
            "the launcher exited before the rank started",
        ));
    }
    Ok(())
}

/// Set by the handler that [`catch_termination_signals`] installs.
pub(crate) static TERMINATION_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_termination_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    TERMINATION_REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs a handler for SIGINT, SIGTERM and SIGHUP that only sets
/// [`TERMINATION_REQUESTED`], so a launcher can stop its ranks before exiting.
pub(crate) fn catch_termination_signals() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `sigaction` is given a zero-initialised struct (a valid value for this
        // plain C struct) whose handler is an `extern "C"` function that only performs an
        // atomic store, which is async-signal-safe; `sa_mask` is initialised by
        // `sigemptyset` before use.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_termination_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills the current process with SIGKILL, as an outside `kill -9` would: no destructor,
/// no flush, sockets closed by the kernel.
pub(crate) fn kill_self() -> ! {
    // SAFETY: `kill` has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught, so this is not reached; abort in case it somehow is.
    std::process::abort()
}

/// The conventional name of a signal number.
pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_signal_every_process() {
        assert!(signal_group(0, 0).is_err());
        assert!(signal_group(1, 0).is_err());
    }

    #[test]
    fn a_vanished_group_is_not_an_error() {
        // Spawn a child in its own group, reap it, then signal the (now empty) group.
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("true")
            .process_group(0)
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(signal_group(pid, 0).is_ok());
    }

    #[test]
    fn names_common_signals() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(12345), "signal");
    }
}
