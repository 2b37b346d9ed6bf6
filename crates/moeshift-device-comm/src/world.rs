//! [`World`]: who this process is among the ranks of a job, read from torchrun-style variables.

use std::fmt;

/// Environment variable holding the global rank of this process.
pub const ENV_RANK: &str = "RANK";
/// Environment variable holding the number of ranks in the job.
pub const ENV_WORLD_SIZE: &str = "WORLD_SIZE";
/// Environment variable holding the rank of this process on its node.
pub const ENV_LOCAL_RANK: &str = "LOCAL_RANK";
/// Environment variable holding the number of ranks on each node.
pub const ENV_LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Environment variable holding the address of the host of rank 0 (the rendezvous store).
pub const ENV_MASTER_ADDR: &str = "MASTER_ADDR";
/// Environment variable holding the TCP port of the rendezvous store.
pub const ENV_MASTER_PORT: &str = "MASTER_PORT";

/// Why the rank variables could not be turned into a [`World`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorldError {
    /// A required variable is not set.
    #[error("environment variable {var} is not set (expected a torchrun-style launch: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")]
    Missing {
        /// The variable's name.
        var: &'static str,
    },
    /// A variable is set but its value cannot be used.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// The value as found.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Each variable parses, but together they contradict each other.
    #[error("inconsistent rank variables: {detail}")]
    Inconsistent {
        /// Which variables disagree, with their values.
        detail: String,
    },
}

/// This process's place in a job: its rank, the number of ranks, its place on its node, and
/// where rank 0 hosts the rendezvous store.
///
/// ```
/// use moeshift_device_comm::World;
///
/// let vars = [("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3"),
///             ("LOCAL_WORLD_SIZE", "4"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")];
/// let world = World::from_vars(|name| {
///     vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
/// })?;
/// assert_eq!((world.rank(), world.world_size(), world.num_nodes()), (3, 8, 2));
/// assert_eq!(world.master_endpoint(), "10.0.0.1:29500");
/// # Ok::<(), moeshift_device_comm::WorldError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct World {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    local_world_size: usize,
    master_addr: String,
    master_port: u16,
}

impl World {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
    /// `MASTER_PORT` from the process environment and checks them (see [`World::from_vars`]).
    pub fn from_env() -> Result<Self, WorldError> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Like [`World::from_env`], with the variables looked up through `lookup` (a name in, the
    /// value out, `None` when unset), so parsing can be tested without touching the process
    /// environment.
    ///
    /// All six variables are required. Numbers may carry surrounding whitespace. Errors name
    /// the variable and its value: missing or unparsable values, `WORLD_SIZE` or
    /// `LOCAL_WORLD_SIZE` of zero, `RANK >= WORLD_SIZE`, `LOCAL_RANK >= LOCAL_WORLD_SIZE`,
    /// `LOCAL_WORLD_SIZE > WORLD_SIZE`, `WORLD_SIZE` not a multiple of `LOCAL_WORLD_SIZE`, an
    /// empty `MASTER_ADDR`, and `MASTER_PORT` of 0 or above 65535.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, WorldError> {
        let get = |var: &'static str| lookup(var).ok_or(WorldError::Missing { var });
        let rank = parse_count(ENV_RANK, &get(ENV_RANK)?)?;
        let world_size = parse_count(ENV_WORLD_SIZE, &get(ENV_WORLD_SIZE)?)?;
        let local_rank = parse_count(ENV_LOCAL_RANK, &get(ENV_LOCAL_RANK)?)?;
        let local_world_size = parse_count(ENV_LOCAL_WORLD_SIZE, &get(ENV_LOCAL_WORLD_SIZE)?)?;
        let master_addr = get(ENV_MASTER_ADDR)?;
        let port_text = get(ENV_MASTER_PORT)?;
        let master_port = parse_port(&port_text)?;
        if master_addr.trim().is_empty() {
            return Err(WorldError::Invalid {
                var: ENV_MASTER_ADDR,
                value: master_addr,
                reason: "empty host name".into(),
            });
        }
        Self::new(
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr.trim(),
            master_port,
        )
    }

    /// Builds a world from explicit values, with the same checks as [`World::from_vars`]
    /// (errors still name the corresponding environment variable).
    pub fn new(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: usize,
        master_addr: &str,
        master_port: u16,
    ) -> Result<Self, WorldError> {
        if world_size == 0 {
            return Err(WorldError::Invalid {
                var: ENV_WORLD_SIZE,
                value: "0".into(),
                reason: "a job needs at least one rank".into(),
            });
        }
        if local_world_size == 0 {
            return Err(WorldError::Invalid {
                var: ENV_LOCAL_WORLD_SIZE,
                value: "0".into(),
                reason: "a node needs at least one rank".into(),
            });
        }
        if rank >= world_size {
            return Err(WorldError::Inconsistent {
                detail: format!(
                    "{ENV_RANK}={rank} is not below {ENV_WORLD_SIZE}={world_size} (ranks are 0..{world_size})"
                ),
            });
        }
        if local_rank >= local_world_size {
            return Err(WorldError::Inconsistent {
                detail: format!(
                    "{ENV_LOCAL_RANK}={local_rank} is not below {ENV_LOCAL_WORLD_SIZE}={local_world_size}"
                ),
            });
        }
        if local_world_size > world_size {
            return Err(WorldError::Inconsistent {
                detail: format!(
                    "{ENV_LOCAL_WORLD_SIZE}={local_world_size} exceeds {ENV_WORLD_SIZE}={world_size}"
                ),
            });
        }
        if world_size % local_world_size != 0 {
            return Err(WorldError::Inconsistent {
                detail: format!(
                    "{ENV_WORLD_SIZE}={world_size} is not a multiple of {ENV_LOCAL_WORLD_SIZE}={local_world_size} (every node must run the same number of ranks)"
                ),
            });
        }
        if master_addr.trim().is_empty() {
            return Err(WorldError::Invalid {
                var: ENV_MASTER_ADDR,
                value: master_addr.into(),
                reason: "empty host name".into(),
            });
        }
        if master_port == 0 {
            return Err(WorldError::Invalid {
                var: ENV_MASTER_PORT,
                value: "0".into(),
                reason: "port 0 cannot be connected to; pick a port in 1..=65535".into(),
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr.trim().to_string(),
            master_port,
        })
    }

    /// A world of `world_size` ranks on one node: `LOCAL_RANK = RANK` and
    /// `LOCAL_WORLD_SIZE = WORLD_SIZE`.
    pub fn single_node(
        rank: usize,
        world_size: usize,
        master_addr: &str,
        master_port: u16,
    ) -> Result<Self, WorldError> {
        Self::new(rank, world_size, rank, world_size, master_addr, master_port)
    }

    /// Global rank of this process, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank of this process on its node, in `0..local_world_size()`.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Number of ranks on each node.
    pub fn local_world_size(&self) -> usize {
        self.local_world_size
    }

    /// Number of nodes: `world_size() / local_world_size()`.
    pub fn num_nodes(&self) -> usize {
        self.world_size / self.local_world_size
    }

    /// Host name or address where rank 0 hosts the rendezvous store.
    pub fn master_addr(&self) -> &str {
        &self.master_addr
    }

    /// TCP port of the rendezvous store.
    pub fn master_port(&self) -> u16 {
        self.master_port
    }

    /// `host:port` of the rendezvous store, with IPv6 literals bracketed.
    pub fn master_endpoint(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// True for rank 0, the rank that hosts the rendezvous store.
    pub fn is_master(&self) -> bool {
        self.rank == 0
    }
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "World(rank {}/{}, local {}/{}, store {})",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.master_endpoint()
        )
    }
}

fn parse_count(var: &'static str, value: &str) -> Result<usize, WorldError> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|e| WorldError::Invalid {
            var,
            value: value.to_string(),
            reason: format!("not a non-negative integer ({e})"),
        })
}

fn parse_port(value: &str) -> Result<u16, WorldError> {
    let invalid = |reason: String| WorldError::Invalid {
        var: ENV_MASTER_PORT,
        value: value.to_string(),
        reason,
    };
    let port = value
        .trim()
        .parse::<u64>()
        .map_err(|e| invalid(format!("not a port number ({e})")))?;
    match u16::try_from(port) {
        Ok(0) => Err(invalid(
            "port 0 cannot be connected to; pick a port in 1..=65535".into(),
        )),
        Ok(p) => Ok(p),
        Err(_) => Err(invalid("ports are 1..=65535".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn good() -> HashMap<&'static str, String> {
        [
            (ENV_RANK, "5"),
            (ENV_WORLD_SIZE, "8"),
            (ENV_LOCAL_RANK, "1"),
            (ENV_LOCAL_WORLD_SIZE, "4"),
            (ENV_MASTER_ADDR, "node0"),
            (ENV_MASTER_PORT, "29500"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    fn parse(vars: &HashMap<&'static str, String>) -> Result<World, WorldError> {
        World::from_vars(|k| vars.get(k).cloned())
    }

    fn with(var: &'static str, value: &str) -> Result<World, WorldError> {
        let mut vars = good();
        vars.insert(var, value.to_string());
        parse(&vars)
    }

    #[test]
    fn parses_a_torchrun_environment() {
        let w = parse(&good()).expect("valid variables");
        assert_eq!(w.rank(), 5);
        assert_eq!(w.world_size(), 8);
        assert_eq!(w.local_rank(), 1);
        assert_eq!(w.local_world_size(), 4);
        assert_eq!(w.num_nodes(), 2);
        assert_eq!(w.master_addr(), "node0");
        assert_eq!(w.master_port(), 29500);
        assert_eq!(w.master_endpoint(), "node0:29500");
        assert!(!w.is_master());
    }

    #[test]
    fn whitespace_around_numbers_is_accepted() {
        let w = with(ENV_RANK, " 2\n").expect("trimmed");
        assert_eq!(w.rank(), 2);
    }

    #[test]
    fn every_missing_variable_is_named() {
        for var in [
            ENV_RANK,
            ENV_WORLD_SIZE,
            ENV_LOCAL_RANK,
            ENV_LOCAL_WORLD_SIZE,
            ENV_MASTER_ADDR,
            ENV_MASTER_PORT,
        ] {
            let mut vars = good();
            vars.remove(var);
            let err = parse(&vars).expect_err("a missing variable must fail");
            assert_eq!(err, WorldError::Missing { var });
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn every_unparsable_number_is_named_with_its_value() {
        for var in [
            ENV_RANK,
            ENV_WORLD_SIZE,
            ENV_LOCAL_RANK,
            ENV_LOCAL_WORLD_SIZE,
            ENV_MASTER_PORT,
        ] {
            for bad in ["", "abc", "-1", "1.5", "3x"] {
                let err = with(var, bad).expect_err("bad number must fail");
                match &err {
                    WorldError::Invalid { var: v, value, .. } => {
                        assert_eq!(*v, var);
                        assert_eq!(value, bad);
                    }
                    other => panic!("{var}={bad:?}: unexpected error {other:?}"),
                }
                let text = err.to_string();
                assert!(
                    text.contains(var) && text.contains(&format!("{bad:?}")),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn rank_must_be_below_world_size() {
        let err = with(ENV_RANK, "8").expect_err("rank 8 of 8");
        let text = err.to_string();
        assert!(matches!(err, WorldError::Inconsistent { .. }));
        assert!(
            text.contains("RANK=8") && text.contains("WORLD_SIZE=8"),
            "{text}"
        );
    }

    #[test]
    fn local_rank_must_be_below_local_world_size() {
        let err = with(ENV_LOCAL_RANK, "4").expect_err("local rank 4 of 4");
        let text = err.to_string();
        assert!(
            text.contains("LOCAL_RANK=4") && text.contains("LOCAL_WORLD_SIZE=4"),
            "{text}"
        );
    }

    #[test]
    fn world_size_must_be_a_multiple_of_local_world_size() {
        let mut vars = good();
        vars.insert(ENV_LOCAL_WORLD_SIZE, "3".into());
        let err = parse(&vars).expect_err("8 ranks cannot split into nodes of 3");
        let text = err.to_string();
        assert!(
            text.contains("WORLD_SIZE=8") && text.contains("LOCAL_WORLD_SIZE=3"),
            "{text}"
        );
    }

    #[test]
    fn local_world_size_cannot_exceed_world_size() {
        let mut vars = good();
        vars.insert(ENV_LOCAL_WORLD_SIZE, "16".into());
        let err = parse(&vars).expect_err("16 local ranks in a world of 8");
        assert!(err.to_string().contains("LOCAL_WORLD_SIZE=16"), "{err}");
    }

    #[test]
    fn zero_sizes_are_rejected() {
        let err = with(ENV_WORLD_SIZE, "0").expect_err("empty world");
        assert!(err.to_string().contains("WORLD_SIZE"), "{err}");
        let err = with(ENV_LOCAL_WORLD_SIZE, "0").expect_err("empty node");
        assert!(err.to_string().contains("LOCAL_WORLD_SIZE"), "{err}");
    }

    #[test]
    fn ports_outside_1_to_65535_are_rejected() {
        for bad in ["0", "65536", "99999999999"] {
            let err = with(ENV_MASTER_PORT, bad).expect_err("bad port");
            match &err {
                WorldError::Invalid { var, value, .. } => {
                    assert_eq!(*var, ENV_MASTER_PORT);
                    assert_eq!(value, bad);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            with(ENV_MASTER_PORT, "65535").map(|w| w.master_port()),
            Ok(65535)
        );
        assert_eq!(with(ENV_MASTER_PORT, "1").map(|w| w.master_port()), Ok(1));
    }

    #[test]
    fn empty_master_addr_is_rejected() {
        let err = with(ENV_MASTER_ADDR, "  ").expect_err("blank address");
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
    }

    #[test]
    fn ipv6_master_endpoint_is_bracketed() {
        let w = World::single_node(0, 1, "::1", 1234).expect("valid");
        assert_eq!(w.master_endpoint(), "[::1]:1234");
        assert!(w.is_master());
        assert_eq!((w.local_rank(), w.local_world_size()), (0, 1));
    }
}
