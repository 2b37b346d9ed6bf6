//! Forming a host group's full mesh of TCP connections through the rendezvous store.
//!
//! Each member listens on an ephemeral port of the interface that reaches the store and
//! publishes `ip:port` under the group's keys. A member connects to every lower-ranked member
//! and accepts a connection from every higher-ranked one. The connecting side sends a hello
//! (its ranks, the rank it wants, the group size and a hash of the member list); the
//! accepting side checks it against its own view of the group and answers. Connections for
//! another group are turned away without failing this one; a member that disagrees about the
//! group's membership fails both sides with a message saying how.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use moeshift_sync::Deadline;

use super::frame::{FrameHeader, OpKind, HEADER_LEN};
use crate::error::{CommError, RankRef};
use crate::net::{connect_with_retry, endpoint, resolve, set_timeouts};
use crate::store::StoreClient;

/// FNV-1a, 64 bits: stable across builds and platforms, unlike `std`'s hasher.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hash of a member list (global ranks in group order).
pub(crate) fn members_hash(members: &[usize]) -> u64 {
    let mut bytes = Vec::with_capacity(members.len() * 8);
    for m in members {
        bytes.extend_from_slice(&(*m as u64).to_le_bytes());
    }
    fnv1a(&bytes)
}

/// Everything needed to form one group's mesh.
pub(crate) struct MeshPlan<'a> {
    pub store: &'a StoreClient,
    pub name: &'a str,
    pub key_prefix: String,
    pub group_id: u64,
    pub members: &'a [usize],
    pub me: usize,
}

struct Hello {
    from_local: u64,
    from_global: u64,
    to_local: u64,
    size: u64,
    members_hash: u64,
}

const HELLO_LEN: usize = 40;
const MAX_ACK_LEN: u64 = 64 * 1024;

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        for (i, v) in [
            self.from_local,
            self.from_global,
            self.to_local,
            self.size,
            self.members_hash,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != HELLO_LEN {
            return None;
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(Self {
            from_local: w(0),
            from_global: w(1),
            to_local: w(2),
            size: w(3),
            members_hash: w(4),
        })
    }
}

fn write_frame(stream: &mut TcpStream, header: FrameHeader, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(payload);
    stream.write_all(&buf)?;
    stream.flush()
}

fn read_frame(stream: &mut TcpStream, max_payload: u64) -> io::Result<(FrameHeader, Vec<u8>)> {
    let mut hbuf = [0u8; HEADER_LEN];
    stream.read_exact(&mut hbuf)?;
    let header = FrameHeader::decode(&hbuf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if header.payload_len > max_payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handshake payload of {} bytes", header.payload_len),
        ));
    }
    let mut payload = vec![0u8; header.payload_len as usize];
    stream.read_exact(&mut payload)?;
    Ok((header, payload))
}

impl MeshPlan<'_> {
    fn rank_ref(&self, local: usize) -> RankRef {
        RankRef {
            local,
            global: self.members.get(local).copied().unwrap_or(usize::MAX),
        }
    }

    fn addr_key(&self, local: usize) -> String {
        format!("{}addr/{local}", self.key_prefix)
    }

    fn setup_err(&self, detail: String) -> CommError {
        CommError::GroupSetup {
            group: self.name.to_string(),
            rank: self.rank_ref(self.me),
            detail,
        }
    }

    fn header(&self, kind: OpKind, len: usize) -> FrameHeader {
        FrameHeader {
            kind,
            code: 0,
            group_id: self.group_id,
            seq: 0,
            aux: 0,
            payload_len: len as u64,
        }
    }

    /// Forms the mesh: one stream per other member, indexed by group rank.
    pub fn run(&self, deadline: Deadline) -> Result<Vec<Option<TcpStream>>, CommError> {
        let size = self.members.len();
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        if size == 1 {
            return Ok(streams);
        }
        let ip = self.store.local_ip();
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| self.setup_err(format!("cannot listen on {ip}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| self.setup_err(format!("listener address: {e}")))?
            .port();
        self.store.set(
            &self.addr_key(self.me),
            endpoint(ip, port).as_bytes(),
            deadline,
        )?;

        // Connect to every lower rank.
        let lower: Vec<String> = (0..self.me).map(|j| self.addr_key(j)).collect();
        let missing = self.store.wait_missing(&lower, deadline)?;
        if !missing.is_empty() {
            let missing = (0..self.me)
                .filter(|j| missing.contains(&self.addr_key(*j)))
                .map(|j| self.rank_ref(j))
                .collect();
            return Err(CommError::GroupSetupTimeout {
                group: self.name.to_string(),
                rank: self.rank_ref(self.me),
                missing,
            });
        }
        for (j, slot) in streams.iter_mut().enumerate().take(self.me) {
            *slot = Some(self.connect_to(j, deadline)?);
        }

        // Accept every higher rank.
        listener
            .set_nonblocking(true)
            .map_err(|e| self.setup_err(format!("listener: {e}")))?;
        let mut pause = Duration::from_millis(1);
        while streams
            .iter()
            .enumerate()
            .any(|(j, s)| j > self.me && s.is_none())
        {
            match listener.accept() {
                Ok((stream, from)) => {
                    pause = Duration::from_millis(1);
                    if let Some((j, s)) = self.accept_one(stream, from, &streams, deadline)? {
                        streams[j] = Some(s);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_expired() {
                        let missing = (self.me + 1..size)
                            .filter(|j| streams[*j].is_none())
                            .map(|j| self.rank_ref(j))
                            .collect();
                        return Err(CommError::GroupSetupTimeout {
                            group: self.name.to_string(),
                            rank: self.rank_ref(self.me),
                            missing,
                        });
                    }
                    std::thread::sleep(pause.min(deadline.remaining()));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.setup_err(format!("accept failed: {e}"))),
            }
        }
        Ok(streams)
    }

    fn connect_to(&self, j: usize, deadline: Deadline) -> Result<TcpStream, CommError> {
        let peer = self.rank_ref(j);
        let raw = self.store.get(&self.addr_key(j), deadline)?;
        let ep = String::from_utf8_lossy(&raw).into_owned();
        let addrs = resolve(&ep)
            .map_err(|e| self.setup_err(format!("{peer} published a bad address {ep:?}: {e}")))?;
        let mut stream = connect_with_retry(&addrs, deadline).map_err(|f| {
            self.setup_err(format!(
                "could not connect to {peer} at {ep}: {} (after {} attempts)",
                f.last_error, f.attempts
            ))
        })?;
        let hello = Hello {
            from_local: self.me as u64,
            from_global: self.members[self.me] as u64,
            to_local: j as u64,
            size: self.members.len() as u64,
            members_hash: members_hash(self.members),
        };
        let io_fail =
            |e: io::Error| self.setup_err(format!("handshake with {peer} at {ep} failed: {e}"));
        set_timeouts(&stream, deadline).map_err(io_fail)?;
        write_frame(
            &mut stream,
            self.header(OpKind::Hello, HELLO_LEN),
            &hello.encode(),
        )
        .map_err(io_fail)?;
        let (header, payload) = read_frame(&mut stream, MAX_ACK_LEN).map_err(io_fail)?;
        if header.kind != OpKind::HelloAck || header.group_id != self.group_id {
            return Err(self.setup_err(format!(
                "{peer} at {ep} answered the handshake with {} for group id {:#018x}",
                header.kind, header.group_id
            )));
        }
        match payload.split_first() {
            Some((0, _)) => Ok(stream),
            Some((_, reason)) => Err(self.setup_err(format!(
                "{peer} refused the connection: {}",
                String::from_utf8_lossy(reason)
            ))),
            None => Err(self.setup_err(format!("{peer} sent an empty handshake answer"))),
        }
    }

    fn answer(&self, stream: &mut TcpStream, refusal: Option<&str>) -> io::Result<()> {
        let mut payload = vec![u8::from(refusal.is_some())];
        if let Some(r) = refusal {
            payload.extend_from_slice(r.as_bytes());
        }
        write_frame(
            stream,
            self.header(OpKind::HelloAck, payload.len()),
            &payload,
        )
    }

    /// Checks one incoming connection. `Ok(None)` turns a stranger away and keeps waiting;
    /// an error means the group itself is inconsistent.
    fn accept_one(
        &self,
        mut stream: TcpStream,
        from: SocketAddr,
        streams: &[Option<TcpStream>],
        deadline: Deadline,
    ) -> Result<Option<(usize, TcpStream)>, CommError> {
        if stream.set_nonblocking(false).is_err() {
            return Ok(None);
        }
        // A stranger that never speaks must not hold up the group for long.
        let hello_deadline = deadline.min_after(Duration::from_secs(5));
        if set_timeouts(&stream, hello_deadline).is_err() {
            return Ok(None);
        }
        let Ok((header, payload)) = read_frame(&mut stream, HELLO_LEN as u64) else {
            return Ok(None);
        };
        if header.kind != OpKind::Hello {
            return Ok(None);
        }
        if header.group_id != self.group_id {
            let _ = self.answer(
                &mut stream,
                Some(&format!(
                    "this port belongs to group {:?} (id {:#018x}), not to group id {:#018x}",
                    self.name, self.group_id, header.group_id
                )),
            );
            return Ok(None);
        }
        let Some(hello) = Hello::decode(&payload) else {
            let _ = self.answer(&mut stream, Some("malformed hello"));
            return Ok(None);
        };
        let me = self.rank_ref(self.me);
        let size = self.members.len();
        let claimed = format!(
            "rank {} (global rank {}) at {from}",
            hello.from_local, hello.from_global
        );
        let problem = if hello.size != size as u64
            || hello.members_hash != members_hash(self.members)
        {
            Some(format!(
                "{claimed} formed group {:?} with {} members, but {me} formed it with members {:?} (global ranks); every member must pass the same member list",
                self.name, hello.size, self.members
            ))
        } else if hello.to_local != self.me as u64 {
            Some(format!(
                "{claimed} wanted group rank {}, but reached {me}",
                hello.to_local
            ))
        } else if hello.from_local <= self.me as u64 || hello.from_local >= size as u64 {
            Some(format!(
                "{claimed} is not a higher rank of a group of {size}"
            ))
        } else if self.members[hello.from_local as usize] as u64 != hello.from_global {
            Some(format!(
                "{claimed} claims group rank {} but that is global rank {} here",
                hello.from_local, self.members[hello.from_local as usize]
            ))
        } else if streams[hello.from_local as usize].is_some() {
            Some(format!("{claimed} connected twice"))
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = self.answer(&mut stream, Some(&problem));
            return Err(self.setup_err(problem));
        }
        self.answer(&mut stream, None).map_err(|e| {
            self.setup_err(format!(
                "answering the handshake of {} failed: {e}",
                self.rank_ref(hello.from_local as usize)
            ))
        })?;
        Ok(Some((hello.from_local as usize, stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_test_vectors() {
        // Vectors from the FNV reference test suite (64-bit FNV-1a).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn member_order_changes_the_hash() {
        assert_ne!(members_hash(&[0, 1, 2]), members_hash(&[0, 2, 1]));
        assert_ne!(members_hash(&[0, 1]), members_hash(&[0, 1, 2]));
        assert_eq!(members_hash(&[3, 5]), members_hash(&[3, 5]));
    }

    #[test]
    fn hello_roundtrips_and_rejects_bad_lengths() {
        let h = Hello {
            from_local: 3,
            from_global: 7,
            to_local: 1,
            size: 4,
            members_hash: 99,
        };
        let back = Hello::decode(&h.encode()).expect("decode");
        assert_eq!(
            (
                back.from_local,
                back.from_global,
                back.to_local,
                back.size,
                back.members_hash
            ),
            (3, 7, 1, 4, 99)
        );
        assert!(Hello::decode(&[0u8; 39]).is_none());
    }
}
