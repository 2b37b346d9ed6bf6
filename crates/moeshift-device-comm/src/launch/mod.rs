//! [`Launcher`]: starts N ranks of a command on this machine with torchrun's variables and
//! watches them.
//!
//! Each rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (= `RANK`), `LOCAL_WORLD_SIZE`
//! (= `WORLD_SIZE`), `MASTER_ADDR` and `MASTER_PORT` (a free port unless one is given), the
//! extra variables set with [`Launcher::env`] (which may override those), always
//! `NCCL_NVLS_ENABLE=0`, and `NCCL_RUNTIME_CONNECT=0` unless the launcher's environment or
//! [`Launcher::env`] gives another value (NCCL then opens its collective connections when a
//! communicator is created, where moeshift's deadlines cover them; see
//! `nccl::NcclComm`). Every line a rank prints comes out prefixed with `[rank K] `.
//!
//! Each rank runs in its own process group and is killed by the kernel if the launcher dies.
//! On the first failure (a non-zero exit or a signal) the launcher sends SIGTERM to every
//! other rank's process group, then SIGKILL after a grace period, and reports which rank
//! failed and how. An overall timeout and a cancellation flag stop the ranks the same way.

mod output;
pub(crate) mod sys;

/// NCCL's switch between opening collective connections lazily (`1`, its default) and at
/// communicator creation (`0`).
const ENV_NCCL_RUNTIME_CONNECT: &str = "NCCL_RUNTIME_CONNECT";

pub use output::{OutputLine, OutputMode, Stream};

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use output::{pump, Kept};

use crate::world::{
    ENV_LOCAL_RANK, ENV_LOCAL_WORLD_SIZE, ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_RANK,
    ENV_WORLD_SIZE,
};

/// How often the launcher polls its ranks.
const POLL: Duration = Duration::from_millis(10);
/// How long the output threads may keep reading after every rank has exited (a grandchild
/// that inherited the pipe may keep it open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RankStatus {
    /// It exited on its own with this code.
    Exited(i32),
    /// A signal the launcher did not send ended it (a crash, `kill -9`, an abort).
    Signaled(i32),
    /// The launcher stopped it (after another rank failed, the timeout, or cancellation);
    /// `signal` is the last signal sent to it.
    Stopped {
        /// SIGTERM or SIGKILL.
        signal: i32,
    },
}

impl RankStatus {
    /// True for an exit with code 0.
    pub fn success(&self) -> bool {
        matches!(self, Self::Exited(0))
    }

    fn from_exit(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(sig)) => Self::Signaled(sig),
            (None, None) => Self::Exited(-1),
        }
    }
}

impl fmt::Display for RankStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exited with code {code}"),
            Self::Signaled(sig) => {
                write!(f, "was killed by signal {sig} ({})", sys::signal_name(*sig))
            }
            Self::Stopped { signal } => write!(
                f,
                "was stopped by the launcher ({})",
                sys::signal_name(*signal)
            ),
        }
    }
}

/// One rank's end.
#[derive(Debug, Clone)]
pub struct RankExit {
    /// The rank.
    pub rank: usize,
    /// How it ended.
    pub status: RankStatus,
    /// Time from the launch to its end.
    pub elapsed: Duration,
    /// Lines it printed (all of them in [`OutputMode::Capture`] up to the capture limit,
    /// the last ones in [`OutputMode::Forward`]).
    pub output: Vec<OutputLine>,
    /// Older lines not kept.
    pub dropped_lines: usize,
}

/// Why the launcher stopped the ranks early, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A rank failed first.
    RankFailed {
        /// The rank.
        rank: usize,
        /// How it failed.
        status: RankStatus,
    },
    /// The overall timeout passed.
    TimedOut,
    /// The cancellation flag was raised (e.g. Ctrl-C on the launcher).
    Cancelled,
}

/// The result of a launch.
#[derive(Debug, Clone)]
pub struct LaunchOutcome {
    /// The `MASTER_PORT` the ranks were given.
    pub master_port: u16,
    /// Every rank's end, indexed by rank.
    pub ranks: Vec<RankExit>,
    /// The first rank that failed, whether or not the others were stopped.
    pub first_failure: Option<(usize, RankStatus)>,
    /// Why the launcher stopped the ranks, if it did.
    pub stopped: Option<StopReason>,
    /// Time from the launch to the last rank's end.
    pub elapsed: Duration,
}

impl LaunchOutcome {
    /// True when every rank exited with code 0.
    pub fn success(&self) -> bool {
        self.stopped.is_none() && self.ranks.iter().all(|r| r.status.success())
    }

    /// A process exit code summarising the outcome: 0 on success, the first failed rank's
    /// exit code (or 128 + its signal), 124 on timeout, 130 on cancellation.
    pub fn exit_code(&self) -> u8 {
        if self.success() {
            return 0;
        }
        let from_status = |s: RankStatus| match s {
            RankStatus::Exited(c) if (1..=255).contains(&c) => c as u8,
            RankStatus::Signaled(sig) => u8::try_from(128 + sig).unwrap_or(1),
            _ => 1,
        };
        match (self.stopped, self.first_failure) {
            (Some(StopReason::TimedOut), _) => 124,
            (Some(StopReason::Cancelled), _) => 130,
            (_, Some((_, status))) => from_status(status),
            _ => 1,
        }
    }

    /// One line per rank plus the reason for stopping, for logs and error messages.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        match self.stopped {
            Some(StopReason::RankFailed { rank, status }) => s.push_str(&format!(
                "rank {rank} {status} first; the launcher stopped the other ranks\n"
            )),
            Some(StopReason::TimedOut) => {
                s.push_str("the launch timed out; the launcher stopped the remaining ranks\n")
            }
            Some(StopReason::Cancelled) => {
                s.push_str("the launch was cancelled; the launcher stopped the remaining ranks\n")
            }
            None => {
                if let Some((rank, status)) = self.first_failure {
                    s.push_str(&format!("rank {rank} {status} first\n"));
                }
            }
        }
        for r in &self.ranks {
            s.push_str(&format!(
                "  rank {}: {} after {:.2?}\n",
                r.rank, r.status, r.elapsed
            ));
        }
        s
    }
}

/// Why a launch could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The launcher was configured in a way that cannot work.
    #[error("invalid launch: {0}")]
    Invalid(String),
    /// No free port could be found for `MASTER_PORT`.
    #[error("cannot pick a free MASTER_PORT on {addr}: {source}")]
    Port {
        /// The address tried.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A rank's process could not be started; the ranks already started were stopped.
    #[error("cannot start rank {rank} ({program:?}): {source}")]
    Spawn {
        /// The rank.
        rank: usize,
        /// The program.
        program: OsString,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Catching termination signals failed.
    #[error("cannot install the termination signal handler: {0}")]
    Signals(#[source] std::io::Error),
}

#[derive(Clone)]
enum Cancel {
    None,
    Flag(Arc<AtomicBool>),
    Signals,
}

impl Cancel {
    fn requested(&self) -> bool {
        match self {
            Cancel::None => false,
            Cancel::Flag(f) => f.load(Ordering::SeqCst),
            Cancel::Signals => sys::TERMINATION_REQUESTED.load(Ordering::SeqCst),
        }
    }
}

/// Starts and watches the ranks of a single-node job.
///
/// ```no_run
/// use moeshift_device_comm::Launcher;
/// use std::time::Duration;
///
/// let outcome = Launcher::new(4, "my-worker")
///     .arg("--steps=10")
///     .env("RUST_LOG", "info")
///     .timeout(Duration::from_secs(600))
///     .run()?;
/// if !outcome.success() {
///     eprint!("{}", outcome.summary());
/// }
/// # Ok::<(), moeshift_device_comm::LaunchError>(())
/// ```
#[derive(Clone)]
pub struct Launcher {
    nproc: usize,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    master_addr: String,
    master_port: Option<u16>,
    timeout: Option<Duration>,
    grace: Duration,
    output: OutputMode,
    keep_lines: usize,
    stop_on_failure: bool,
    cancel: Cancel,
}

impl fmt::Debug for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launcher")
            .field("nproc", &self.nproc)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("master_port", &self.master_port)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Running {
    child: Option<Child>,
    pid: u32,
    status: Option<RankStatus>,
    ended_at: Duration,
    signal_sent: Option<i32>,
    kept: Arc<Mutex<Kept>>,
}

impl Launcher {
    /// A launcher for `nproc` ranks of `program`.
    pub fn new(nproc: usize, program: impl AsRef<OsStr>) -> Self {
        Self {
            nproc,
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            envs: Vec::new(),
            master_addr: "127.0.0.1".into(),
            master_port: None,
            timeout: None,
            grace: Duration::from_secs(5),
            output: OutputMode::Forward,
            keep_lines: 200,
            stop_on_failure: true,
            cancel: Cancel::None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable in every rank (applied after the rank variables, so it
    /// can override them; `NCCL_NVLS_ENABLE` is always 0).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Uses this `MASTER_PORT` instead of picking a free one.
    pub fn master_port(mut self, port: u16) -> Self {
        self.master_port = Some(port);
        self
    }

    /// Stops every rank once `timeout` has passed since the launch.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Time between SIGTERM and SIGKILL when stopping ranks (default 5 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// What to do with the ranks' output (default [`OutputMode::Forward`]).
    pub fn output(mut self, mode: OutputMode) -> Self {
        self.output = mode;
        if mode == OutputMode::Capture && self.keep_lines < 100_000 {
            self.keep_lines = 100_000;
        }
        self
    }

    /// How many of each rank's last lines the outcome keeps.
    pub fn keep_lines(mut self, lines: usize) -> Self {
        self.keep_lines = lines;
        self
    }

    /// Whether a failing rank stops the others (default true). Failure-injection tests turn
    /// this off to watch how the surviving ranks react.
    pub fn stop_on_failure(mut self, stop: bool) -> Self {
        self.stop_on_failure = stop;
        self
    }

    /// Stops the ranks when `flag` becomes true.
    pub fn cancel_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Cancel::Flag(flag);
        self
    }

    /// Catches SIGINT, SIGTERM and SIGHUP for the rest of the process's life and stops the
    /// ranks when one arrives (for a command-line launcher: its ranks run in their own
    /// process groups, so a terminal's Ctrl-C reaches only the launcher).
    pub fn cancel_on_signals(mut self) -> Result<Self, LaunchError> {
        sys::catch_termination_signals().map_err(LaunchError::Signals)?;
        self.cancel = Cancel::Signals;
        Ok(self)
    }

    fn pick_port(&self) -> Result<u16, LaunchError> {
        if let Some(p) = self.master_port {
            return Ok(p);
        }
        let addr = format!("{}:0", self.master_addr);
        TcpListener::bind(&addr)
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|source| LaunchError::Port { addr, source })
    }

    fn command(&self, rank: usize, port: u16) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD_SIZE, self.nproc.to_string())
            .env(ENV_LOCAL_RANK, rank.to_string())
            .env(ENV_LOCAL_WORLD_SIZE, self.nproc.to_string())
            .env(ENV_MASTER_ADDR, &self.master_addr)
            .env(ENV_MASTER_PORT, port.to_string());
        if std::env::var_os(ENV_NCCL_RUNTIME_CONNECT).is_none() {
            cmd.env(ENV_NCCL_RUNTIME_CONNECT, "0");
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.env("NCCL_NVLS_ENABLE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        sys::die_with_launcher(&mut cmd);
        cmd
    }

    /// Starts the ranks and waits for all of them to end (or be stopped). Returns the
    /// outcome whatever the ranks did; an error only when the launch itself failed.
    pub fn run(&self) -> Result<LaunchOutcome, LaunchError> {
        if self.nproc == 0 {
            return Err(LaunchError::Invalid("--nproc must be at least 1".into()));
        }
        if self.program.is_empty() {
            return Err(LaunchError::Invalid("no command to run".into()));
        }
        let port = self.pick_port()?;
        let started = Instant::now();
        let mut ranks: Vec<Running> = Vec::with_capacity(self.nproc);
        let mut pumps: Vec<JoinHandle<()>> = Vec::new();
        for rank in 0..self.nproc {
            match self.command(rank, port).spawn() {
                Ok(mut child) => {
                    let kept = Arc::new(Mutex::new(Kept::new(self.keep_lines)));
                    if let Some(out) = child.stdout.take() {
                        let (mode, kept) = (self.output, Arc::clone(&kept));
                        pumps.push(std::thread::spawn(move || {
                            pump(rank, Stream::Stdout, out, mode, kept)
                        }));
                    }
                    if let Some(err) = child.stderr.take() {
                        let (mode, kept) = (self.output, Arc::clone(&kept));
                        pumps.push(std::thread::spawn(move || {
                            pump(rank, Stream::Stderr, err, mode, kept)
                        }));
                    }
                    ranks.push(Running {
                        pid: child.id(),
                        child: Some(child),
                        status: None,
                        ended_at: Duration::ZERO,
                        signal_sent: None,
                        kept,
                    });
                }
                Err(source) => {
                    let mut stop_at = None;
                    self.stop_all(&mut ranks, &mut stop_at);
                    self.reap_after_stop(&mut ranks, started, stop_at);
                    return Err(LaunchError::Spawn {
                        rank,
                        program: self.program.clone(),
                        source,
                    });
                }
            }
        }

        let deadline = self.timeout.map(|t| started + t);
        let mut first_failure: Option<(usize, RankStatus)> = None;
        let mut stopped: Option<StopReason> = None;
        let mut stop_at: Option<Instant> = None;
        loop {
            for (rank, r) in ranks.iter_mut().enumerate() {
                if r.status.is_some() {
                    continue;
                }
                let Some(child) = r.child.as_mut() else {
                    continue;
                };
                if let Ok(Some(exit)) = child.try_wait() {
                    let status = match r.signal_sent {
                        Some(signal) => RankStatus::Stopped { signal },
                        None => RankStatus::from_exit(exit),
                    };
                    r.status = Some(status);
                    r.ended_at = started.elapsed();
                    if !status.success() && first_failure.is_none() && r.signal_sent.is_none() {
                        first_failure = Some((rank, status));
                        if self.stop_on_failure && stopped.is_none() {
                            stopped = Some(StopReason::RankFailed { rank, status });
                        }
                    }
                }
            }
            if ranks.iter().all(|r| r.status.is_some()) {
                break;
            }
            if stopped.is_none() {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    stopped = Some(StopReason::TimedOut);
                } else if self.cancel.requested() {
                    stopped = Some(StopReason::Cancelled);
                }
            }
            if stopped.is_some() {
                self.stop_all(&mut ranks, &mut stop_at);
            }
            std::thread::sleep(POLL);
        }
        if stopped.is_some() {
            // Grandchildren left in the ranks' groups go too.
            for r in &ranks {
                let _ = sys::signal_group(r.pid, libc::SIGKILL);
            }
        }

        // Collect the output threads, but do not wait forever for a pipe a grandchild
        // still holds open.
        let drain_until = Instant::now() + OUTPUT_DRAIN;
        while Instant::now() < drain_until && pumps.iter().any(|p| !p.is_finished()) {
            std::thread::sleep(Duration::from_millis(2));
        }
        for p in pumps {
            if p.is_finished() {
                let _ = p.join();
            }
        }

        let ranks_out = ranks
            .into_iter()
            .enumerate()
            .map(|(rank, r)| {
                let kept = r.kept.lock();
                RankExit {
                    rank,
                    status: r.status.unwrap_or(RankStatus::Stopped {
                        signal: libc::SIGKILL,
                    }),
                    elapsed: r.ended_at,
                    output: kept.lines.iter().cloned().collect(),
                    dropped_lines: kept.dropped,
                }
            })
            .collect();
        Ok(LaunchOutcome {
            master_port: port,
            ranks: ranks_out,
            first_failure,
            stopped,
            elapsed: started.elapsed(),
        })
    }

    /// SIGTERM to every running rank's group on the first call; SIGKILL once the grace
    /// period has passed.
    fn stop_all(&self, ranks: &mut [Running], stop_at: &mut Option<Instant>) {
        let now = Instant::now();
        let first = stop_at.is_none();
        let at = *stop_at.get_or_insert(now);
        let signal = if first {
            libc::SIGTERM
        } else if now >= at + self.grace {
            libc::SIGKILL
        } else {
            return;
        };
        for r in ranks.iter_mut() {
            if r.status.is_some() || r.signal_sent == Some(signal) {
                continue;
            }
            let _ = sys::signal_group(r.pid, signal);
            r.signal_sent = Some(signal);
        }
    }

    /// After a failed start: waits for the ranks already started to end.
    fn reap_after_stop(
        &self,
        ranks: &mut [Running],
        started: Instant,
        mut stop_at: Option<Instant>,
    ) {
        while ranks.iter().any(|r| r.status.is_none()) {
            for r in ranks.iter_mut() {
                if r.status.is_some() {
                    continue;
                }
                match r.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(_))) | Some(Err(_)) | None => {
                        r.status = Some(RankStatus::Stopped {
                            signal: r.signal_sent.unwrap_or(libc::SIGTERM),
                        });
                        r.ended_at = started.elapsed();
                    }
                    Some(Ok(None)) => {}
                }
            }
            self.stop_all(ranks, &mut stop_at);
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(nproc: usize, script: &str) -> Launcher {
        Launcher::new(nproc, "sh")
            .arg("-c")
            .arg(script)
            .output(OutputMode::Capture)
            .timeout(Duration::from_secs(30))
            .grace_period(Duration::from_secs(2))
    }

    fn texts(r: &RankExit) -> Vec<String> {
        r.output.iter().map(|l| l.text.clone()).collect()
    }

    #[test]
    fn every_rank_gets_the_torchrun_variables() {
        let outcome = sh(
            3,
            "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $NCCL_NVLS_ENABLE\"",
        )
        .run()
        .expect("launch");
        assert!(outcome.success(), "{}", outcome.summary());
        assert_eq!(outcome.exit_code(), 0);
        let port = outcome.master_port;
        assert_ne!(port, 0);
        for r in &outcome.ranks {
            assert_eq!(
                texts(r),
                vec![format!("{0} 3 {0} 3 127.0.0.1 {port} 0", r.rank)]
            );
        }
    }

    #[test]
    fn extra_env_is_passed_and_nvls_stays_off() {
        let outcome = sh(1, "echo \"$FOO $NCCL_NVLS_ENABLE\"")
            .env("FOO", "bar")
            .env("NCCL_NVLS_ENABLE", "1")
            .master_port(12345)
            .run()
            .expect("launch");
        assert_eq!(texts(&outcome.ranks[0]), vec!["bar 0"]);
        assert_eq!(outcome.master_port, 12345);
    }

    #[test]
    fn nccl_connects_at_creation_unless_told_otherwise() {
        let outcome = sh(1, "echo \"$NCCL_RUNTIME_CONNECT\"")
            .run()
            .expect("launch");
        // The launcher's own environment wins over the default.
        let inherited = std::env::var(ENV_NCCL_RUNTIME_CONNECT).unwrap_or_else(|_| "0".into());
        assert_eq!(texts(&outcome.ranks[0]), vec![inherited]);
        let outcome = sh(1, "echo \"$NCCL_RUNTIME_CONNECT\"")
            .env(ENV_NCCL_RUNTIME_CONNECT, "1")
            .run()
            .expect("launch");
        assert_eq!(texts(&outcome.ranks[0]), vec!["1"]);
    }

    #[test]
    fn first_failure_stops_the_others_quickly() {
        let started = Instant::now();
        let outcome = sh(
            3,
            "if [ \"$RANK\" = 1 ]; then echo dying >&2; exit 7; fi; sleep 30",
        )
        .run()
        .expect("launch");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(!outcome.success());
        assert_eq!(outcome.first_failure, Some((1, RankStatus::Exited(7))));
        assert_eq!(
            outcome.stopped,
            Some(StopReason::RankFailed {
                rank: 1,
                status: RankStatus::Exited(7)
            })
        );
        assert_eq!(outcome.exit_code(), 7);
        for r in [0, 2] {
            assert!(matches!(
                outcome.ranks[r].status,
                RankStatus::Stopped { .. }
            ));
        }
        assert_eq!(outcome.ranks[1].output[0].stream, Stream::Stderr);
        assert!(outcome
            .summary()
            .contains("rank 1 exited with code 7 first"));
    }

    #[test]
    fn a_rank_killed_by_a_signal_is_reported_with_the_signal() {
        let outcome = sh(2, "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 30")
            .run()
            .expect("launch");
        assert_eq!(
            outcome.first_failure,
            Some((0, RankStatus::Signaled(libc::SIGKILL)))
        );
        assert_eq!(outcome.exit_code(), 128 + 9);
        assert!(
            outcome.summary().contains("SIGKILL"),
            "{}",
            outcome.summary()
        );
    }

    #[test]
    fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
        // Rank 0 fails only once rank 1 has started ignoring SIGTERM.
        let ready =
            std::env::temp_dir().join(format!("moeshift-launch-ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let script = format!(
            "if [ \"$RANK\" = 0 ]; then while [ ! -e '{0}' ]; do sleep 0.01; done; exit 3; fi; \
             trap '' TERM; touch '{0}'; sleep 30",
            ready.display()
        );
        let started = Instant::now();
        let outcome = sh(2, &script)
            .grace_period(Duration::from_millis(300))
            .run()
            .expect("launch");
        let _ = std::fs::remove_file(&ready);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(outcome.first_failure, Some((0, RankStatus::Exited(3))));
        assert_eq!(
            outcome.ranks[1].status,
            RankStatus::Stopped {
                signal: libc::SIGKILL
            }
        );
    }

    #[test]
    fn the_timeout_stops_every_rank() {
        let started = Instant::now();
        let outcome = sh(2, "sleep 30")
            .timeout(Duration::from_millis(300))
            .run()
            .expect("launch");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(outcome.stopped, Some(StopReason::TimedOut));
        assert_eq!(outcome.exit_code(), 124);
    }

    #[test]
    fn cancellation_stops_every_rank() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = Arc::clone(&flag);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                flag.store(true, Ordering::SeqCst);
            })
        };
        let outcome = sh(2, "sleep 30").cancel_on(flag).run().expect("launch");
        setter.join().expect("setter");
        assert_eq!(outcome.stopped, Some(StopReason::Cancelled));
        assert_eq!(outcome.exit_code(), 130);
    }

    #[test]
    fn keep_going_lets_survivors_finish() {
        let outcome = sh(
            2,
            "if [ \"$RANK\" = 0 ]; then exit 2; fi; sleep 0.3; echo done",
        )
        .stop_on_failure(false)
        .run()
        .expect("launch");
        assert_eq!(outcome.first_failure, Some((0, RankStatus::Exited(2))));
        assert_eq!(outcome.stopped, None);
        assert_eq!(outcome.ranks[1].status, RankStatus::Exited(0));
        assert_eq!(texts(&outcome.ranks[1]), vec!["done"]);
        assert!(!outcome.success());
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_the_rank() {
        let err = Launcher::new(2, "/nonexistent/moeshift-no-such-program")
            .run()
            .expect_err("cannot spawn");
        assert!(matches!(err, LaunchError::Spawn { rank: 0, .. }), "{err}");
        assert!(Launcher::new(0, "true").run().is_err());
    }
}
