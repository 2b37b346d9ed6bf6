//! Small TCP helpers shared by the store and the host transport: name resolution, connecting
//! with retries until a deadline, and socket timeouts that never mean "forever".

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use moeshift_sync::Deadline;

/// Shortest socket timeout ever set: zero would mean "block forever".
pub(crate) const MIN_SOCKET_TIMEOUT: Duration = Duration::from_millis(1);

/// Resolves `host:port` (IPv6 literals bracketed) to socket addresses, IPv4 first.
pub(crate) fn resolve(endpoint: &str) -> io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = endpoint.to_socket_addrs()?.collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.dedup();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{endpoint} resolves to no address"),
        ));
    }
    Ok(addrs)
}

/// Formats an IP and port as an endpoint string that [`resolve`] accepts.
pub(crate) fn endpoint(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Why [`connect_with_retry`] gave up.
pub(crate) struct ConnectFailure {
    pub attempts: u32,
    pub last_error: String,
}

/// Connects to any of `addrs`, retrying (with a growing pause, at most 200 ms) until the
/// deadline: the other side may not be listening yet.
pub(crate) fn connect_with_retry(
    addrs: &[SocketAddr],
    deadline: Deadline,
) -> Result<TcpStream, ConnectFailure> {
    let mut attempts = 0u32;
    let mut last_error = String::from("no attempt made before the deadline");
    let mut pause = Duration::from_millis(5);
    loop {
        for addr in addrs {
            if deadline.is_expired() && attempts > 0 {
                break;
            }
            attempts += 1;
            let timeout = deadline
                .remaining_at_least(Duration::from_millis(50))
                .min(Duration::from_secs(5));
            match TcpStream::connect_timeout(addr, timeout) {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        if deadline.is_expired() {
            return Err(ConnectFailure {
                attempts,
                last_error,
            });
        }
        std::thread::sleep(pause.min(deadline.remaining()));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sets read and write timeouts on `stream` to what is left of `deadline` (never zero).
pub(crate) fn set_timeouts(stream: &TcpStream, deadline: Deadline) -> io::Result<()> {
    let t = deadline.remaining_at_least(MIN_SOCKET_TIMEOUT);
    stream.set_read_timeout(Some(t))?;
    stream.set_write_timeout(Some(t))
}

/// True for the error kinds a socket timeout produces.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn resolves_ipv4_and_bracketed_ipv6() {
        let v4 = resolve("127.0.0.1:80").expect("v4 literal");
        assert_eq!(
            v4,
            vec!["127.0.0.1:80".parse::<SocketAddr>().expect("addr")]
        );
        let v6 = resolve("[::1]:80").expect("v6 literal");
        assert!(v6[0].is_ipv6());
        assert_eq!(endpoint("::1".parse().expect("ip"), 80), "[::1]:80");
    }

    #[test]
    fn connect_retries_until_the_listener_appears() {
        // Reserve a port, free it, and only start listening on it after a delay.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let l = TcpListener::bind(addr).expect("rebind reserved port");
            l.set_nonblocking(false).expect("blocking");
            let _ = l.accept();
        });
        let stream = connect_with_retry(&[addr], Deadline::after(Duration::from_secs(10)));
        assert!(
            stream.is_ok(),
            "connect should succeed once the listener is up"
        );
        server.join().expect("server thread");
    }

    #[test]
    fn connect_gives_up_at_the_deadline() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let start = Instant::now();
        let Err(failure) = connect_with_retry(&[addr], Deadline::after(Duration::from_millis(200)))
        else {
            panic!("nothing listens on {addr}");
        };
        assert!(failure.attempts >= 2, "should have retried");
        assert!(failure.last_error.contains(&addr.to_string()));
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
