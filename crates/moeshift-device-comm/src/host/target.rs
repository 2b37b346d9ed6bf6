//! [`RawTarget`]: a caller's receive buffer lent to a connection's reader thread, so that a
//! large message lands directly where the caller wants it instead of being copied from an
//! intermediate buffer.
//!
//! The buffer is `&mut [u8]` borrowed by an operation that is still running; the reader
//! thread is long-lived and cannot borrow it, so it gets a raw pointer. Soundness rests on a
//! protocol enforced by the inbox (see `peer.rs`) and the operation's guard (see `group.rs`):
//!
//! 1. A target is created from a `&mut [u8]` that stays borrowed by the posting operation
//!    until the guard's `drop` returns; the operation does not touch the buffer meanwhile.
//! 2. The reader writes through the target only while the post is in state `Filling`, which
//!    it enters and leaves under the inbox mutex.
//! 3. The guard's `drop` does not return while any of its posts is `Filling`: it shuts the
//!    socket down (which makes the reader's blocking read fail at once) and waits for the
//!    reader to leave `Filling`.
//!
//! The mutex hand-offs order the reader's writes before the operation's later reads.

/// Pointer and length of a receive buffer lent to a reader thread.
#[derive(Clone, Copy)]
pub(crate) struct RawTarget {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `RawTarget` is only dereferenced by the one reader thread that owns the post, while
// the posting operation keeps the buffer borrowed and does not access it (module docs, rules
// 1–3); moving the pointer value between threads is therefore sound.
unsafe impl Send for RawTarget {}

impl RawTarget {
    /// Lends `buf`. The caller must follow the module's protocol.
    pub(crate) fn new(buf: &mut [u8]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Length of the buffer.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The lent buffer.
    ///
    /// # Safety
    /// Only the reader thread that moved the post to `Filling` may call this, and only until
    /// it moves the post out of `Filling`; the posting operation keeps the buffer borrowed
    /// and untouched for that whole time (module docs).
    pub(crate) unsafe fn slice_mut<'a>(&self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: `ptr`/`len` come from a live `&mut [u8]` (rule 1) that nothing else accesses
        // while the post is `Filling` (rules 2 and 3), as the caller guarantees.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
