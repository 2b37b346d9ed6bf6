//! Per-peer receive side of a host group: one reader thread per connection drains the socket
//! into that peer's [`Inbox`], so a peer's sends never block on this rank's progress, and a
//! broken connection is noticed at once, whatever operation is running.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::frame::{Expect, FrameHeader, OpKind, HEADER_LEN};
use super::target::RawTarget;

/// Messages at least this large wait a little for their receive buffer to be posted.
pub(crate) const HOLD_MIN_BYTES: u64 = 256 * 1024;
/// Longest such wait, and the rate that scales it: a message waits at most about as long
/// as it would take to arrive, so that a sender that runs ahead of its receiver (and would
/// otherwise cost a temporary buffer, its page faults and a second copy) loses little.
const HOLD_MAX: Duration = Duration::from_millis(50);
const HOLD_BYTES_PER_SEC: u64 = 2_000_000_000;

/// Largest message a peer may announce (a corrupted length fails instead of allocating).
pub(crate) const MAX_MESSAGE_BYTES: u64 = 1 << 40;
/// Longest abort reason kept.
pub(crate) const MAX_ABORT_REASON: u64 = 64 * 1024;

/// State shared by a group's operations and its reader threads.
pub(crate) struct Shared {
    pub group_id: u64,
    /// One inbox per group rank (this rank's own entry stays unused).
    pub inboxes: Mutex<Vec<Inbox>>,
    /// Signalled whenever any inbox changes (through [`Shared::notify`]).
    pub changed: Condvar,
    /// Bumped (after the change, outside the lock) whenever any inbox changes, so a waiter
    /// can watch for news for a few microseconds without sleeping on [`Shared::changed`].
    pub generation: AtomicU64,
    /// Set when the group is dropped: readers stop waiting and exit.
    pub closing: AtomicBool,
}

/// What this rank knows about its connection to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkState {
    Open,
    /// The connection broke or was closed; says how.
    Lost(String),
    /// The peer sent an abort with its reason.
    Aborted(String),
}

/// A complete message that no operation has claimed yet.
pub(crate) struct Message {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostState {
    /// Posted, the reader has not started on it.
    Waiting,
    /// The reader is writing the payload into the target.
    Filling,
    /// The payload is in the target.
    Done,
    /// The connection broke while filling.
    Failed,
}

/// A receive buffer an operation lent to the reader for the next message.
pub(crate) struct Post {
    pub expect: Expect,
    pub target: RawTarget,
    pub state: PostState,
}

/// Messages received from one peer, in order, plus at most one posted buffer.
pub(crate) struct Inbox {
    pub queue: VecDeque<Message>,
    pub post: Option<Post>,
    pub link: LinkState,
    /// An operation waits for the message with this sequence number and will take it from
    /// the queue (it has no buffer to post): the reader must not hold it back for a post.
    pub claimed: Option<u64>,
}

impl Inbox {
    pub fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            post: None,
            link: LinkState::Open,
            claimed: None,
        }
    }
}

impl Shared {
    pub fn new(group_id: u64, size: usize) -> Self {
        Self {
            group_id,
            inboxes: Mutex::new((0..size).map(|_| Inbox::new()).collect()),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    pub fn set_lost(&self, peer: usize, detail: String) {
        let mut inboxes = self.inboxes.lock();
        if let Some(inbox) = inboxes.get_mut(peer) {
            if inbox.link == LinkState::Open {
                inbox.link = LinkState::Lost(detail);
            }
        }
        drop(inboxes);
        self.notify();
    }

    /// Tells waiters that an inbox changed (call after releasing the lock).
    pub fn notify(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    /// Watches, without the lock, for a change after `seen` (a [`Shared::generation`]
    /// value) for at most [`SPIN_BEFORE_SLEEP`] or until `deadline`; true if one came. A
    /// message usually follows its sender's previous one within microseconds in the
    /// collectives' request/answer rounds, and waking from the condition variable would
    /// cost more than that.
    pub fn spin_for_news(&self, seen: u64, deadline: Instant) -> bool {
        let until = (Instant::now() + SPIN_BEFORE_SLEEP).min(deadline);
        loop {
            if self.generation.load(Ordering::Acquire) != seen {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

/// How long a waiting operation watches for news before sleeping on the condition variable.
pub(crate) const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Fills `buf`; `Ok(false)` when the stream ended cleanly before the first byte.
fn read_header(stream: &mut TcpStream, buf: &mut [u8; HEADER_LEN]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn describe_read_error(e: &io::Error, during: &str) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            format!("the connection closed {during} (the peer process exited or was killed)")
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => format!(
            "the connection was reset {during} (the peer process exited or was killed): {e}"
        ),
        _ => format!("reading {during} failed: {e}"),
    }
}

/// Reads a payload of `len` bytes into a new vector without zero-filling it first.
fn read_payload(stream: &mut TcpStream, len: u64) -> Result<Vec<u8>, String> {
    if len > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the peer announced a message of {len} bytes, above the limit of {MAX_MESSAGE_BYTES} (corrupted stream?)"
        ));
    }
    let n = usize::try_from(len)
        .map_err(|_| format!("a message of {len} bytes does not fit in memory"))?;
    let mut payload = Vec::new();
    payload
        .try_reserve_exact(n)
        .map_err(|e| format!("cannot allocate {n} bytes for a message: {e}"))?;
    match (&mut *stream).take(len).read_to_end(&mut payload) {
        Ok(got) if got == n => Ok(payload),
        Ok(got) => Err(format!(
            "the connection closed after {got} of {n} payload bytes (the peer process exited or was killed)"
        )),
        Err(e) => Err(describe_read_error(&e, "inside a message")),
    }
}

/// The reader thread's body: drains `stream` (from group rank `peer`) until it ends.
pub(crate) fn reader_loop(shared: Arc<Shared>, peer: usize, mut stream: TcpStream) {
    let failure = loop {
        let mut hbuf = [0u8; HEADER_LEN];
        match read_header(&mut stream, &mut hbuf) {
            Ok(true) => {}
            Ok(false) => {
                break "the connection closed (the peer process exited, was killed, or dropped the group)"
                    .to_string()
            }
            Err(e) => break describe_read_error(&e, "between messages"),
        }
        let header = match FrameHeader::decode(&hbuf) {
            Ok(h) => h,
            Err(e) => break format!("received a corrupt frame: {e}"),
        };
        if header.group_id != shared.group_id {
            break format!(
                "received a frame of group id {:#018x} on a connection of group id {:#018x} (streams crossed?)",
                header.group_id, shared.group_id
            );
        }
        match header.kind {
            OpKind::Abort => {
                let reason =
                    match read_payload(&mut stream, header.payload_len.min(MAX_ABORT_REASON)) {
                        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                        Err(e) => format!("(reason unreadable: {e})"),
                    };
                let mut inboxes = shared.inboxes.lock();
                if let Some(inbox) = inboxes.get_mut(peer) {
                    if inbox.link == LinkState::Open {
                        inbox.link = LinkState::Aborted(reason);
                    }
                }
                drop(inboxes);
                shared.notify();
                return;
            }
            OpKind::Hello | OpKind::HelloAck => {
                break format!(
                    "received a {} frame after the connection was set up (streams crossed?)",
                    header.kind
                )
            }
            _ => {}
        }

        // Land the payload in a posted buffer when the next expected message is this one.
        // A large message whose receive is not posted yet waits briefly for it.
        let target = {
            let hold = header.payload_len >= HOLD_MIN_BYTES;
            let until = Instant::now()
                + Duration::from_nanos(
                    header
                        .payload_len
                        .saturating_mul(1_000_000_000)
                        .checked_div(HOLD_BYTES_PER_SEC)
                        .unwrap_or(0),
                )
                .min(HOLD_MAX);
            let mut inboxes = shared.inboxes.lock();
            loop {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                let Some(inbox) = inboxes.get_mut(peer) else {
                    break None;
                };
                // A post is for the next message not yet claimed: only use it once the
                // queue is empty (until then it may be a stale post the operation is about to
                // withdraw in favour of a queued message).
                if inbox.queue.is_empty() {
                    match inbox.post.as_mut() {
                        Some(post)
                            if post.state == PostState::Waiting
                                && post.expect.matches(&header)
                                && post.target.len() as u64 == header.payload_len =>
                        {
                            post.state = PostState::Filling;
                            break Some(post.target);
                        }
                        // A waiting post that does not match: the operation will report it.
                        Some(post) if post.state == PostState::Waiting => break None,
                        // The previous message's post, not yet collected, or none yet.
                        _ => {}
                    }
                }
                if !hold || inbox.claimed == Some(header.seq) || Instant::now() >= until {
                    break None;
                }
                let _ = shared.changed.wait_until(&mut inboxes, until);
            }
        };
        if let Some(target) = target {
            // SAFETY: this thread moved the post to `Filling` just above, under the inbox
            // lock; the posting operation keeps the buffer borrowed and untouched until the
            // post leaves `Filling`, which only this thread does, below (target.rs rules 1–3).
            let buf = unsafe { target.slice_mut() };
            let failure = stream
                .read_exact(buf)
                .err()
                .map(|e| describe_read_error(&e, "inside a message"));
            let mut inboxes = shared.inboxes.lock();
            if let Some(inbox) = inboxes.get_mut(peer) {
                if let Some(post) = inbox.post.as_mut() {
                    post.state = if failure.is_some() {
                        PostState::Failed
                    } else {
                        PostState::Done
                    };
                }
                if let (Some(detail), LinkState::Open) = (&failure, &inbox.link) {
                    inbox.link = LinkState::Lost(detail.clone());
                }
            }
            drop(inboxes);
            shared.notify();
            match failure {
                None => continue,
                Some(_) => return,
            }
        }

        match read_payload(&mut stream, header.payload_len) {
            Ok(payload) => {
                let mut inboxes = shared.inboxes.lock();
                if let Some(inbox) = inboxes.get_mut(peer) {
                    inbox.queue.push_back(Message { header, payload });
                }
                drop(inboxes);
                shared.notify();
            }
            Err(detail) => break detail,
        }
    };
    shared.set_lost(peer, failure);
}
