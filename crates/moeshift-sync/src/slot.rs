//! The one-slot rendezvous that both [`crate::event`] and [`crate::handoff`] are built on.
//!
//! A slot holds at most one value. Exactly one producer handle puts values in and exactly one
//! consumer handle takes them out; each side can close, and closing (or dropping a handle)
//! wakes whoever is parked on the other side. All state lives under one mutex, and every
//! change is followed by `notify_all` on one condition variable: there are never more than two
//! parked threads (one per side), each waiting for its own condition.

use std::fmt;

use crate::deadline::Deadline;
use crate::shim::{Arc, Condvar, Mutex, MutexGuard};

/// Which half of a two-party primitive an error or a close refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The half that records an event or publishes a value.
    Producer,
    /// The half that waits for an event or takes a value.
    Consumer,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Producer => "producer",
            Side::Consumer => "consumer",
        })
    }
}

/// Why a slot operation did not complete. The primitives turn this into their public errors,
/// adding the primitive's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotError {
    /// `put` while the previous value (round `pending_round`) was not taken yet.
    Full { pending_round: u64 },
    /// The given side was closed (explicitly or by dropping its handle).
    Closed(Side),
    /// The deadline passed while waiting for round `round`.
    Expired { round: u64 },
}

#[derive(Debug)]
struct State<T> {
    value: Option<T>,
    producer_open: bool,
    consumer_open: bool,
    /// Number of values ever put; the value in the slot, if any, is round `published`.
    published: u64,
    /// Number of values ever taken.
    consumed: u64,
}

/// Shared state of one slot. Handles hold it through an `Arc`.
#[derive(Debug)]
pub(crate) struct Slot<T> {
    name: String,
    state: Mutex<State<T>>,
    changed: Condvar,
}

impl<T> Slot<T> {
    pub(crate) fn new(name: String) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: Mutex::new(State {
                value: None,
                producer_open: true,
                consumer_open: true,
                published: 0,
                consumed: 0,
            }),
            changed: Condvar::new(),
        })
    }

    /// The name errors quote.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Parks on the condition variable until `deadline`. Returns `None` (the lock released) once
    /// the deadline has passed; the caller turns that into `SlotError::Expired`.
    fn park<'a>(
        &self,
        guard: MutexGuard<'a, State<T>>,
        deadline: Deadline,
    ) -> Option<MutexGuard<'a, State<T>>> {
        if deadline.is_expired() {
            return None;
        }
        Some(self.changed.wait_until(guard, deadline.instant()))
    }

    /// Producer: puts `value` into the empty slot and wakes the consumer. Returns the round
    /// number of the value (1 for the first). On error the value is handed back.
    pub(crate) fn put(&self, value: T) -> Result<u64, (SlotError, T)> {
        let mut st = self.state.lock();
        if !st.producer_open {
            return Err((SlotError::Closed(Side::Producer), value));
        }
        if !st.consumer_open {
            return Err((SlotError::Closed(Side::Consumer), value));
        }
        if st.value.is_some() {
            let pending_round = st.published;
            return Err((SlotError::Full { pending_round }, value));
        }
        st.value = Some(value);
        st.published += 1;
        let round = st.published;
        drop(st);
        self.changed.notify_all();
        Ok(round)
    }

    /// Producer: the round still waiting in the slot, if any.
    pub(crate) fn pending_round(&self) -> Option<u64> {
        let st = self.state.lock();
        st.value.as_ref().map(|_| st.published)
    }

    /// Producer: checks, without blocking, whether a `put` could succeed now.
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn check_put(&self) -> Result<(), SlotError> {
        let st = self.state.lock();
        if !st.producer_open {
            return Err(SlotError::Closed(Side::Producer));
        }
        if !st.consumer_open {
            return Err(SlotError::Closed(Side::Consumer));
        }
        if st.value.is_some() {
            return Err(SlotError::Full {
                pending_round: st.published,
            });
        }
        Ok(())
    }

    /// Producer: waits until every value put so far was taken. Returns at once when nothing is
    /// pending.
    pub(crate) fn wait_consumed(&self, deadline: Deadline) -> Result<(), SlotError> {
        let mut st = self.state.lock();
        loop {
            if !st.producer_open {
                return Err(SlotError::Closed(Side::Producer));
            }
            if st.consumed == st.published {
                return Ok(());
            }
            if !st.consumer_open {
                return Err(SlotError::Closed(Side::Consumer));
            }
            let round = st.published;
            st = self
                .park(st, deadline)
                .ok_or(SlotError::Expired { round })?;
        }
    }

    /// Consumer: takes the value if there is one. A value put before the producer closed is
    /// still delivered; after that, `Closed(Producer)`.
    pub(crate) fn try_take(&self) -> Result<Option<(u64, T)>, SlotError> {
        let mut st = self.state.lock();
        if !st.consumer_open {
            return Err(SlotError::Closed(Side::Consumer));
        }
        match st.value.take() {
            Some(value) => {
                st.consumed += 1;
                let round = st.consumed;
                drop(st);
                self.changed.notify_all();
                Ok(Some((round, value)))
            }
            None if !st.producer_open => Err(SlotError::Closed(Side::Producer)),
            None => Ok(None),
        }
    }

    /// Consumer: waits until a value is in the slot, then takes it.
    pub(crate) fn take(&self, deadline: Deadline) -> Result<(u64, T), SlotError> {
        let mut st = self.state.lock();
        loop {
            if !st.consumer_open {
                return Err(SlotError::Closed(Side::Consumer));
            }
            if let Some(value) = st.value.take() {
                st.consumed += 1;
                let round = st.consumed;
                drop(st);
                self.changed.notify_all();
                return Ok((round, value));
            }
            if !st.producer_open {
                return Err(SlotError::Closed(Side::Producer));
            }
            let round = st.published + 1;
            st = self
                .park(st, deadline)
                .ok_or(SlotError::Expired { round })?;
        }
    }

    /// Closes one side and wakes the other. Closing the consumer side also drops a value that
    /// nobody will take any more (outside the lock, in case its destructor is slow). Idempotent.
    pub(crate) fn close(&self, side: Side) {
        let mut st = self.state.lock();
        let abandoned = match side {
            Side::Producer => {
                st.producer_open = false;
                None
            }
            Side::Consumer => {
                st.consumer_open = false;
                st.value.take()
            }
        };
        drop(st);
        self.changed.notify_all();
        drop(abandoned);
    }

    /// True when the given side was closed.
    pub(crate) fn is_closed(&self, side: Side) -> bool {
        let st = self.state.lock();
        match side {
            Side::Producer => !st.producer_open,
            Side::Consumer => !st.consumer_open,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    #[test]
    fn put_take_counts_rounds() {
        let slot = Slot::new("s".to_owned());
        assert_eq!(slot.put(7).ok(), Some(1));
        assert_eq!(slot.pending_round(), Some(1));
        assert_eq!(slot.take(soon()), Ok((1, 7)));
        assert_eq!(slot.pending_round(), None);
        assert_eq!(slot.put(8).ok(), Some(2));
        assert_eq!(slot.try_take(), Ok(Some((2, 8))));
        assert_eq!(slot.try_take(), Ok(None));
    }

    #[test]
    fn full_slot_hands_the_value_back() {
        let slot = Slot::new("s".to_owned());
        assert!(slot.put(1).is_ok());
        assert_eq!(slot.check_put(), Err(SlotError::Full { pending_round: 1 }));
        assert_eq!(
            slot.put(2).err(),
            Some((SlotError::Full { pending_round: 1 }, 2))
        );
    }

    #[test]
    fn value_outlives_producer_close_then_closed() {
        let slot = Slot::new("s".to_owned());
        assert!(slot.put(1).is_ok());
        slot.close(Side::Producer);
        assert_eq!(slot.try_take(), Ok(Some((1, 1))));
        assert_eq!(slot.try_take(), Err(SlotError::Closed(Side::Producer)));
        assert_eq!(slot.take(soon()), Err(SlotError::Closed(Side::Producer)));
    }

    #[test]
    fn consumer_close_drops_the_pending_value() {
        let value = std::sync::Arc::new(());
        let slot = Slot::new("s".to_owned());
        assert!(slot.put(std::sync::Arc::clone(&value)).is_ok());
        assert_eq!(std::sync::Arc::strong_count(&value), 2);
        slot.close(Side::Consumer);
        assert_eq!(std::sync::Arc::strong_count(&value), 1);
        assert_eq!(
            slot.wait_consumed(soon()),
            Err(SlotError::Closed(Side::Consumer))
        );
        assert!(slot.is_closed(Side::Consumer));
        assert!(!slot.is_closed(Side::Producer));
    }

    #[test]
    fn expired_deadline_reports_the_round() {
        let slot: Arc<Slot<u8>> = Slot::new("s".to_owned());
        let past = Deadline::after(Duration::ZERO);
        assert_eq!(slot.take(past), Err(SlotError::Expired { round: 1 }));
        assert!(slot.put(3).is_ok());
        assert_eq!(
            slot.wait_consumed(past),
            Err(SlotError::Expired { round: 1 })
        );
    }
}
