//! [`StoreClient`]: every rank's handle on the rendezvous store.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use moeshift_sync::Deadline;
use parking_lot::Mutex;

use super::server::StoreServer;
use super::wire::{read_body, write_msg, Request, Response};
use crate::error::CommError;
use crate::net::{connect_with_retry, resolve, set_timeouts, MIN_SOCKET_TIMEOUT};
use crate::world::World;

/// Extra time a client waits for the answer to a blocking request past the time the server
/// was told, so that the server's own "timed out" answer arrives first.
const ANSWER_SLACK: Duration = Duration::from_secs(3);

/// Prefix of the keys the store's own helpers (barriers, groups) use.
pub(crate) const INTERNAL_PREFIX: &str = "__moeshift/";

/// A connection to the rendezvous store, cheap to clone and usable from several threads.
///
/// On rank 0, [`StoreClient::connect`] also starts the [`StoreServer`] and keeps it alive as
/// long as any clone of the client lives. Requests run on pooled connections, so a thread
/// blocked in [`get`](Self::get) never holds up another thread's [`set`](Self::set).
///
/// Keys starting with `__moeshift/` are used by [`barrier`](Self::barrier) and by host groups.
///
/// ```
/// use moeshift_device_comm::{StoreClient, World};
/// use moeshift_sync::Deadline;
/// use std::time::Duration;
///
/// // A world of one rank: rank 0 hosts the store and talks to it.
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// let world = World::single_node(0, 1, "127.0.0.1", port)?;
/// let deadline = Deadline::after(Duration::from_secs(10));
/// let store = StoreClient::connect(&world, deadline)?;
/// assert_eq!(store.add("counter", 2, deadline)?, 2);
/// assert_eq!(store.add("counter", 3, deadline)?, 5);
/// assert_eq!(store.try_get("absent", deadline)?, None);
/// store.barrier("start", deadline)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

struct Inner {
    rank: usize,
    world_size: usize,
    endpoint: String,
    addrs: Vec<SocketAddr>,
    local_ip: IpAddr,
    pool: Mutex<Vec<TcpStream>>,
    rounds: Mutex<HashMap<String, u64>>,
    // Declared last so that pooled connections close before the server stops.
    server: Option<StoreServer>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoreClient(rank {}/{}, store {}{})",
            self.inner.rank,
            self.inner.world_size,
            self.inner.endpoint,
            if self.inner.server.is_some() {
                ", hosted here"
            } else {
                ""
            }
        )
    }
}

/// The address rank 0 listens on for `endpoint`: the loopback address itself when the
/// endpoint is a loopback one (nothing outside the machine can then reach the store),
/// otherwise every interface on that port.
fn server_bind_addr(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    let first = addrs.first()?;
    if first.ip().is_loopback() {
        return Some(*first);
    }
    let any: IpAddr = if first.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    Some(SocketAddr::new(any, first.port()))
}

impl StoreClient {
    /// Connects this rank to the job's store at `world.master_endpoint()`. Rank 0 first starts
    /// the [`StoreServer`] there. Other ranks retry until the deadline, since rank 0 may
    /// start later than they do.
    pub fn connect(world: &World, deadline: Deadline) -> Result<Self, CommError> {
        let endpoint = world.master_endpoint();
        let addrs = resolve(&endpoint).map_err(|e| CommError::StoreUnreachable {
            rank: world.rank(),
            addr: endpoint.clone(),
            attempts: 0,
            last_error: format!("cannot resolve {endpoint}: {e}"),
        })?;
        let server = if world.is_master() {
            let bind = server_bind_addr(&addrs).ok_or_else(|| CommError::StoreUnreachable {
                rank: 0,
                addr: endpoint.clone(),
                attempts: 0,
                last_error: "the address resolves to nothing".into(),
            })?;
            Some(StoreServer::start(bind, world.world_size())?)
        } else {
            None
        };
        Self::open(
            endpoint,
            addrs,
            world.rank(),
            world.world_size(),
            server,
            deadline,
        )
    }

    /// Connects to a store already running at `endpoint` (`host:port`) as `rank` of a world
    /// of `world_size` ranks, retrying until the deadline. Starts no server.
    pub fn connect_to(
        endpoint: &str,
        rank: usize,
        world_size: usize,
        deadline: Deadline,
    ) -> Result<Self, CommError> {
        let addrs = resolve(endpoint).map_err(|e| CommError::StoreUnreachable {
            rank,
            addr: endpoint.to_string(),
            attempts: 0,
            last_error: format!("cannot resolve {endpoint}: {e}"),
        })?;
        Self::open(
            endpoint.to_string(),
            addrs,
            rank,
            world_size,
            None,
            deadline,
        )
    }

    fn open(
        endpoint: String,
        addrs: Vec<SocketAddr>,
        rank: usize,
        world_size: usize,
        server: Option<StoreServer>,
        deadline: Deadline,
    ) -> Result<Self, CommError> {
        if rank >= world_size {
            return Err(CommError::InvalidArgument {
                context: format!("rank {rank}: connecting to the store at {endpoint}"),
                detail: format!("rank {rank} is outside a world of {world_size} ranks"),
            });
        }
        let first = open_conn(&endpoint, &addrs, rank, world_size, deadline)?;
        let local_ip = first
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Ok(Self {
            inner: Arc::new(Inner {
                rank,
                world_size,
                endpoint,
                addrs,
                local_ip,
                pool: Mutex::new(vec![first]),
                rounds: Mutex::new(HashMap::new()),
                server,
            }),
        })
    }

    /// This client's rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.inner.world_size
    }

    /// The store's `host:port`.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// This machine's address on the interface that reaches the store; host groups listen
    /// on it so that peers on other nodes can connect.
    pub fn local_ip(&self) -> IpAddr {
        self.inner.local_ip
    }

    /// The server, when this client hosts it (rank 0 after [`StoreClient::connect`]).
    pub fn server(&self) -> Option<&StoreServer> {
        self.inner.server.as_ref()
    }

    /// Returns how many times this client asked for `name` before (0, 1, 2, …). Ranks that
    /// ask for the same names in the same order get the same numbers, which makes unique
    /// keys for repeated rounds of an exchange (barriers and host groups use it).
    pub fn next_round(&self, name: &str) -> u64 {
        let mut rounds = self.inner.rounds.lock();
        let slot = rounds.entry(name.to_string()).or_insert(0);
        let round = *slot;
        *slot += 1;
        round
    }

    /// Stores `value` under `key`, replacing any previous value, and wakes every rank
    /// waiting for it.
    pub fn set(&self, key: &str, value: &[u8], deadline: Deadline) -> Result<(), CommError> {
        let op = || format!("set({key:?}, {} bytes)", value.len());
        let req = Request::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        match self.request(&op, &req, deadline, false)? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Returns the value of `key`, waiting until some rank sets it. Times out with
    /// [`CommError::StoreTimeout`] naming the key.
    pub fn get(&self, key: &str, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        let op = || format!("get({key:?})");
        let req = Request::Get {
            key: key.to_string(),
            timeout_ms: millis(deadline.remaining()),
        };
        match self.request(&op, &req, deadline, true)? {
            Response::Value(v) => Ok(v),
            Response::NotFound => Err(CommError::StoreTimeout {
                rank: self.inner.rank,
                op: op(),
                missing: vec![key.to_string()],
            }),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Returns the value of `key` if it is set, without waiting for it.
    pub fn try_get(&self, key: &str, deadline: Deadline) -> Result<Option<Vec<u8>>, CommError> {
        let op = || format!("try_get({key:?})");
        let req = Request::TryGet {
            key: key.to_string(),
        };
        match self.request(&op, &req, deadline, false)? {
            Response::Value(v) => Ok(Some(v)),
            Response::NotFound => Ok(None),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Atomically adds `delta` to the integer under `key` (absent counts as 0) and returns
    /// the new value. The value is stored as decimal text, so [`get`](Self::get) reads it as
    /// e.g. `b"3"`; adding to a key holding anything else is refused.
    pub fn add(&self, key: &str, delta: i64, deadline: Deadline) -> Result<i64, CommError> {
        let op = || format!("add({key:?}, {delta})");
        let req = Request::Add {
            key: key.to_string(),
            delta,
        };
        match self.request(&op, &req, deadline, false)? {
            Response::Int(v) => Ok(v),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(&self, key: &str, deadline: Deadline) -> Result<bool, CommError> {
        let op = || format!("delete({key:?})");
        let req = Request::Delete {
            key: key.to_string(),
        };
        match self.request(&op, &req, deadline, false)? {
            Response::Bool(b) => Ok(b),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Waits until every key in `keys` is set. Times out with [`CommError::StoreTimeout`]
    /// listing the keys that never appeared.
    pub fn wait<S: AsRef<str>>(&self, keys: &[S], deadline: Deadline) -> Result<(), CommError> {
        let missing = self.wait_missing(keys, deadline)?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CommError::StoreTimeout {
                rank: self.inner.rank,
                op: wait_op(keys),
                missing,
            })
        }
    }

    /// Like [`wait`](Self::wait), but a timeout is not an error: returns the keys still
    /// missing at the deadline (empty when all appeared).
    pub fn wait_missing<S: AsRef<str>>(
        &self,
        keys: &[S],
        deadline: Deadline,
    ) -> Result<Vec<String>, CommError> {
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_string()).collect();
        let op = || wait_op(&keys);
        let req = Request::Wait {
            keys: keys.clone(),
            timeout_ms: millis(deadline.remaining()),
        };
        match self.request(&op, &req, deadline, true)? {
            Response::Ok => Ok(Vec::new()),
            Response::Missing(missing) => Ok(missing),
            other => Err(self.unexpected(&op(), other)),
        }
    }

    /// Blocks until every rank of the world has called `barrier` with the same `name` the
    /// same number of times. On timeout the error lists the ranks that did not arrive.
    pub fn barrier(&self, name: &str, deadline: Deadline) -> Result<(), CommError> {
        let round = self.next_round(&format!("barrier/{name}"));
        let key =
            |round: u64, rank: usize| format!("{INTERNAL_PREFIX}barrier/{name}/{round}/{rank}");
        self.set(&key(round, self.inner.rank), b"", deadline)?;
        let keys: Vec<String> = (0..self.inner.world_size).map(|r| key(round, r)).collect();
        let missing = self.wait_missing(&keys, deadline)?;
        if !missing.is_empty() {
            let missing_ranks = keys
                .iter()
                .enumerate()
                .filter(|(_, k)| missing.contains(k))
                .map(|(r, _)| r)
                .collect();
            return Err(CommError::BarrierTimeout {
                rank: self.inner.rank,
                name: name.to_string(),
                missing: missing_ranks,
            });
        }
        // Every rank has now left the previous round, so its key can go.
        if round > 0 {
            self.delete(&key(round - 1, self.inner.rank), deadline)?;
        }
        Ok(())
    }

    fn unexpected(&self, op: &str, resp: Response) -> CommError {
        match resp {
            Response::Error(reason) => CommError::StoreRejected {
                rank: self.inner.rank,
                op: op.to_string(),
                reason,
            },
            other => CommError::StoreIo {
                rank: self.inner.rank,
                addr: self.inner.endpoint.clone(),
                op: op.to_string(),
                detail: format!("unexpected answer {other:?}"),
            },
        }
    }

    fn checkout(&self, deadline: Deadline) -> Result<TcpStream, CommError> {
        if let Some(conn) = self.inner.pool.lock().pop() {
            return Ok(conn);
        }
        open_conn(
            &self.inner.endpoint,
            &self.inner.addrs,
            self.inner.rank,
            self.inner.world_size,
            deadline,
        )
    }

    /// Sends one request on a pooled connection and reads the answer. A connection that
    /// failed is dropped rather than returned to the pool.
    fn request(
        &self,
        op: &dyn Fn() -> String,
        req: &Request,
        deadline: Deadline,
        blocking: bool,
    ) -> Result<Response, CommError> {
        let io_err = |e: io::Error| CommError::StoreIo {
            rank: self.inner.rank,
            addr: self.inner.endpoint.clone(),
            op: op(),
            detail: describe_io(&e),
        };
        let encoded = req.encode().map_err(|e| CommError::InvalidArgument {
            context: format!("rank {}: store {}", self.inner.rank, op()),
            detail: e.to_string(),
        })?;
        let conn = self.checkout(deadline)?;
        let answer_deadline = if blocking {
            Deadline::after(deadline.remaining() + ANSWER_SLACK)
        } else {
            deadline
        };
        let result = (|| {
            set_timeouts(&conn, answer_deadline)?;
            write_msg(&mut &conn, &encoded)?;
            match read_body(&mut &conn)? {
                Some(body) => Response::decode(&body),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                )),
            }
        })();
        match result {
            Ok(resp) => {
                self.inner.pool.lock().push(conn);
                Ok(resp)
            }
            Err(e) => Err(io_err(e)),
        }
    }
}

fn wait_op<S: AsRef<str>>(keys: &[S]) -> String {
    const SHOWN: usize = 4;
    let shown: Vec<String> = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("{:?}", k.as_ref()))
        .collect();
    let more = keys.len().saturating_sub(SHOWN);
    if more > 0 {
        format!("wait([{}, … {more} more])", shown.join(", "))
    } else {
        format!("wait([{}])", shown.join(", "))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "the store closed the connection ({e}); rank 0, which hosts it, may have exited"
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer before the deadline ({e})")
        }
        _ => e.to_string(),
    }
}

/// Opens one connection and introduces this rank to the store.
fn open_conn(
    endpoint: &str,
    addrs: &[SocketAddr],
    rank: usize,
    world_size: usize,
    deadline: Deadline,
) -> Result<TcpStream, CommError> {
    let conn = connect_with_retry(addrs, deadline).map_err(|f| CommError::StoreUnreachable {
        rank,
        addr: endpoint.to_string(),
        attempts: f.attempts,
        last_error: f.last_error,
    })?;
    let _ = conn.set_nodelay(true);
    let hello = Request::Hello {
        rank: u32::try_from(rank).unwrap_or(u32::MAX),
        world_size: u32::try_from(world_size).unwrap_or(u32::MAX),
    };
    let io_err = |e: io::Error| CommError::StoreIo {
        rank,
        addr: endpoint.to_string(),
        op: "hello".into(),
        detail: describe_io(&e),
    };
    let answer = (|| {
        // The server answers a hello at once; a short floor keeps a nearly spent deadline
        // from failing an otherwise healthy connection.
        let t = deadline.remaining_at_least(Duration::from_millis(500));
        conn.set_read_timeout(Some(t.max(MIN_SOCKET_TIMEOUT)))?;
        conn.set_write_timeout(Some(t.max(MIN_SOCKET_TIMEOUT)))?;
        write_msg(&mut &conn, &hello.encode()?)?;
        match read_body(&mut &conn)? {
            Some(body) => Response::decode(&body),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            )),
        }
    })()
    .map_err(io_err)?;
    match answer {
        Response::Ok => Ok(conn),
        Response::Error(reason) => Err(CommError::StoreRejected {
            rank,
            op: "hello".into(),
            reason,
        }),
        other => Err(CommError::StoreIo {
            rank,
            addr: endpoint.to_string(),
            op: "hello".into(),
            detail: format!("unexpected answer {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    fn server(world: usize) -> (StoreServer, String) {
        let s = StoreServer::start("127.0.0.1:0".parse().expect("addr"), world).expect("start");
        let ep = s.local_addr().to_string();
        (s, ep)
    }

    #[test]
    fn set_get_try_get_delete() {
        let (_s, ep) = server(2);
        let a = StoreClient::connect_to(&ep, 0, 2, deadline()).expect("rank 0");
        let b = StoreClient::connect_to(&ep, 1, 2, deadline()).expect("rank 1");
        assert_eq!(a.try_get("k", deadline()).expect("try_get"), None);
        a.set("k", b"hello", deadline()).expect("set");
        assert_eq!(b.get("k", deadline()).expect("get"), b"hello");
        assert_eq!(
            b.try_get("k", deadline()).expect("try_get"),
            Some(b"hello".to_vec())
        );
        assert!(b.delete("k", deadline()).expect("delete"));
        assert_eq!(a.try_get("k", deadline()).expect("try_get"), None);
    }

    #[test]
    fn get_times_out_naming_the_key() {
        let (_s, ep) = server(1);
        let c = StoreClient::connect_to(&ep, 0, 1, deadline()).expect("connect");
        let started = Instant::now();
        let err = c
            .get("never/set", Deadline::after(Duration::from_millis(100)))
            .expect_err("nobody sets it");
        assert!(
            matches!(&err, CommError::StoreTimeout { missing, .. } if missing == &["never/set".to_string()])
        );
        assert!(err.to_string().contains("never/set"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_blocked_get_does_not_hold_up_other_requests_of_the_same_client() {
        let (_s, ep) = server(1);
        let c = StoreClient::connect_to(&ep, 0, 1, deadline()).expect("connect");
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.get("late", deadline()))
        };
        std::thread::sleep(Duration::from_millis(50));
        c.set("late", b"v", deadline())
            .expect("set while another thread waits");
        assert_eq!(waiter.join().expect("thread").expect("get"), b"v");
    }

    #[test]
    fn a_wrong_world_size_is_refused_with_both_sizes() {
        let (_s, ep) = server(4);
        let err = StoreClient::connect_to(&ep, 1, 2, deadline()).expect_err("wrong world");
        let text = err.to_string();
        assert!(matches!(err, CommError::StoreRejected { .. }), "{text}");
        assert!(
            text.contains("rank 1") && text.contains('4') && text.contains('2'),
            "{text}"
        );
    }

    #[test]
    fn unreachable_store_times_out_naming_the_address() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let ep = format!("127.0.0.1:{port}");
        let err = StoreClient::connect_to(&ep, 3, 4, Deadline::after(Duration::from_millis(200)))
            .expect_err("nothing listens");
        let text = err.to_string();
        assert!(text.contains(&ep) && text.contains("rank 3"), "{text}");
    }

    #[test]
    fn a_dead_store_is_reported_as_such() {
        let (s, ep) = server(1);
        let c = StoreClient::connect_to(&ep, 0, 1, deadline()).expect("connect");
        drop(s);
        let err = c.set("k", b"v", deadline()).expect_err("server gone");
        assert!(matches!(
            err,
            CommError::StoreIo { .. } | CommError::StoreUnreachable { .. }
        ));
        assert!(err.to_string().contains("rank 0"), "{err}");
    }

    #[test]
    fn next_round_counts_per_name() {
        let (_s, ep) = server(1);
        let c = StoreClient::connect_to(&ep, 0, 1, deadline()).expect("connect");
        assert_eq!(c.next_round("a"), 0);
        assert_eq!(c.next_round("a"), 1);
        assert_eq!(c.next_round("b"), 0);
        assert_eq!(c.clone().next_round("a"), 2);
    }

    #[test]
    fn barrier_names_missing_ranks_and_is_reusable() {
        let (_s, ep) = server(3);
        let clients: Vec<StoreClient> = (0..3)
            .map(|r| StoreClient::connect_to(&ep, r, 3, deadline()).expect("connect"))
            .collect();
        // Rank 2 stays away: ranks 0 and 1 time out naming it.
        let err = clients[0]
            .barrier("b", Deadline::after(Duration::from_millis(100)))
            .expect_err("rank 2 absent");
        match &err {
            CommError::BarrierTimeout { missing, name, .. } => {
                assert_eq!(name, "b");
                assert_eq!(missing, &vec![1, 2]);
            }
            other => panic!("unexpected {other}"),
        }
        // A full round on a fresh name works, twice in a row.
        for _ in 0..2 {
            std::thread::scope(|s| {
                let handles: Vec<_> = clients
                    .iter()
                    .map(|c| s.spawn(move || c.barrier("full", deadline())))
                    .collect();
                for h in handles {
                    h.join().expect("thread").expect("barrier");
                }
            });
        }
    }
}
