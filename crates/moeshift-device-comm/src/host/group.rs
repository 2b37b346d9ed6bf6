//! [`HostGroup`]: the host (TCP) transport over a full mesh of the group's ranks.

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moeshift_sync::Deadline;
use moeshift_tensor::HostBuffer;
use parking_lot::Mutex;

use super::frame::{describe_header, Expect, FrameHeader, OpKind};
use super::peer::{reader_loop, LinkState, Post, PostState, Shared};
use super::reduce::{code_of, encode, fold, ReduceOp, Reducible};
use super::setup::{fnv1a, MeshPlan};
use super::target::RawTarget;
use crate::error::{CommError, RankRef};
use crate::net::is_timeout;
use crate::store::{StoreClient, INTERNAL_PREFIX};

/// Payloads up to this size are sent in one write together with their header.
const COALESCE_LIMIT: usize = 64 * 1024;
/// Most bytes handed to one `write` call.
const WRITE_CHUNK: usize = 8 * 1024 * 1024;
/// Socket send timeout: how often a blocked send wakes to check the deadline and the peers.
const SEND_POLL: Duration = Duration::from_millis(50);
/// How long a failed send waits for the reader to say how the connection ended.
const LINK_NEWS_WAIT: Duration = Duration::from_millis(200);
/// How long a failing rank spends telling its peers why.
const ABORT_BUDGET: Duration = Duration::from_millis(500);

/// A group of ranks connected by a full mesh of TCP connections: the host transport, in the
/// role Gloo plays for PyTorch. It carries control messages, load statistics and host-staged
/// tensors.
///
/// Ranks inside a group are group-local (`0..size()`); errors name both the group rank and
/// the global rank. Every operation takes a [`Deadline`]. Operations on one group run one
/// at a time (calls from several threads are serialized) and every member must call the
/// same operations in the same order, as with any collective library.
///
/// How it behaves under load and failure:
/// - each connection has a reader thread that drains it, so the sends and receives of an
///   operation overlap and large messages in both directions never deadlock; a message
///   that arrives before any call wants it waits in memory (so a sender far ahead of its
///   receiver costs memory, not a deadlock);
/// - a receive into a caller's buffer ([`recv_into`](Self::recv_into),
///   [`broadcast`](Self::broadcast), the `_into` collectives) lands directly in that
///   buffer, without an intermediate copy, when the call is made before the data arrives
///   or shortly after (a large message waits up to about its own transfer time, at most
///   50 ms, for its buffer before it is buffered in memory instead);
/// - sends are written in chunks of at most 8 MiB with `TCP_NODELAY`; small messages go
///   out in one write with their header;
/// - every frame carries a header (magic, operation kind, group id, sequence number,
///   payload size); a peer that called a different operation, or the same one with other
///   sizes, yields [`CommError::Mismatch`] naming both operations;
/// - a peer whose connection closes (exit, kill, reset) yields [`CommError::PeerLost`]
///   naming it as soon as an operation needs it; a deadline that passes yields
///   [`CommError::Timeout`] naming the peers still awaited;
/// - after any failure the group is unusable ([`CommError::Poisoned`]) and this rank tells
///   its peers why, so they fail at once with [`CommError::PeerAborted`] instead of waiting
///   for their own deadlines.
///
/// ```
/// use moeshift_device_comm::{HostGroup, ReduceOp, StoreClient, World};
/// use moeshift_sync::Deadline;
/// use std::time::Duration;
///
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// let world = World::single_node(0, 1, "127.0.0.1", port)?;
/// let deadline = Deadline::after(Duration::from_secs(10));
/// let store = StoreClient::connect(&world, deadline)?;
/// let group = HostGroup::world(&store, deadline)?;
/// let gathered = group.all_gather(b"hi", deadline)?;
/// assert_eq!(gathered, vec![b"hi".to_vec()]);
/// let mut load = [1.5f64, 2.0];
/// group.all_reduce(&mut load, ReduceOp::Sum, deadline)?;
/// assert_eq!(load, [1.5, 2.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HostGroup {
    name: String,
    id: u64,
    me: usize,
    members: Vec<usize>,
    store: StoreClient,
    shared: Arc<Shared>,
    writers: Vec<Option<TcpStream>>,
    readers: Vec<JoinHandle<()>>,
    ops: Mutex<OpState>,
}

struct OpState {
    send_seq: Vec<u64>,
    recv_seq: Vec<u64>,
    /// A frame to this peer was cut off half-way: the stream is out of step.
    broken_stream: Vec<bool>,
    count: u64,
    poisoned: Option<String>,
}

/// One frame an operation sends.
struct SendPart<'a> {
    peer: usize,
    header: FrameHeader,
    payload: &'a [u8],
}

/// Where a received payload goes.
enum Dest<'a> {
    /// Into this buffer (its length is the expected size).
    Into(&'a mut [u8]),
    /// Into a new vector returned to the caller.
    Owned,
}

/// One frame an operation receives.
struct RecvPart<'a> {
    peer: usize,
    expect: Expect,
    dest: Dest<'a>,
}

/// Cancels an operation's posted receive buffers on every exit path. See `target.rs` for
/// why `drop` may not return while a reader is filling one of them.
struct PostGuard<'g> {
    shared: &'g Shared,
    writers: &'g [Option<TcpStream>],
    /// Peers with a buffer of this operation posted.
    peers: Vec<usize>,
    /// Peers whose next message this operation claimed without a buffer.
    claims: Vec<usize>,
}

impl Drop for PostGuard<'_> {
    fn drop(&mut self) {
        let mut inboxes = self.shared.inboxes.lock();
        for &p in &self.claims {
            if let Some(inbox) = inboxes.get_mut(p) {
                inbox.claimed = None;
            }
        }
        if self.peers.is_empty() {
            return;
        }
        let mut shut = vec![false; self.writers.len()];
        loop {
            let mut filling = false;
            for &p in &self.peers {
                let Some(inbox) = inboxes.get_mut(p) else {
                    continue;
                };
                match inbox.post.as_ref().map(|post| post.state) {
                    Some(PostState::Filling) => {
                        filling = true;
                        // The operation is giving up while the reader writes into the
                        // caller's buffer: cut the connection so the read fails now.
                        if !shut[p] {
                            if let Some(Some(w)) = self.writers.get(p) {
                                let _ = w.shutdown(Shutdown::Both);
                            }
                            shut[p] = true;
                        }
                    }
                    Some(_) => inbox.post = None,
                    None => {}
                }
            }
            if !filling {
                return;
            }
            let _ = self
                .shared
                .changed
                .wait_for(&mut inboxes, Duration::from_millis(100));
        }
    }
}

impl HostGroup {
    /// Forms the group of all ranks of the world (named `"world"`). Every rank calls it.
    pub fn world(store: &StoreClient, deadline: Deadline) -> Result<Self, CommError> {
        let members: Vec<usize> = (0..store.world_size()).collect();
        Self::from_store(store, "world", &members, deadline)
    }

    /// Forms a group of the given global ranks, in that order (group rank `i` is global
    /// rank `members[i]`). Only the members call it, with the same name and member list.
    /// Forming groups of one name several times is fine as long as every member does it the
    /// same number of times in the same order.
    pub fn from_store(
        store: &StoreClient,
        name: &str,
        members: &[usize],
        deadline: Deadline,
    ) -> Result<Self, CommError> {
        let context = || format!("rank {}: forming host group {name:?}", store.rank());
        let bad = |detail: String| CommError::InvalidArgument {
            context: context(),
            detail,
        };
        if members.is_empty() {
            return Err(bad("a group needs at least one member".into()));
        }
        let mut seen = vec![false; store.world_size()];
        for &m in members {
            match seen.get_mut(m) {
                None => {
                    return Err(bad(format!(
                        "global rank {m} is outside the world of {} ranks",
                        store.world_size()
                    )))
                }
                Some(true) => return Err(bad(format!("global rank {m} is listed twice"))),
                Some(s) => *s = true,
            }
        }
        let me = members
            .iter()
            .position(|&m| m == store.rank())
            .ok_or_else(|| {
                bad(format!(
                    "this rank ({}) is not among the members {members:?}",
                    store.rank()
                ))
            })?;
        let round = store.next_round(&format!("hostgroup/{name}"));
        let key_prefix = format!("{INTERNAL_PREFIX}hostgroup/{name}/{round}/");
        let id = fnv1a(format!("{name}#{round}").as_bytes());
        let plan = MeshPlan {
            store,
            name,
            key_prefix,
            group_id: id,
            members,
            me,
        };
        let streams = plan.run(deadline)?;
        Self::start(name, id, me, members.to_vec(), store.clone(), streams)
    }

    fn start(
        name: &str,
        id: u64,
        me: usize,
        members: Vec<usize>,
        store: StoreClient,
        streams: Vec<Option<TcpStream>>,
    ) -> Result<Self, CommError> {
        let size = members.len();
        let shared = Arc::new(Shared::new(id, size));
        let mut group = Self {
            name: name.to_string(),
            id,
            me,
            members,
            store,
            shared,
            writers: Vec::with_capacity(size),
            readers: Vec::with_capacity(size),
            ops: Mutex::new(OpState {
                send_seq: vec![0; size],
                recv_seq: vec![0; size],
                broken_stream: vec![false; size],
                count: 0,
                poisoned: None,
            }),
        };
        // `group` owns what is started so far: an error below drops it, which closes the
        // sockets and joins the readers already running.
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                group.writers.push(None);
                continue;
            };
            let (me_ref, peer_ref) = (group.rank_ref(me), group.rank_ref(peer));
            let io_err = |e: io::Error| CommError::GroupSetup {
                group: name.to_string(),
                rank: me_ref,
                detail: format!("configuring the connection to {peer_ref}: {e}"),
            };
            stream.set_nodelay(true).map_err(io_err)?;
            stream.set_read_timeout(None).map_err(io_err)?;
            stream.set_write_timeout(Some(SEND_POLL)).map_err(io_err)?;
            let reader = stream.try_clone().map_err(io_err)?;
            group.writers.push(Some(stream));
            let shared = Arc::clone(&group.shared);
            let handle = std::thread::Builder::new()
                .name(format!("msh-hg-rd{peer}"))
                .spawn(move || reader_loop(shared, peer, reader))
                .map_err(io_err)?;
            group.readers.push(handle);
        }
        Ok(group)
    }

    /// Forms a sub-group of this group's ranks `ranks` (group-local, in the order given:
    /// the sub-group's rank `i` is this group's rank `ranks[i]`). Only the listed ranks call
    /// it, with the same list.
    pub fn new_subgroup(
        &self,
        ranks: &[usize],
        deadline: Deadline,
    ) -> Result<HostGroup, CommError> {
        let mut members = Vec::with_capacity(ranks.len());
        for &r in ranks {
            let g = self
                .members
                .get(r)
                .copied()
                .ok_or_else(|| CommError::InvalidArgument {
                    context: format!(
                        "group {:?} {}: new_subgroup",
                        self.name,
                        self.rank_ref(self.me)
                    ),
                    detail: format!("rank {r} is outside this group of {} ranks", self.size()),
                })?;
            members.push(g);
        }
        let name = format!("{}/{ranks:?}", self.name);
        Self::from_store(&self.store, &name, &members, deadline)
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's id (a hash of its name and formation round), carried in every frame.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This rank's rank inside the group.
    pub fn rank(&self) -> usize {
        self.me
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Global ranks of the members, indexed by group rank.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The global rank of group rank `rank`, if it is a member.
    pub fn global_rank(&self, rank: usize) -> Option<usize> {
        self.members.get(rank).copied()
    }

    /// The store the group was formed through.
    pub fn store(&self) -> &StoreClient {
        &self.store
    }

    fn rank_ref(&self, local: usize) -> RankRef {
        RankRef {
            local,
            global: self.members.get(local).copied().unwrap_or(usize::MAX),
        }
    }

    fn invalid(&self, op: &str, detail: String) -> CommError {
        CommError::InvalidArgument {
            context: format!("group {:?} {}: {op}", self.name, self.rank_ref(self.me)),
            detail,
        }
    }

    fn check_peer(&self, op: &str, what: &str, peer: usize) -> Result<(), CommError> {
        if peer >= self.size() {
            return Err(self.invalid(
                op,
                format!(
                    "{what} rank {peer} is outside the group of {} ranks",
                    self.size()
                ),
            ));
        }
        if peer == self.me {
            return Err(self.invalid(op, format!("{what} rank {peer} is this rank itself")));
        }
        Ok(())
    }

    fn check_count(&self, op: &str, what: &str, n: usize) -> Result<(), CommError> {
        if n != self.size() {
            return Err(self.invalid(
                op,
                format!("{n} {what} for a group of {} ranks", self.size()),
            ));
        }
        Ok(())
    }

    /// Peers in the order this rank sends to them: starting after itself, so that ranks do
    /// not all start with the same receiver.
    fn peers_in_send_order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.size();
        (1..n).map(move |k| (self.me + k) % n)
    }

    fn header(
        &self,
        st: &mut OpState,
        peer: usize,
        kind: OpKind,
        code: u8,
        aux: u64,
        len: usize,
    ) -> FrameHeader {
        let seq = st.send_seq[peer];
        st.send_seq[peer] += 1;
        FrameHeader {
            kind,
            code,
            group_id: self.id,
            seq,
            aux,
            payload_len: len as u64,
        }
    }

    fn expect(
        st: &mut OpState,
        peer: usize,
        kind: OpKind,
        code: u8,
        aux: u64,
        len: Option<usize>,
    ) -> Expect {
        let seq = st.recv_seq[peer];
        st.recv_seq[peer] += 1;
        Expect {
            kind,
            code,
            seq,
            aux,
            len: len.map(|l| l as u64),
        }
    }

    /// Runs one operation: refuses it on a failed group, numbers it, and poisons the group
    /// when it fails for any reason other than bad arguments.
    fn run<R>(
        &self,
        kind: &str,
        f: impl FnOnce(&mut OpState, &str) -> Result<R, CommError>,
    ) -> Result<R, CommError> {
        let mut st = self.ops.lock();
        let op = format!("{kind} #{}", st.count);
        st.count += 1;
        if let Some(cause) = &st.poisoned {
            return Err(CommError::Poisoned {
                group: self.name.clone(),
                rank: self.rank_ref(self.me),
                op,
                cause: cause.clone(),
            });
        }
        let result = f(&mut st, &op);
        if let Err(e) = &result {
            if !matches!(e, CommError::InvalidArgument { .. }) {
                self.poison(&mut st, e);
            }
        }
        result
    }

    /// Marks the group failed and tells every peer why (best effort, within a short budget).
    fn poison(&self, st: &mut OpState, err: &CommError) {
        if st.poisoned.is_some() {
            return;
        }
        let reason = err.to_string();
        st.poisoned = Some(reason.clone());
        let budget = Deadline::after(ABORT_BUDGET);
        let open: Vec<bool> = {
            let inboxes = self.shared.inboxes.lock();
            inboxes.iter().map(|i| i.link == LinkState::Open).collect()
        };
        for peer in self.peers_in_send_order() {
            let Some(Some(w)) = self.writers.get(peer) else {
                continue;
            };
            if st.broken_stream[peer] || !open.get(peer).copied().unwrap_or(false) {
                // The peer's stream is out of step or already gone: closing it is the
                // clearest signal left.
                let _ = w.shutdown(Shutdown::Write);
                continue;
            }
            let header = FrameHeader {
                kind: OpKind::Abort,
                code: 0,
                group_id: self.id,
                seq: 0,
                aux: 0,
                payload_len: reason.len() as u64,
            };
            let mut frame = header.encode().to_vec();
            frame.extend_from_slice(reason.as_bytes());
            let mut off = 0;
            while off < frame.len() && !budget.is_expired() {
                match (&*w).write(&frame[off..]) {
                    Ok(0) => break,
                    Ok(n) => off += n,
                    Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if off < frame.len() {
                st.broken_stream[peer] = true;
                let _ = w.shutdown(Shutdown::Write);
            }
        }
    }

    /// Waits (at most `limit`) until the reader of `peer` has reported how its connection
    /// ended.
    fn await_link_news(&self, peer: usize, limit: Duration) {
        let until = Instant::now() + limit;
        let mut inboxes = self.shared.inboxes.lock();
        while inboxes.get(peer).is_some_and(|i| i.link == LinkState::Open) {
            if self
                .shared
                .changed
                .wait_until(&mut inboxes, until)
                .timed_out()
            {
                return;
            }
        }
    }

    /// The error for an operation that needs `peer` when its link is down, if it is.
    fn link_error(&self, peer: usize, op: &str) -> Option<CommError> {
        let link = self.shared.inboxes.lock().get(peer).map(|i| i.link.clone());
        match link {
            Some(LinkState::Lost(detail)) => Some(self.lost(peer, op, detail)),
            Some(LinkState::Aborted(reason)) => Some(self.aborted(peer, op, reason)),
            _ => None,
        }
    }

    fn lost(&self, peer: usize, op: &str, detail: String) -> CommError {
        CommError::PeerLost {
            group: self.name.clone(),
            rank: self.rank_ref(self.me),
            peer: self.rank_ref(peer),
            op: op.to_string(),
            detail,
        }
    }

    fn aborted(&self, peer: usize, op: &str, reason: String) -> CommError {
        CommError::PeerAborted {
            group: self.name.clone(),
            rank: self.rank_ref(self.me),
            peer: self.rank_ref(peer),
            op: op.to_string(),
            reason,
        }
    }

    /// Writes one frame to `part.peer`, waking every [`SEND_POLL`] to check the deadline and
    /// the receiver's connection.
    fn send_part(
        &self,
        st: &mut OpState,
        op: &str,
        part: &SendPart<'_>,
        started: Instant,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let peer = part.peer;
        let Some(Some(stream)) = self.writers.get(peer) else {
            return Err(self.invalid(op, format!("no connection to rank {peer}")));
        };
        let header = part.header.encode();
        let coalesced: Vec<u8>;
        let pieces: [&[u8]; 2] = if part.payload.len() <= COALESCE_LIMIT {
            let mut v = Vec::with_capacity(header.len() + part.payload.len());
            v.extend_from_slice(&header);
            v.extend_from_slice(part.payload);
            coalesced = v;
            [coalesced.as_slice(), &[]]
        } else {
            [&header[..], part.payload]
        };
        let total = header.len() + part.payload.len();
        let mut written = 0usize;
        for piece in pieces {
            let mut off = 0;
            while off < piece.len() {
                let end = piece.len().min(off + WRITE_CHUNK);
                match (&*stream).write(&piece[off..end]) {
                    Ok(0) => {
                        st.broken_stream[peer] |= written > 0;
                        return Err(self.lost(
                            peer,
                            op,
                            "the connection accepts no more data".into(),
                        ));
                    }
                    Ok(n) => {
                        off += n;
                        written += n;
                    }
                    Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                        // Only the receiver's own failure cuts a frame short: another peer's
                        // failure is reported once this frame is complete, so that the
                        // stream stays in step and can still carry this rank's abort.
                        if let Some(err) = self.link_error(peer, op) {
                            st.broken_stream[peer] |= written > 0;
                            return Err(err);
                        }
                        if deadline.is_expired() {
                            st.broken_stream[peer] |= written > 0;
                            return Err(CommError::Timeout {
                                group: self.name.clone(),
                                rank: self.rank_ref(self.me),
                                op: format!("{op} (sending {written} of {total} bytes)"),
                                waiting_for: vec![self.rank_ref(peer)],
                                waited: started.elapsed(),
                            });
                        }
                    }
                    Err(e) => {
                        st.broken_stream[peer] |= written > 0;
                        // The reader knows better why the connection is gone (the peer may
                        // have sent its reason just before closing): give it a moment.
                        self.await_link_news(peer, LINK_NEWS_WAIT);
                        return Err(self.link_error(peer, op).unwrap_or_else(|| {
                            self.lost(
                                peer,
                                op,
                                format!("sending {total} bytes failed after {written}: {e} (the peer process exited or was killed)"),
                            )
                        }));
                    }
                }
            }
        }
        Ok(())
    }

    /// The engine of every operation: posts the receive buffers, sends every frame, then
    /// collects every receive. Returns the payloads of [`Dest::Owned`] receives, in order.
    fn exchange(
        &self,
        st: &mut OpState,
        op: &str,
        sends: &[SendPart<'_>],
        recvs: &mut [RecvPart<'_>],
        deadline: Deadline,
    ) -> Result<Vec<Option<Vec<u8>>>, CommError> {
        let started = Instant::now();
        let mut guard = PostGuard {
            shared: &self.shared,
            writers: &self.writers,
            peers: Vec::new(),
            claims: Vec::new(),
        };
        {
            let mut inboxes = self.shared.inboxes.lock();
            for r in recvs.iter_mut() {
                let Some(inbox) = inboxes.get_mut(r.peer) else {
                    continue;
                };
                match &mut r.dest {
                    Dest::Into(buf)
                        if !buf.is_empty()
                            && inbox.queue.is_empty()
                            && inbox.post.is_none()
                            && inbox.link == LinkState::Open =>
                    {
                        inbox.post = Some(Post {
                            expect: r.expect,
                            target: RawTarget::new(buf),
                            state: PostState::Waiting,
                        });
                        guard.peers.push(r.peer);
                    }
                    _ => {
                        inbox.claimed = Some(r.expect.seq);
                        guard.claims.push(r.peer);
                    }
                }
            }
        }
        self.shared.notify();

        for part in sends {
            // A peer that is gone cannot take this frame. (Other peers that are gone may
            // have finished their part of this operation already; the receive loop below
            // decides whether their absence matters.)
            if let Some(err) = self.link_error(part.peer, op) {
                return Err(err);
            }
            self.send_part(st, op, part, started, deadline)?;
        }

        let mut out: Vec<Option<Vec<u8>>> = recvs.iter().map(|_| None).collect();
        let mut done = vec![false; recvs.len()];
        let mut inboxes = self.shared.inboxes.lock();
        // Whether the last wait already watched for news without sleeping.
        let mut spun = false;
        loop {
            let mut pending = Vec::new();
            for (i, r) in recvs.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                let peer = r.peer;
                let Some(inbox) = inboxes.get_mut(peer) else {
                    return Err(self.invalid(op, format!("no inbox for rank {peer}")));
                };
                let ours = guard.peers.contains(&peer);
                match inbox.post.as_ref().map(|p| p.state) {
                    Some(PostState::Done) if ours => {
                        inbox.post = None;
                        guard.peers.retain(|&p| p != peer);
                        done[i] = true;
                        continue;
                    }
                    Some(PostState::Filling) if ours => {
                        pending.push(peer);
                        continue;
                    }
                    Some(PostState::Failed) if ours => {
                        let detail = match &inbox.link {
                            LinkState::Lost(d) | LinkState::Aborted(d) => d.clone(),
                            LinkState::Open => "the connection broke inside a message".into(),
                        };
                        return Err(self.lost(peer, op, detail));
                    }
                    _ => {}
                }
                if let Some(msg) = inbox.queue.pop_front() {
                    if !r.expect.matches(&msg.header) {
                        let mut expected = r.expect.describe();
                        if r.expect.kind == OpKind::Send {
                            expected = format!("recv of {expected}");
                        }
                        return Err(CommError::Mismatch {
                            group: self.name.clone(),
                            rank: self.rank_ref(self.me),
                            peer: self.rank_ref(peer),
                            expected: format!("{op}, expecting {expected}"),
                            got: describe_header(&msg.header),
                        });
                    }
                    if ours {
                        inbox.post = None;
                        guard.peers.retain(|&p| p != peer);
                    }
                    match &mut r.dest {
                        Dest::Into(buf) => {
                            // Copy without holding the lock: readers keep draining meanwhile.
                            parking_lot::MutexGuard::unlocked(&mut inboxes, || {
                                buf.copy_from_slice(&msg.payload);
                            });
                        }
                        Dest::Owned => out[i] = Some(msg.payload),
                    }
                    done[i] = true;
                    continue;
                }
                match &inbox.link {
                    LinkState::Lost(d) => return Err(self.lost(peer, op, d.clone())),
                    LinkState::Aborted(reason) => {
                        return Err(self.aborted(peer, op, reason.clone()))
                    }
                    LinkState::Open => pending.push(peer),
                }
            }
            if pending.is_empty() {
                return Ok(out);
            }
            if deadline.is_expired() {
                pending.sort_unstable();
                pending.dedup();
                return Err(CommError::Timeout {
                    group: self.name.clone(),
                    rank: self.rank_ref(self.me),
                    op: op.to_string(),
                    waiting_for: pending.into_iter().map(|p| self.rank_ref(p)).collect(),
                    waited: started.elapsed(),
                });
            }
            if !spun {
                // Watch for news briefly with the lock released, then look again (under the
                // lock, so a change in between is never missed) before sleeping.
                spun = true;
                let seen = self.shared.generation.load(Ordering::Acquire);
                parking_lot::MutexGuard::unlocked(&mut inboxes, || {
                    self.shared.spin_for_news(seen, deadline.instant())
                });
                continue;
            }
            spun = false;
            let _ = self
                .shared
                .changed
                .wait_until(&mut inboxes, deadline.instant());
        }
    }

    /// Sends `data` to group rank `dst`, which receives it with [`recv`](Self::recv) or
    /// [`recv_into`](Self::recv_into). Returns once the data is handed to the connection.
    pub fn send(&self, dst: usize, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
        self.check_peer("send", "destination", dst)?;
        self.run("send", |st, op| {
            let header = self.header(st, dst, OpKind::Send, 0, 0, data.len());
            let sends = [SendPart {
                peer: dst,
                header,
                payload: data,
            }];
            self.exchange(st, op, &sends, &mut [], deadline).map(|_| ())
        })
    }

    /// Receives the next message group rank `src` sent with [`send`](Self::send), whatever
    /// its size.
    pub fn recv(&self, src: usize, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        self.check_peer("recv", "source", src)?;
        self.run("recv", |st, op| {
            let expect = Self::expect(st, src, OpKind::Send, 0, 0, None);
            let mut recvs = [RecvPart {
                peer: src,
                expect,
                dest: Dest::Owned,
            }];
            let mut out = self.exchange(st, op, &[], &mut recvs, deadline)?;
            Ok(out.pop().flatten().unwrap_or_default())
        })
    }

    /// Receives the next message from group rank `src` into `buf`; its size must be
    /// `buf.len()` (else [`CommError::Mismatch`]).
    pub fn recv_into(
        &self,
        src: usize,
        buf: &mut [u8],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.check_peer("recv_into", "source", src)?;
        self.run("recv", |st, op| {
            let expect = Self::expect(st, src, OpKind::Send, 0, 0, Some(buf.len()));
            let mut recvs = [RecvPart {
                peer: src,
                expect,
                dest: Dest::Into(buf),
            }];
            self.exchange(st, op, &[], &mut recvs, deadline).map(|_| ())
        })
    }

    /// Sends the bytes of a [`HostBuffer`] to group rank `dst` (as [`send`](Self::send)).
    pub fn send_buffer(
        &self,
        dst: usize,
        buf: &HostBuffer,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.send(dst, buf.as_slice(), deadline)
    }

    /// Receives the next message from group rank `src` into a [`HostBuffer`] of exactly its
    /// size (as [`recv_into`](Self::recv_into)); the bytes land in the buffer directly when
    /// the receive is posted before they arrive.
    pub fn recv_into_buffer(
        &self,
        src: usize,
        buf: &mut HostBuffer,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.recv_into(src, buf.as_mut_slice(), deadline)
    }

    /// Sends `send` to `dst` and receives a message of exactly `recv.len()` bytes from
    /// `src`, both at once (a ring step; `dst` and `src` may be the same rank). Matches the
    /// peers' [`send`](Self::send)/[`recv`](Self::recv) calls as well as their own
    /// `send_recv`.
    pub fn send_recv(
        &self,
        dst: usize,
        send: &[u8],
        src: usize,
        recv: &mut [u8],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.check_peer("send_recv", "destination", dst)?;
        self.check_peer("send_recv", "source", src)?;
        self.run("send_recv", |st, op| {
            let expect = Self::expect(st, src, OpKind::Send, 0, 0, Some(recv.len()));
            let header = self.header(st, dst, OpKind::Send, 0, 0, send.len());
            let sends = [SendPart {
                peer: dst,
                header,
                payload: send,
            }];
            let mut recvs = [RecvPart {
                peer: src,
                expect,
                dest: Dest::Into(recv),
            }];
            self.exchange(st, op, &sends, &mut recvs, deadline)
                .map(|_| ())
        })
    }

    /// Returns once every rank of the group has entered the barrier.
    pub fn barrier(&self, deadline: Deadline) -> Result<(), CommError> {
        self.run("barrier", |st, op| {
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let sends: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::Barrier, 0, 0, 0),
                    payload: &[],
                })
                .collect();
            let mut recvs: Vec<RecvPart<'_>> = peers
                .iter()
                .map(|&p| RecvPart {
                    peer: p,
                    expect: Self::expect(st, p, OpKind::Barrier, 0, 0, Some(0)),
                    dest: Dest::Owned,
                })
                .collect();
            self.exchange(st, op, &sends, &mut recvs, deadline)
                .map(|_| ())
        })
    }

    /// Copies `buf` of group rank `root` into `buf` of every other rank. Every rank passes a
    /// buffer of the same length (else [`CommError::Mismatch`]).
    pub fn broadcast(
        &self,
        root: usize,
        buf: &mut [u8],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        if root >= self.size() {
            return Err(self.invalid(
                "broadcast",
                format!("root {root} is outside the group of {} ranks", self.size()),
            ));
        }
        self.run("broadcast", |st, op| {
            if root == self.me {
                let peers: Vec<usize> = self.peers_in_send_order().collect();
                let sends: Vec<SendPart<'_>> = peers
                    .iter()
                    .map(|&p| SendPart {
                        peer: p,
                        header: self.header(st, p, OpKind::Broadcast, 0, root as u64, buf.len()),
                        payload: &*buf,
                    })
                    .collect();
                self.exchange(st, op, &sends, &mut [], deadline).map(|_| ())
            } else {
                let expect =
                    Self::expect(st, root, OpKind::Broadcast, 0, root as u64, Some(buf.len()));
                let mut recvs = [RecvPart {
                    peer: root,
                    expect,
                    dest: Dest::Into(buf),
                }];
                self.exchange(st, op, &[], &mut recvs, deadline).map(|_| ())
            }
        })
    }

    /// Broadcasts bytes whose size only the root knows: the root passes `Some(data)` and
    /// gets a copy back; the others pass `None` and get the root's data.
    pub fn broadcast_bytes(
        &self,
        root: usize,
        data: Option<&[u8]>,
        deadline: Deadline,
    ) -> Result<Vec<u8>, CommError> {
        if root >= self.size() {
            return Err(self.invalid(
                "broadcast",
                format!("root {root} is outside the group of {} ranks", self.size()),
            ));
        }
        if root == self.me && data.is_none() {
            return Err(self.invalid("broadcast", "the root must pass the data".into()));
        }
        self.run("broadcast", |st, op| match data {
            Some(data) if root == self.me => {
                let peers: Vec<usize> = self.peers_in_send_order().collect();
                let sends: Vec<SendPart<'_>> = peers
                    .iter()
                    .map(|&p| SendPart {
                        peer: p,
                        header: self.header(st, p, OpKind::Broadcast, 0, root as u64, data.len()),
                        payload: data,
                    })
                    .collect();
                self.exchange(st, op, &sends, &mut [], deadline)?;
                Ok(data.to_vec())
            }
            _ => {
                let expect = Self::expect(st, root, OpKind::Broadcast, 0, root as u64, None);
                let mut recvs = [RecvPart {
                    peer: root,
                    expect,
                    dest: Dest::Owned,
                }];
                let mut out = self.exchange(st, op, &[], &mut recvs, deadline)?;
                Ok(out.pop().flatten().unwrap_or_default())
            }
        })
    }

    /// Gathers every rank's `data` (sizes may differ) on every rank, indexed by group rank.
    pub fn all_gather(&self, data: &[u8], deadline: Deadline) -> Result<Vec<Vec<u8>>, CommError> {
        self.run("all_gather", |st, op| {
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let sends: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::AllGather, 0, 0, data.len()),
                    payload: data,
                })
                .collect();
            let mut recvs: Vec<RecvPart<'_>> = peers
                .iter()
                .map(|&p| RecvPart {
                    peer: p,
                    expect: Self::expect(st, p, OpKind::AllGather, 0, 0, None),
                    dest: Dest::Owned,
                })
                .collect();
            let got = self.exchange(st, op, &sends, &mut recvs, deadline)?;
            let mut out: Vec<Vec<u8>> = vec![Vec::new(); self.size()];
            out[self.me] = data.to_vec();
            for (p, payload) in peers.into_iter().zip(got) {
                out[p] = payload.unwrap_or_default();
            }
            Ok(out)
        })
    }

    /// Gathers every rank's `data`, all of one size, into `out` (`size() * data.len()`
    /// bytes, rank `i`'s part at `i * data.len()`). A rank with another size is a
    /// [`CommError::Mismatch`].
    pub fn all_gather_into(
        &self,
        data: &[u8],
        out: &mut [u8],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let n = data.len();
        if out.len() != n * self.size() {
            return Err(self.invalid(
                "all_gather_into",
                format!(
                    "output of {} bytes for {} ranks × {n} bytes",
                    out.len(),
                    self.size()
                ),
            ));
        }
        self.run("all_gather", |st, op| {
            let mut parts: Vec<Option<&mut [u8]>> = if n == 0 {
                (0..self.size()).map(|_| None).collect()
            } else {
                out.chunks_mut(n).map(Some).collect()
            };
            if let Some(Some(own)) = parts.get_mut(self.me) {
                own.copy_from_slice(data);
            }
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let sends: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::AllGather, 0, 0, n),
                    payload: data,
                })
                .collect();
            let mut recvs: Vec<RecvPart<'_>> = Vec::with_capacity(peers.len());
            for &p in &peers {
                let expect = Self::expect(st, p, OpKind::AllGather, 0, 0, Some(n));
                let dest = match parts.get_mut(p).and_then(Option::take) {
                    Some(buf) => Dest::Into(buf),
                    None => Dest::Owned,
                };
                recvs.push(RecvPart {
                    peer: p,
                    expect,
                    dest,
                });
            }
            self.exchange(st, op, &sends, &mut recvs, deadline)
                .map(|_| ())
        })
    }

    /// Sends `sends[j]` to group rank `j` and returns what every rank sent to this one,
    /// indexed by source rank (sizes may differ and may be zero). `sends[rank()]` is
    /// returned to itself.
    pub fn all_to_all_v(
        &self,
        sends: &[&[u8]],
        deadline: Deadline,
    ) -> Result<Vec<Vec<u8>>, CommError> {
        self.check_count("all_to_all_v", "send buffers", sends.len())?;
        self.run("all_to_all_v", |st, op| {
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let parts: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::AllToAllV, 0, 0, sends[p].len()),
                    payload: sends[p],
                })
                .collect();
            let mut recvs: Vec<RecvPart<'_>> = peers
                .iter()
                .map(|&p| RecvPart {
                    peer: p,
                    expect: Self::expect(st, p, OpKind::AllToAllV, 0, 0, None),
                    dest: Dest::Owned,
                })
                .collect();
            let got = self.exchange(st, op, &parts, &mut recvs, deadline)?;
            let mut out: Vec<Vec<u8>> = vec![Vec::new(); self.size()];
            out[self.me] = sends[self.me].to_vec();
            for (p, payload) in peers.into_iter().zip(got) {
                out[p] = payload.unwrap_or_default();
            }
            Ok(out)
        })
    }

    /// Like [`all_to_all_v`](Self::all_to_all_v), receiving into `recvs[j]`, whose length is
    /// the size rank `j` must send here (else [`CommError::Mismatch`] naming both sizes).
    pub fn all_to_all_v_into(
        &self,
        sends: &[&[u8]],
        recvs: &mut [&mut [u8]],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.check_count("all_to_all_v_into", "send buffers", sends.len())?;
        self.check_count("all_to_all_v_into", "receive buffers", recvs.len())?;
        if recvs[self.me].len() != sends[self.me].len() {
            return Err(self.invalid(
                "all_to_all_v_into",
                format!(
                    "this rank sends itself {} bytes but expects {}",
                    sends[self.me].len(),
                    recvs[self.me].len()
                ),
            ));
        }
        self.run("all_to_all_v", |st, op| {
            recvs[self.me].copy_from_slice(sends[self.me]);
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let parts: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::AllToAllV, 0, 0, sends[p].len()),
                    payload: sends[p],
                })
                .collect();
            let mut slots: Vec<Option<&mut [u8]>> =
                recvs.iter_mut().map(|b| Some(&mut **b)).collect();
            let mut rparts: Vec<RecvPart<'_>> = Vec::with_capacity(peers.len());
            for &p in &peers {
                let Some(buf) = slots.get_mut(p).and_then(Option::take) else {
                    continue;
                };
                let expect = Self::expect(st, p, OpKind::AllToAllV, 0, 0, Some(buf.len()));
                rparts.push(RecvPart {
                    peer: p,
                    expect,
                    dest: Dest::Into(buf),
                });
            }
            self.exchange(st, op, &parts, &mut rparts, deadline)
                .map(|_| ())
        })
    }

    /// Reduces `data` element-wise across the group with `op`, leaving the result in `data`
    /// on every rank. Every rank passes the same element type and length (else
    /// [`CommError::Mismatch`]). Contributions are combined in rank order, so float results
    /// are bit-identical everywhere; an integer sum that overflows is an error on every rank.
    pub fn all_reduce<T: Reducible>(
        &self,
        data: &mut [T],
        op: ReduceOp,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let code = code_of::<T>(op);
        let count = data.len() as u64;
        let mine = encode(data);
        let gathered = self.run("all_reduce", |st, name| {
            let peers: Vec<usize> = self.peers_in_send_order().collect();
            let sends: Vec<SendPart<'_>> = peers
                .iter()
                .map(|&p| SendPart {
                    peer: p,
                    header: self.header(st, p, OpKind::AllReduce, code, count, mine.len()),
                    payload: &mine,
                })
                .collect();
            let mut recvs: Vec<RecvPart<'_>> = peers
                .iter()
                .map(|&p| RecvPart {
                    peer: p,
                    expect: Self::expect(st, p, OpKind::AllReduce, code, count, Some(mine.len())),
                    dest: Dest::Owned,
                })
                .collect();
            let got = self.exchange(st, name, &sends, &mut recvs, deadline)?;
            let mut all: Vec<Vec<u8>> = vec![Vec::new(); self.size()];
            for (p, payload) in peers.into_iter().zip(got) {
                all[p] = payload.unwrap_or_default();
            }
            Ok(all)
        })?;
        let contributions: Vec<&[u8]> = gathered
            .iter()
            .enumerate()
            .map(|(r, v)| {
                if r == self.me {
                    mine.as_slice()
                } else {
                    v.as_slice()
                }
            })
            .collect();
        fold(&contributions, op, data).map_err(|at| {
            self.invalid(
                "all_reduce",
                format!("the {op} of {} overflows at element {at}", T::NAME),
            )
        })
    }
}

impl std::fmt::Debug for HostGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostGroup({:?}, rank {}/{}, members {:?})",
            self.name,
            self.me,
            self.size(),
            self.members
        )
    }
}

impl Drop for HostGroup {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.notify();
        for w in self.writers.iter().flatten() {
            let _ = w.shutdown(Shutdown::Both);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreServer;

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(20))
    }

    /// Runs `body` as `n` ranks on threads of this process, each with its own store client
    /// and world group; returns each rank's result.
    fn ranks<R: Send>(n: usize, body: impl Fn(HostGroup) -> R + Sync) -> Vec<R> {
        let server = StoreServer::start("127.0.0.1:0".parse().expect("addr"), n).expect("store");
        let ep = server.local_addr().to_string();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let (ep, body) = (&ep, &body);
                    s.spawn(move || {
                        let store =
                            StoreClient::connect_to(ep, r, n, deadline()).expect("store client");
                        let group = HostGroup::world(&store, deadline()).expect("world group");
                        body(group)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    }

    #[test]
    fn collectives_produce_the_expected_values() {
        let n = 3;
        let results = ranks(n, |g| {
            let r = g.rank();
            g.barrier(deadline()).expect("barrier");
            // all_gather with sizes that differ per rank (rank r sends r+1 bytes of value r).
            let gathered = g
                .all_gather(&vec![r as u8; r + 1], deadline())
                .expect("all_gather");
            let expected: Vec<Vec<u8>> = (0..n).map(|j| vec![j as u8; j + 1]).collect();
            assert_eq!(gathered, expected);
            // broadcast from rank 1.
            let mut buf = if r == 1 { *b"from-one" } else { [0u8; 8] };
            g.broadcast(1, &mut buf, deadline()).expect("broadcast");
            assert_eq!(&buf, b"from-one");
            // all_to_all_v: rank r sends j bytes of value 10r+j to rank j.
            let parts: Vec<Vec<u8>> = (0..n).map(|j| vec![(10 * r + j) as u8; j]).collect();
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let got = g.all_to_all_v(&refs, deadline()).expect("all_to_all_v");
            for (j, part) in got.iter().enumerate() {
                assert_eq!(part, &vec![(10 * j + r) as u8; r]);
            }
            // all_reduce sums: ranks contribute r and 2^r.
            let mut v = [r as i64, 1i64 << r];
            g.all_reduce(&mut v, ReduceOp::Sum, deadline())
                .expect("all_reduce");
            assert_eq!(v, [3, 7]);
            let mut f = [r as f32 * 0.5];
            g.all_reduce(&mut f, ReduceOp::Max, deadline())
                .expect("all_reduce max");
            assert_eq!(f, [1.0]);
            // ring send/recv.
            let next = (r + 1) % n;
            let prev = (r + n - 1) % n;
            let mut from_prev = [0u8; 2];
            g.send_recv(next, &[r as u8, 0xAA], prev, &mut from_prev, deadline())
                .expect("send_recv");
            assert_eq!(from_prev, [prev as u8, 0xAA]);
            r
        });
        assert_eq!(results, vec![0, 1, 2]);
    }

    #[test]
    fn a_receive_posted_before_or_after_the_data_gets_the_same_bytes() {
        ranks(2, |g| {
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            if g.rank() == 0 {
                // First message: sent before rank 1 posts (it sleeps), so it waits in memory.
                g.send(1, &payload, deadline()).expect("send early");
                // Second message: sent after rank 1 has posted its buffer.
                std::thread::sleep(Duration::from_millis(100));
                g.send(1, &payload, deadline()).expect("send late");
            } else {
                std::thread::sleep(Duration::from_millis(100));
                let mut a = vec![0u8; payload.len()];
                g.recv_into(0, &mut a, deadline()).expect("queued message");
                assert_eq!(a, payload);
                let mut b = vec![0u8; payload.len()];
                g.recv_into(0, &mut b, deadline()).expect("posted message");
                assert_eq!(b, payload);
            }
        });
    }

    #[test]
    fn host_buffers_travel_whole() {
        ranks(2, |g| {
            let len = 3 * 4096 + 5;
            if g.rank() == 0 {
                let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
                let buf = HostBuffer::from_bytes(&bytes).expect("host buffer");
                g.send_buffer(1, &buf, deadline()).expect("send buffer");
            } else {
                let mut buf = HostBuffer::zeroed(len).expect("host buffer");
                g.recv_into_buffer(0, &mut buf, deadline())
                    .expect("recv buffer");
                assert!(buf
                    .as_slice()
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i % 253) as u8));
            }
        });
    }

    #[test]
    fn big_messages_both_ways_at_once_do_not_deadlock() {
        ranks(2, |g| {
            let r = g.rank();
            let peer = 1 - r;
            let size = 24 << 20;
            let out = vec![r as u8 + 1; size];
            let mut back = vec![0u8; size];
            g.send_recv(peer, &out, peer, &mut back, deadline())
                .expect("exchange");
            assert!(back.iter().all(|&b| b == peer as u8 + 1));
        });
    }

    #[test]
    fn different_operations_are_a_mismatch_naming_both() {
        let errors = ranks(2, |g| {
            if g.rank() == 0 {
                g.all_gather(b"abcd", deadline()).expect_err("mismatch")
            } else {
                // As the root, rank 1 only sends, so its broadcast may well return; the
                // next call learns that rank 0 gave up, and why.
                let mut buf = [0u8; 4];
                match g.broadcast(1, &mut buf, deadline()) {
                    Err(e) => e,
                    Ok(()) => g.barrier(deadline()).expect_err("rank 0 aborted"),
                }
            }
        });
        let e0 = errors[0].to_string();
        assert!(matches!(errors[0], CommError::Mismatch { .. }), "{e0}");
        assert!(
            e0.contains("all_gather") && e0.contains("broadcast"),
            "{e0}"
        );
        assert!(e0.contains("rank 0") && e0.contains("rank 1"), "{e0}");
        // Rank 1 either finds rank 0's all_gather frame where it expected a barrier token,
        // or rank 0's abort; both name rank 0's operation.
        let e1 = errors[1].to_string();
        assert!(
            matches!(
                errors[1],
                CommError::Mismatch { .. } | CommError::PeerAborted { .. }
            ),
            "{e1}"
        );
        assert!(e1.contains("all_gather") && e1.contains("rank 0"), "{e1}");
    }

    #[test]
    fn different_sizes_are_a_mismatch_naming_both_sizes() {
        let errors = ranks(2, |g| {
            let n = if g.rank() == 0 { 8 } else { 12 };
            let mut out = vec![0u8; 2 * n];
            g.all_gather_into(&vec![1u8; n], &mut out, deadline())
                .expect_err("sizes differ")
        });
        for e in &errors {
            let text = e.to_string();
            assert!(matches!(e, CommError::Mismatch { .. }), "{text}");
            assert!(
                text.contains("8 bytes") && text.contains("12 bytes"),
                "{text}"
            );
        }
        // The mismatch names the peer on each side.
        assert!(
            errors[0].to_string().contains("rank 1 sent"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].to_string().contains("rank 0 sent"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn wrong_element_type_in_all_reduce_is_a_mismatch() {
        let errors = ranks(2, |g| {
            if g.rank() == 0 {
                let mut v = [1.0f64];
                g.all_reduce(&mut v, ReduceOp::Sum, deadline())
                    .expect_err("type")
            } else {
                let mut v = [1i64];
                g.all_reduce(&mut v, ReduceOp::Sum, deadline())
                    .expect_err("type")
            }
        });
        for e in &errors {
            let text = e.to_string();
            assert!(
                text.contains("sum of f64") && text.contains("sum of i64"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_silent_peer_times_out_by_name_and_poisons_the_group() {
        let errors = ranks(3, |g| {
            if g.rank() == 2 {
                // Never joins the all_gather; waits until the others gave up.
                std::thread::sleep(Duration::from_millis(600));
                return None;
            }
            let started = Instant::now();
            let err = g
                .all_gather(b"x", Deadline::after(Duration::from_millis(300)))
                .expect_err("rank 2 is silent");
            assert!(started.elapsed() < Duration::from_secs(5));
            let again = g.barrier(deadline()).expect_err("poisoned");
            assert!(matches!(again, CommError::Poisoned { .. }), "{again}");
            Some(err)
        });
        for e in errors.iter().take(2).flatten() {
            let text = e.to_string();
            // Either this rank timed out waiting for rank 2, or its peer did and said so.
            assert!(text.contains("rank 2"), "{text}");
        }
    }

    #[test]
    fn a_dropped_peer_is_lost_by_name_quickly() {
        let errors = ranks(2, |g| {
            if g.rank() == 1 {
                drop(g);
                return None;
            }
            let started = Instant::now();
            let err = g.recv(1, deadline()).expect_err("peer gone");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "took {:?}",
                started.elapsed()
            );
            Some(err)
        });
        let err = errors[0].as_ref().expect("rank 0's error");
        assert!(matches!(err, CommError::PeerLost { .. }), "{err}");
        assert!(err.to_string().contains("lost rank 1"), "{err}");
    }

    #[test]
    fn abort_reaches_ranks_that_were_not_waiting_for_the_silent_one() {
        // Rank 0 gives up waiting for rank 2; rank 1, which only waits for rank 0, learns
        // at once why instead of sitting out its own long deadline.
        let errors = ranks(3, |g| match g.rank() {
            0 => Some(
                g.recv(2, Deadline::after(Duration::from_millis(200)))
                    .expect_err("rank 2 is silent"),
            ),
            1 => {
                let started = Instant::now();
                let mut buf = [0u8; 4];
                let err = g
                    .broadcast(0, &mut buf, Deadline::after(Duration::from_secs(15)))
                    .expect_err("rank 0 aborts");
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "took {:?}",
                    started.elapsed()
                );
                Some(err)
            }
            _ => {
                std::thread::sleep(Duration::from_millis(800));
                None
            }
        });
        let e0 = errors[0].as_ref().expect("rank 0 error");
        assert!(matches!(e0, CommError::Timeout { .. }), "{e0}");
        assert!(e0.to_string().contains("waiting for rank 2"), "{e0}");
        let e1 = errors[1].as_ref().expect("rank 1 error");
        assert!(matches!(e1, CommError::PeerAborted { .. }), "{e1}");
        let text = e1.to_string();
        assert!(
            text.contains("rank 0 aborted") && text.contains("waiting for rank 2"),
            "{text}"
        );
    }

    #[test]
    fn a_timeout_while_a_large_message_lands_releases_the_buffer() {
        ranks(2, |g| {
            let size = 64 << 20;
            if g.rank() == 0 {
                let data = vec![7u8; size];
                // Rank 1 gives up half-way and cuts the connection: this send may fail.
                let _ = g.send(1, &data, deadline());
            } else {
                let mut buf = vec![0u8; size];
                let started = Instant::now();
                let err = g
                    .recv_into(0, &mut buf, Deadline::after(Duration::from_millis(5)))
                    .expect_err("too short a deadline for 64 MiB");
                assert!(
                    matches!(err, CommError::Timeout { .. } | CommError::PeerLost { .. }),
                    "{err}"
                );
                assert!(started.elapsed() < Duration::from_secs(5));
                // The buffer is ours again: writing it is fine.
                buf.fill(1);
            }
        });
    }

    #[test]
    fn subgroups_use_group_local_ranks_and_name_global_ones() {
        let out = ranks(4, |g| {
            let r = g.rank();
            // Odd ranks form a sub-group in reverse order: global 3 is its rank 0.
            if r % 2 == 1 {
                let sub = g.new_subgroup(&[3, 1], deadline()).expect("subgroup");
                assert_eq!(sub.size(), 2);
                assert_eq!(sub.members(), &[3, 1]);
                let gathered = sub
                    .all_gather(&[r as u8], deadline())
                    .expect("sub all_gather");
                assert_eq!(gathered, vec![vec![3u8], vec![1u8]]);
                Some(sub.rank())
            } else {
                let sub = g.new_subgroup(&[0, 2], deadline()).expect("subgroup");
                let mut v = [r as i64];
                sub.all_reduce(&mut v, ReduceOp::Sum, deadline())
                    .expect("sub all_reduce");
                assert_eq!(v, [2]);
                Some(sub.rank())
            }
        });
        assert_eq!(out, vec![Some(0), Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn bad_arguments_are_refused_without_poisoning() {
        ranks(2, |g| {
            let e = g.send(g.rank(), b"x", deadline()).expect_err("self send");
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            let e = g.send(5, b"x", deadline()).expect_err("out of range");
            assert!(e.to_string().contains("rank 5"), "{e}");
            let e = g
                .all_to_all_v(&[b"x"], deadline())
                .expect_err("one buffer for two ranks");
            assert!(
                e.to_string().contains("1 send buffers for a group of 2"),
                "{e}"
            );
            let e = g.new_subgroup(&[0, 9], deadline()).expect_err("rank 9");
            assert!(e.to_string().contains("rank 9"), "{e}");
            // The group still works.
            g.barrier(deadline()).expect("barrier after refused calls");
        });
    }

    #[test]
    fn integer_overflow_in_all_reduce_is_an_error_everywhere() {
        let errs = ranks(2, |g| {
            let mut v = [i64::MAX];
            g.all_reduce(&mut v, ReduceOp::Sum, deadline())
                .expect_err("overflow")
        });
        for e in errs {
            assert!(e.to_string().contains("overflows at element 0"), "{e}");
        }
    }
}
