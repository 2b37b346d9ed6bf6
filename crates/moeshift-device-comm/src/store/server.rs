//! [`StoreServer`]: the key-value store that rank 0 hosts for the job.
//!
//! One accept thread plus one thread per client connection. Blocking requests (`get`,
//! `wait`) park their connection's thread on a condition variable until the keys appear or
//! the client's timeout passes. Dropping the server stops accepting new connections, refuses
//! requests that would have to wait for a key, keeps answering the others for a grace period
//! of at most a second (or until every client has hung up), then closes every connection and
//! joins every thread.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::wire::{read_body, write_msg, Request, Response};

/// How long a server thread may block writing an answer to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `drop` keeps serving clients that are still connected before closing them.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The rendezvous store's server, normally started by rank 0 through
/// [`StoreClient::connect`](crate::StoreClient::connect).
///
/// ```
/// use moeshift_device_comm::{StoreClient, StoreServer};
/// use moeshift_sync::Deadline;
/// use std::time::Duration;
///
/// let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), 1)?;
/// let endpoint = server.local_addr().to_string();
/// let deadline = Deadline::after(Duration::from_secs(10));
/// let client = StoreClient::connect_to(&endpoint, 0, 1, deadline)?;
/// client.set("answer", b"42", deadline)?;
/// assert_eq!(client.get("answer", deadline)?, b"42");
/// # Ok::<(), moeshift_device_comm::CommError>(())
/// ```
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    world_size: usize,
    data: Mutex<Data>,
    changed: Condvar,
    conns: Mutex<Conns>,
    stopping: AtomicBool,
}

#[derive(Default)]
struct Data {
    map: HashMap<String, Vec<u8>>,
    closing: bool,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    streams: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `bind` (port 0 picks a free port) and serves a job of `world_size` ranks:
    /// a client announcing another world size, or a rank outside it, is refused.
    pub fn start(bind: SocketAddr, world_size: usize) -> Result<Self, crate::CommError> {
        let bind_err = |source: io::Error| crate::CommError::StoreBind {
            rank: 0,
            addr: bind.to_string(),
            source,
        };
        let listener = TcpListener::bind(bind).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared {
            world_size,
            data: Mutex::new(Data::default()),
            changed: Condvar::new(),
            conns: Mutex::new(Conns::default()),
            stopping: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("moeshift-store-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|source| crate::CommError::Io {
                context: "rank 0: starting the rendezvous store's accept thread".into(),
                source,
            })?;
        Ok(Self {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of keys currently stored.
    pub fn num_keys(&self) -> usize {
        self.shared.data.lock().map.len()
    }
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreServer({})", self.addr)
    }
}

/// The address to connect to in order to wake the accept thread.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
        }
        other => other,
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.data.lock().closing = true;
        self.shared.changed.notify_all();

        // Wake the accept thread with a connection of our own; if that fails the thread is
        // left to end with the process rather than joined forever.
        let woke =
            TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1)).is_ok();
        if let Some(t) = self.accept_thread.take() {
            if woke {
                let _ = t.join();
            }
        }

        // Clients get a grace period to send their last requests and hang up: a rank whose
        // final barrier was completed by rank 0's own arrival may not even have asked yet.
        // Requests that would have to wait for a key are refused from now on.
        let threads = std::mem::take(&mut self.shared.conns.lock().threads);
        let until = Instant::now() + CLOSE_GRACE;
        while Instant::now() < until && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(2));
        }
        for s in self.shared.conns.lock().streams.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or an aborted handshake: pause instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let mut conns = shared.conns.lock();
        conns.threads.retain(|t| !t.is_finished());
        let id = conns.next_id;
        conns.next_id += 1;
        conns.streams.insert(id, registered);
        let conn_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("moeshift-store-conn".into())
            .spawn(move || serve(stream, id, conn_shared));
        match spawned {
            Ok(handle) => conns.threads.push(handle),
            Err(_) => {
                conns.streams.remove(&id);
            }
        }
    }
}

fn serve(stream: TcpStream, id: u64, shared: Arc<Shared>) {
    let mut reader = &stream;
    let mut writer = &stream;
    while let Ok(Some(body)) = read_body(&mut reader) {
        let (resp, keep_going) = match Request::decode(&body) {
            Ok(req) => (handle(&shared, req), true),
            Err(e) => (Response::Error(format!("malformed request: {e}")), false),
        };
        let sent = resp
            .encode()
            .and_then(|bytes| write_msg(&mut writer, &bytes));
        if sent.is_err() || !keep_going {
            break;
        }
    }
    shared.conns.lock().streams.remove(&id);
}

fn deadline_from_ms(timeout_ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(timeout_ms))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

const CLOSING: &str = "the store is shutting down (rank 0, which hosts it, is exiting)";

fn handle(shared: &Shared, req: Request) -> Response {
    match req {
        Request::Hello { rank, world_size } => {
            if world_size as usize != shared.world_size {
                Response::Error(format!(
                    "rank {rank} announced a world of {world_size} ranks, but the store serves a world of {}",
                    shared.world_size
                ))
            } else if rank as usize >= shared.world_size {
                Response::Error(format!(
                    "rank {rank} is outside the world of {} ranks",
                    shared.world_size
                ))
            } else {
                Response::Ok
            }
        }
        Request::Set { key, value } => {
            shared.data.lock().map.insert(key, value);
            shared.changed.notify_all();
            Response::Ok
        }
        Request::TryGet { key } => match shared.data.lock().map.get(&key) {
            Some(v) => Response::Value(v.clone()),
            None => Response::NotFound,
        },
        Request::Delete { key } => {
            let existed = shared.data.lock().map.remove(&key).is_some();
            Response::Bool(existed)
        }
        Request::Add { key, delta } => {
            let mut data = shared.data.lock();
            let current = match data.map.get(&key) {
                None => 0,
                Some(v) => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(n) => n,
                    None => {
                        return Response::Error(format!(
                            "key {key:?} holds a value that is not a decimal integer"
                        ))
                    }
                },
            };
            let Some(next) = current.checked_add(delta) else {
                return Response::Error(format!(
                    "adding {delta} to key {key:?} (= {current}) overflows i64"
                ));
            };
            data.map.insert(key, next.to_string().into_bytes());
            drop(data);
            shared.changed.notify_all();
            Response::Int(next)
        }
        Request::Get { key, timeout_ms } => {
            let until = deadline_from_ms(timeout_ms);
            let mut data = shared.data.lock();
            loop {
                if let Some(v) = data.map.get(&key) {
                    return Response::Value(v.clone());
                }
                if data.closing {
                    return Response::Error(CLOSING.into());
                }
                if shared.changed.wait_until(&mut data, until).timed_out()
                    && !data.map.contains_key(&key)
                {
                    return Response::NotFound;
                }
            }
        }
        Request::Wait { keys, timeout_ms } => {
            let until = deadline_from_ms(timeout_ms);
            let mut data = shared.data.lock();
            loop {
                let missing: Vec<String> = keys
                    .iter()
                    .filter(|k| !data.map.contains_key(k.as_str()))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Response::Ok;
                }
                if data.closing {
                    return Response::Error(CLOSING.into());
                }
                if Instant::now() >= until {
                    return Response::Missing(missing);
                }
                let _ = shared.changed.wait_until(&mut data, until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(world: usize) -> Shared {
        Shared {
            world_size: world,
            data: Mutex::new(Data::default()),
            changed: Condvar::new(),
            conns: Mutex::new(Conns::default()),
            stopping: AtomicBool::new(false),
        }
    }

    #[test]
    fn hello_checks_world_size_and_rank() {
        let s = shared(4);
        assert_eq!(
            handle(
                &s,
                Request::Hello {
                    rank: 3,
                    world_size: 4
                }
            ),
            Response::Ok
        );
        let Response::Error(msg) = handle(
            &s,
            Request::Hello {
                rank: 1,
                world_size: 2,
            },
        ) else {
            panic!("world size 2 against 4 must be refused");
        };
        assert!(
            msg.contains("rank 1") && msg.contains('2') && msg.contains('4'),
            "{msg}"
        );
        assert!(matches!(
            handle(
                &s,
                Request::Hello {
                    rank: 4,
                    world_size: 4
                }
            ),
            Response::Error(_)
        ));
    }

    #[test]
    fn add_counts_in_decimal_and_refuses_non_integers() {
        let s = shared(1);
        let add = |d| {
            handle(
                &s,
                Request::Add {
                    key: "c".into(),
                    delta: d,
                },
            )
        };
        assert_eq!(add(5), Response::Int(5));
        assert_eq!(add(-7), Response::Int(-2));
        assert_eq!(
            handle(&s, Request::TryGet { key: "c".into() }),
            Response::Value(b"-2".to_vec())
        );
        handle(
            &s,
            Request::Set {
                key: "c".into(),
                value: b"xyz".to_vec(),
            },
        );
        assert!(matches!(add(1), Response::Error(m) if m.contains("\"c\"")));
        handle(
            &s,
            Request::Set {
                key: "c".into(),
                value: i64::MAX.to_string().into_bytes(),
            },
        );
        assert!(matches!(add(1), Response::Error(m) if m.contains("overflow")));
    }

    #[test]
    fn get_and_wait_time_out_with_the_missing_keys() {
        let s = shared(1);
        handle(
            &s,
            Request::Set {
                key: "a".into(),
                value: vec![],
            },
        );
        assert_eq!(
            handle(
                &s,
                Request::Get {
                    key: "b".into(),
                    timeout_ms: 20
                }
            ),
            Response::NotFound
        );
        assert_eq!(
            handle(
                &s,
                Request::Wait {
                    keys: vec!["a".into(), "b".into(), "c".into()],
                    timeout_ms: 20
                }
            ),
            Response::Missing(vec!["b".into(), "c".into()])
        );
        assert_eq!(
            handle(&s, Request::Delete { key: "a".into() }),
            Response::Bool(true)
        );
        assert_eq!(
            handle(&s, Request::Delete { key: "a".into() }),
            Response::Bool(false)
        );
    }

    #[test]
    fn a_waiting_get_is_woken_by_a_set() {
        let s = Arc::new(shared(1));
        let waiter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                handle(
                    &s,
                    Request::Get {
                        key: "k".into(),
                        timeout_ms: 10_000,
                    },
                )
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        handle(
            &s,
            Request::Set {
                key: "k".into(),
                value: b"v".to_vec(),
            },
        );
        assert_eq!(
            waiter.join().expect("waiter"),
            Response::Value(b"v".to_vec())
        );
    }

    #[test]
    fn closing_releases_waiters_with_an_error() {
        let s = Arc::new(shared(1));
        let waiter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                handle(
                    &s,
                    Request::Wait {
                        keys: vec!["never".into()],
                        timeout_ms: 60_000,
                    },
                )
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        s.data.lock().closing = true;
        s.changed.notify_all();
        let started = Instant::now();
        assert!(
            matches!(waiter.join().expect("waiter"), Response::Error(m) if m.contains("shutting down"))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn clients_finish_their_last_requests_while_the_server_closes() {
        use crate::StoreClient;
        use moeshift_sync::Deadline;
        let server = StoreServer::start("127.0.0.1:0".parse().expect("addr"), 1).expect("start");
        let ep = server.local_addr().to_string();
        let d = || Deadline::after(Duration::from_secs(5));
        let client = StoreClient::connect_to(&ep, 0, 1, d()).expect("connect");
        client.set("k", b"v", d()).expect("set");
        let late = std::thread::spawn(move || {
            // Asks only after the server has started closing.
            std::thread::sleep(Duration::from_millis(150));
            let present = client.wait(&["k"], d());
            let started = Instant::now();
            let absent = client.get("never", d());
            (present, absent, started.elapsed())
        });
        drop(server);
        let (present, absent, waited) = late.join().expect("client thread");
        assert!(present.is_ok(), "{present:?}");
        let err = absent.expect_err("a missing key cannot be waited for any more");
        assert!(err.to_string().contains("shutting down"), "{err}");
        assert!(waited < Duration::from_secs(2));
    }

    #[test]
    fn dropping_the_server_joins_its_threads_quickly() {
        let server = StoreServer::start("127.0.0.1:0".parse().expect("addr"), 1).expect("start");
        let idle = TcpStream::connect(server.local_addr()).expect("connect");
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        drop(server);
        // A client that never hangs up costs at most the grace period.
        assert!(started.elapsed() < CLOSE_GRACE + Duration::from_secs(1));
        // The idle client sees the connection closed.
        let mut buf = [0u8; 1];
        idle.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(matches!(
            std::io::Read::read(&mut &idle, &mut buf),
            Ok(0) | Err(_)
        ));
    }
}
