//! Multi-process tests as ordinary `#[test]` functions.
//!
//! # The convention
//!
//! A multi-rank scenario is a `#[test]` in an integration test file whose name starts with
//! `rank_`. Its first line asks [`run_as_ranks`] (or a [`RankTest`]) what to do:
//!
//! - when the variable `RANK` is **not** set, the test is the *parent*: it starts
//!   `world_size` copies of its own test binary (`std::env::current_exe()` with
//!   `--exact <name> --nocapture --test-threads=1`) through the [`Launcher`], with the
//!   torchrun variables set, and checks that every copy passed. `run_as_ranks` then returns
//!   `Ok(None)` and the test returns;
//! - when `RANK` **is** set, the test is one rank: `run_as_ranks` returns
//!   `Ok(Some(world))` ([`World::from_env`]) and the test body runs as that rank.
//!
//! So `cargo test` runs the scenarios, and an external launcher can run the same test
//! binary with any number of ranks:
//! `moeshift launch --nproc 8 -- target/debug/deps/multirank-… --exact rank_store_ops --nocapture`.
//!
//! ```no_run
//! use moeshift_device_comm::{testing, HostGroup, StoreClient};
//! use moeshift_sync::Deadline;
//! use std::time::Duration;
//!
//! #[test]
//! fn rank_all_gather_4() {
//!     let Some(world) = testing::run_as_ranks("rank_all_gather_4", 4, Duration::from_secs(60))
//!         .expect("ranks")
//!     else {
//!         return; // parent: the 4 ranks ran and passed
//!     };
//!     let deadline = Deadline::after(Duration::from_secs(30));
//!     let store = StoreClient::connect(&world, deadline).expect("store");
//!     let group = HostGroup::world(&store, deadline).expect("group");
//!     let all = group.all_gather(&[world.rank() as u8], deadline).expect("all_gather");
//!     assert_eq!(all.len(), world.world_size());
//! }
//! ```
//!
//! # Failure injection
//!
//! Failure tests are separate tests (not `rank_`-prefixed, so an external launcher running
//! every `rank_` test does not trip them). They use [`RankTest`] with
//! [`keep_going`](RankTest::keep_going) (so that the launcher lets the surviving ranks
//! report) and set [`ENV_FAIL_RANK`] / [`ENV_FAIL_POINT`]; the test body calls
//! [`fail_point`] at the chosen point, and the chosen rank kills itself there with SIGKILL,
//! as a crash or `kill -9` would. [`fail_point_hit`] lets a body do something else instead,
//! such as returning before it ever joins (a rank that never shows up).

use std::time::Duration;

use crate::launch::{sys, LaunchError, LaunchOutcome, Launcher, OutputMode, Stream};
use crate::world::{World, WorldError, ENV_RANK};

/// Names the rank that [`fail_point`] kills.
pub const ENV_FAIL_RANK: &str = "MOESHIFT_FAIL_RANK";
/// Names the point at which [`fail_point`] kills it.
pub const ENV_FAIL_POINT: &str = "MOESHIFT_FAIL_POINT";
/// Asks the GPU tests for this many ranks, even more than there are GPUs: the ranks then
/// share the GPUs ([`gpu_ranks`], [`share_gpus`]).
pub const ENV_GPU_RANKS: &str = "MOESHIFT_GPU_RANKS";

/// Why a multi-process test could not run or did not pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestingError {
    /// `RANK` is set but the rank variables are unusable.
    #[error("this process has RANK set but cannot run as a rank: {0}")]
    World(#[from] WorldError),
    /// The test binary's own path is unknown.
    #[error("cannot find the test binary to start the ranks: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The ranks could not be launched.
    #[error("cannot launch the ranks of {test}: {source}")]
    Launch {
        /// The test.
        test: String,
        /// The launcher's error.
        #[source]
        source: LaunchError,
    },
    /// A variable this module reads holds something it cannot use.
    #[error("{name}={value:?}: {why}")]
    BadVariable {
        /// The variable.
        name: &'static str,
        /// What it holds.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Some rank failed.
    #[error("{test}: not every rank passed\n{report}")]
    RanksFailed {
        /// The test.
        test: String,
        /// The launcher's summary and each failing rank's output.
        report: String,
    },
}

/// What a [`RankTest`] turned out to be in this process.
#[derive(Debug)]
pub enum RankRole {
    /// This process is one rank: run the body as `World`.
    Rank(World),
    /// This process was the parent; here is how the ranks ended.
    Parent(LaunchOutcome),
}

/// A multi-process test: its name, world size, timeout and extra variables for the ranks.
#[derive(Debug, Clone)]
pub struct RankTest {
    name: String,
    world_size: usize,
    timeout: Duration,
    envs: Vec<(String, String)>,
    keep_going: bool,
}

/// True when this process runs as a rank (the variable `RANK` is set).
pub fn is_rank_process() -> bool {
    std::env::var_os(ENV_RANK).is_some()
}

/// Runs the test `test_name` as `world_size` ranks: returns `Ok(Some(world))` in a rank,
/// and in the parent launches the ranks and returns `Ok(None)` once all passed (an error
/// with every failing rank's output otherwise). See the [module docs](self).
pub fn run_as_ranks(
    test_name: &str,
    world_size: usize,
    timeout: Duration,
) -> Result<Option<World>, TestingError> {
    RankTest::new(test_name, world_size).timeout(timeout).run()
}

impl RankTest {
    /// A test named `name` (the exact test path the harness knows, e.g. `rank_store_ops`)
    /// run as `world_size` ranks, with a 60 s timeout.
    pub fn new(name: &str, world_size: usize) -> Self {
        Self {
            name: name.to_string(),
            world_size,
            timeout: Duration::from_secs(60),
            envs: Vec::new(),
            keep_going: false,
        }
    }

    /// Stops the ranks after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets a variable in every rank (e.g. [`ENV_FAIL_RANK`]).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Lets the other ranks run on when one fails (for failure-injection tests).
    pub fn keep_going(mut self) -> Self {
        self.keep_going = true;
        self
    }

    /// In a rank, returns [`RankRole::Rank`]; in the parent, launches the ranks, prints
    /// their output (the test harness shows it when the test fails) and returns
    /// [`RankRole::Parent`] with the outcome, whatever it is.
    pub fn launch(&self) -> Result<RankRole, TestingError> {
        if is_rank_process() {
            return Ok(RankRole::Rank(World::from_env()?));
        }
        let exe = std::env::current_exe().map_err(TestingError::CurrentExe)?;
        let mut launcher = Launcher::new(self.world_size, exe)
            .args(["--exact", &self.name, "--nocapture", "--test-threads=1"])
            .output(OutputMode::Capture)
            .timeout(self.timeout)
            .grace_period(Duration::from_secs(2))
            .stop_on_failure(!self.keep_going);
        for (k, v) in &self.envs {
            launcher = launcher.env(k, v);
        }
        let outcome = launcher.run().map_err(|source| TestingError::Launch {
            test: self.name.clone(),
            source,
        })?;
        for r in &outcome.ranks {
            for line in &r.output {
                match line.stream {
                    Stream::Stdout => println!("[rank {}] {}", r.rank, line.text),
                    Stream::Stderr => eprintln!("[rank {}] {}", r.rank, line.text),
                }
            }
        }
        Ok(RankRole::Parent(outcome))
    }

    /// Like [`launch`](Self::launch), but in the parent turns any failed rank into
    /// [`TestingError::RanksFailed`]: `Ok(Some(world))` in a rank, `Ok(None)` in a parent
    /// whose ranks all passed.
    pub fn run(&self) -> Result<Option<World>, TestingError> {
        match self.launch()? {
            RankRole::Rank(world) => Ok(Some(world)),
            RankRole::Parent(outcome) if outcome.success() => Ok(None),
            RankRole::Parent(outcome) => Err(TestingError::RanksFailed {
                test: self.name.clone(),
                report: failure_report(&outcome),
            }),
        }
    }
}

/// How many ranks a GPU test runs on a machine with `gpus` GPUs: [`ENV_GPU_RANKS`] when it
/// is set (a positive number), otherwise one rank per GPU and at most `max` (at least 1).
///
/// Asking for more ranks than GPUs runs the multi-rank paths (headers, offsets, pairing,
/// CUDA IPC between processes) on a machine with fewer GPUs; [`share_gpus`] makes that work.
/// It says nothing about speed: ranks on one GPU take turns on it.
pub fn gpu_ranks(gpus: usize, max: usize) -> Result<usize, TestingError> {
    ranks_for(std::env::var(ENV_GPU_RANKS).ok(), gpus, max)
}

/// [`gpu_ranks`] with the variable's value given.
fn ranks_for(asked: Option<String>, gpus: usize, max: usize) -> Result<usize, TestingError> {
    match asked {
        Some(value) => match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(TestingError::BadVariable {
                name: ENV_GPU_RANKS,
                value,
                why: "not a positive number of ranks",
            }),
        },
        None => Ok(gpus.min(max).max(1)),
    }
}

/// Why `gpus` GPUs cannot run a GPU test of `ranks` ranks, if they cannot: no GPU, or fewer
/// GPUs than ranks while [`ENV_GPU_RANKS`] is not set. With the variable set, tests of a
/// fixed number of ranks run on fewer GPUs too, the ranks sharing them ([`share_gpus`]).
pub fn gpu_shortage(ranks: usize, gpus: usize) -> Option<String> {
    shortage_for(std::env::var(ENV_GPU_RANKS).ok(), ranks, gpus)
}

/// [`gpu_shortage`] with the variable's value given.
fn shortage_for(asked: Option<String>, ranks: usize, gpus: usize) -> Option<String> {
    if gpus == 0 {
        return Some("no GPU visible".to_string());
    }
    match asked {
        Some(value) => ranks_for(Some(value), gpus, ranks).err().map(|e| e.to_string()),
        None if gpus < ranks => Some(format!(
            "{gpus} GPU(s) visible, the test needs {ranks} ({ENV_GPU_RANKS}=2 lets ranks share GPUs)"
        )),
        None => None,
    }
}

/// The GPU this rank uses when the ranks share `gpus` GPUs round robin (`local_rank %
/// gpus`), with NCCL set up so that it accepts two ranks on one GPU. Call it in the rank
/// before anything loads NCCL.
///
/// NCCL refuses a communicator with two ranks on one GPU of one host ("duplicate GPU").
/// When ranks share a GPU, this gives each rank its own NCCL host identity
/// (`NCCL_HOSTID`), so NCCL sees one GPU per host and carries the traffic between ranks over
/// its network transport: sockets on the loopback interface (`NCCL_NET=Socket`,
/// `NCCL_SOCKET_IFNAME=lo`) unless those variables are already set. CUDA IPC between the
/// processes works as it does between GPUs. With one rank per GPU it changes nothing.
///
/// It sets environment variables of this process, so call it while no other thread reads
/// them, as test ranks do at their start.
pub fn share_gpus(world: &World, gpus: usize) -> usize {
    let (gpu, vars) = shared_gpu(world, gpus, |key| std::env::var_os(key).is_some());
    for (key, value) in vars {
        std::env::set_var(key, value);
    }
    gpu
}

/// [`share_gpus`] without touching the environment: this rank's GPU and the variables to
/// set (`is_set` tells which ones the user set already).
fn shared_gpu(
    world: &World,
    gpus: usize,
    is_set: impl Fn(&str) -> bool,
) -> (usize, Vec<(&'static str, String)>) {
    let gpus = gpus.max(1);
    let mut vars = Vec::new();
    if world.local_world_size() > gpus {
        vars.push(("NCCL_HOSTID", format!("moeshift-rank-{}", world.rank())));
        for (key, value) in [("NCCL_NET", "Socket"), ("NCCL_SOCKET_IFNAME", "lo")] {
            if !is_set(key) {
                vars.push((key, value.to_string()));
            }
        }
    }
    (world.local_rank() % gpus, vars)
}

/// The launcher's summary plus the output of every rank that did not pass.
pub fn failure_report(outcome: &LaunchOutcome) -> String {
    let mut report = outcome.summary();
    for r in outcome.ranks.iter().filter(|r| !r.status.success()) {
        report.push_str(&format!("--- rank {} ({}) output ---\n", r.rank, r.status));
        if r.dropped_lines > 0 {
            report.push_str(&format!("[{} earlier lines not kept]\n", r.dropped_lines));
        }
        for line in &r.output {
            report.push_str(&line.text);
            report.push('\n');
        }
    }
    report
}

/// True when this rank is the one [`ENV_FAIL_RANK`] names and [`ENV_FAIL_POINT`] is
/// `point`.
pub fn fail_point_hit(world: &World, point: &str) -> bool {
    let rank_matches = std::env::var(ENV_FAIL_RANK)
        .ok()
        .and_then(|r| r.trim().parse::<usize>().ok())
        == Some(world.rank());
    rank_matches && std::env::var(ENV_FAIL_POINT).ok().as_deref() == Some(point)
}

/// Kills this process with SIGKILL when [`fail_point_hit`] says so; does nothing otherwise.
/// Only for tests: it is how a test makes one rank die at a chosen point.
pub fn fail_point(world: &World, point: &str) {
    if fail_point_hit(world, point) {
        eprintln!(
            "rank {}: fail point {point:?} reached, killing this process",
            world.rank()
        );
        sys::kill_self();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ranks_follow_the_gpus_unless_asked() {
        assert_eq!(ranks_for(None, 8, 2).unwrap(), 2);
        assert_eq!(ranks_for(None, 1, 2).unwrap(), 1);
        assert_eq!(ranks_for(None, 0, 2).unwrap(), 1);
        assert_eq!(ranks_for(Some(" 3 ".into()), 1, 2).unwrap(), 3);
        for bad in ["0", "-1", "two", ""] {
            let err = ranks_for(Some(bad.into()), 1, 2).unwrap_err();
            assert!(
                matches!(err, TestingError::BadVariable { ref value, .. } if value == bad),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn fixed_rank_tests_share_gpus_only_when_asked() {
        assert_eq!(shortage_for(None, 2, 2), None);
        assert_eq!(shortage_for(None, 2, 8), None);
        let short = shortage_for(None, 2, 1).expect("too few GPUs");
        assert!(short.contains("1 GPU(s) visible"), "{short}");
        assert_eq!(shortage_for(Some("2".into()), 2, 1), None);
        assert!(shortage_for(Some("2".into()), 2, 0).is_some());
        assert!(shortage_for(Some("x".into()), 2, 1).is_some());
    }

    #[test]
    fn ranks_sharing_a_gpu_get_their_own_nccl_host() {
        // 4 ranks on 2 GPUs: round robin, and a distinct NCCL host per rank.
        let mut hosts = Vec::new();
        for rank in 0..4 {
            let world = World::single_node(rank, 4, "127.0.0.1", 29500).unwrap();
            let (gpu, vars) = shared_gpu(&world, 2, |_| false);
            assert_eq!(gpu, rank % 2);
            let keys: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, ["NCCL_HOSTID", "NCCL_NET", "NCCL_SOCKET_IFNAME"]);
            hosts.push(vars[0].1.clone());
        }
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), 4, "{hosts:?}");
        // The user's transport choice stays.
        let world = World::single_node(1, 2, "127.0.0.1", 29500).unwrap();
        let (gpu, vars) = shared_gpu(&world, 1, |k| k == "NCCL_NET");
        assert_eq!(gpu, 0);
        let keys: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["NCCL_HOSTID", "NCCL_SOCKET_IFNAME"]);
        // One rank per GPU: nothing changes.
        let world = World::single_node(1, 2, "127.0.0.1", 29500).unwrap();
        assert_eq!(shared_gpu(&world, 2, |_| false), (1, Vec::new()));
    }
}
