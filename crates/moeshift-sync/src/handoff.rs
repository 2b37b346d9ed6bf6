//! [`handoff()`]: a one-slot, per-layer result handoff from a worker thread to the serving
//! thread.
//!
//! The worker ([`HandoffSender`]) publishes one value at a time and may wait, with a deadline,
//! until the serving thread ([`HandoffReceiver`]) took it. The serving thread polls with
//! [`HandoffReceiver::try_take`], which never blocks, so it can check once per step.
//!
//! Either side can close, and dropping a side closes it. Whoever is parked on the other side
//! wakes at once with [`HandoffError::Closed`]. In particular a worker that published a result
//! and waits for it to be consumed never stays parked after the serving side went away: it gets
//! `Closed`, or `Timeout` once its deadline passes, and can report either.
//!
//! A value published before the sender closed is still delivered; the receiver sees `Closed`
//! only after taking it. A value still in the slot when the receiver closes is dropped.
//!
//! "Consumed" means "taken". When the consumer must also finish device work that reads the
//! producer's buffer before the producer may reuse it, pair the handoff with a
//! [`CpuGpuEvent`](crate::CpuGpuEvent) that the consumer records after queuing that work.
//!
//! ```
//! use moeshift_sync::{handoff, Deadline};
//! use std::time::Duration;
//!
//! let (mut tx, mut rx) = handoff::<Vec<u32>>();
//! let worker = std::thread::spawn(move || {
//!     tx.publish(vec![3, 1, 2]).map_err(|e| e.into_error())?;
//!     tx.wait_consumed(Deadline::after(Duration::from_secs(10)))
//! });
//! // The serving thread checks once per step without blocking.
//! let value = loop {
//!     if let Some(v) = rx.try_take().unwrap() {
//!         break v;
//!     }
//!     std::thread::yield_now();
//! };
//! assert_eq!(value, vec![3, 1, 2]);
//! worker.join().unwrap().unwrap();
//! ```

use std::fmt;

use crate::deadline::{Deadline, DeadlineExceeded};
use crate::shim::Arc;
use crate::slot::{Side, Slot, SlotError};

/// Error from a [`HandoffSender`] or [`HandoffReceiver`]. Every variant names the handoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// `publish` while the previous value had not been taken yet.
    #[error("handoff `{name}`: publish called while round {pending_round} was still waiting to be taken")]
    Full {
        /// The handoff's name.
        name: String,
        /// The round still in the slot.
        pending_round: u64,
    },
    /// One side was closed or dropped.
    #[error("handoff `{name}`: the {side} side is closed")]
    Closed {
        /// The handoff's name.
        name: String,
        /// The side that was closed.
        side: Side,
    },
    /// The deadline passed first. The `what` of the inner error names the handoff and round.
    #[error(transparent)]
    Timeout(#[from] DeadlineExceeded),
}

impl HandoffError {
    fn from_slot(name: &str, err: SlotError, waiting_for: &str) -> Self {
        match err {
            SlotError::Full { pending_round } => HandoffError::Full {
                name: name.to_owned(),
                pending_round,
            },
            SlotError::Closed(side) => HandoffError::Closed {
                name: name.to_owned(),
                side,
            },
            SlotError::Expired { round } => HandoffError::Timeout(DeadlineExceeded {
                what: format!("waiting for handoff `{name}` round {round} {waiting_for}"),
            }),
        }
    }
}

/// A value [`HandoffSender::publish`] could not publish, handed back with the reason.
pub struct PublishError<T> {
    value: T,
    error: HandoffError,
}

impl<T> PublishError<T> {
    /// Why the value was not published.
    pub fn error(&self) -> &HandoffError {
        &self.error
    }

    /// The value, for a later retry.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The reason, dropping the value.
    pub fn into_error(self) -> HandoffError {
        self.error
    }

    /// Both parts.
    pub fn into_parts(self) -> (T, HandoffError) {
        (self.value, self.error)
    }
}

impl<T> fmt::Debug for PublishError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for PublishError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<T> std::error::Error for PublishError<T> {}

impl<T> From<PublishError<T>> for HandoffError {
    fn from(e: PublishError<T>) -> Self {
        e.error
    }
}

/// A new handoff named `"handoff"`. See the [module docs](self).
pub fn handoff<T>() -> (HandoffSender<T>, HandoffReceiver<T>) {
    named_handoff("handoff")
}

/// A new handoff whose errors quote `name` (e.g. `"layer 12 result"`).
pub fn named_handoff<T>(name: impl Into<String>) -> (HandoffSender<T>, HandoffReceiver<T>) {
    let slot = Slot::new(name.into());
    (
        HandoffSender {
            slot: Arc::clone(&slot),
        },
        HandoffReceiver { slot },
    )
}

/// The publishing half of a handoff: `Send` (when `T` is), not `Clone`. Dropping it closes
/// the handoff from this side.
#[derive(Debug)]
pub struct HandoffSender<T> {
    slot: Arc<Slot<T>>,
}

impl<T> HandoffSender<T> {
    /// Puts `value` into the empty slot and wakes the receiver.
    ///
    /// Errors (the value comes back inside): [`HandoffError::Full`] if the previous value was
    /// not taken yet, [`HandoffError::Closed`] if either side was closed.
    pub fn publish(&mut self, value: T) -> Result<(), PublishError<T>> {
        self.slot
            .put(value)
            .map(|_round| ())
            .map_err(|(e, value)| PublishError {
                value,
                error: HandoffError::from_slot(self.slot.name(), e, "to be taken"),
            })
    }

    /// Blocks until every published value was taken; returns at once if none is pending.
    ///
    /// Errors: [`HandoffError::Closed`] if the receiver went away before taking the value,
    /// [`HandoffError::Timeout`] when `deadline` passes first.
    pub fn wait_consumed(&mut self, deadline: Deadline) -> Result<(), HandoffError> {
        self.slot
            .wait_consumed(deadline)
            .map_err(|e| HandoffError::from_slot(self.slot.name(), e, "to be taken"))
    }

    /// True when no published value is waiting to be taken.
    pub fn is_consumed(&self) -> bool {
        self.slot.pending_round().is_none()
    }

    /// True once either side was closed.
    pub fn is_closed(&self) -> bool {
        self.slot.is_closed(Side::Producer) || self.slot.is_closed(Side::Consumer)
    }

    /// Closes the handoff from the sending side. A value already published is still
    /// delivered; after it, the receiver gets [`HandoffError::Closed`].
    pub fn close(&mut self) {
        self.slot.close(Side::Producer);
    }

    /// The handoff's name.
    pub fn name(&self) -> &str {
        self.slot.name()
    }
}

impl<T> Drop for HandoffSender<T> {
    fn drop(&mut self) {
        self.slot.close(Side::Producer);
    }
}

/// The taking half of a handoff: `Send` (when `T` is), not `Clone`. Dropping it closes the
/// handoff from this side and drops a value still in the slot.
#[derive(Debug)]
pub struct HandoffReceiver<T> {
    slot: Arc<Slot<T>>,
}

impl<T> HandoffReceiver<T> {
    /// Takes the published value if there is one, without blocking.
    ///
    /// `Ok(None)` means nothing is published yet. Errors: [`HandoffError::Closed`] when the
    /// sender closed and nothing is left to take, or this side was closed.
    pub fn try_take(&mut self) -> Result<Option<T>, HandoffError> {
        self.slot
            .try_take()
            .map(|taken| taken.map(|(_round, value)| value))
            .map_err(|e| HandoffError::from_slot(self.slot.name(), e, "to be published"))
    }

    /// Blocks until a value is published, then takes it.
    ///
    /// Errors: [`HandoffError::Closed`] as for `try_take`, [`HandoffError::Timeout`] when
    /// `deadline` passes first.
    pub fn take_until(&mut self, deadline: Deadline) -> Result<T, HandoffError> {
        self.slot
            .take(deadline)
            .map(|(_round, value)| value)
            .map_err(|e| HandoffError::from_slot(self.slot.name(), e, "to be published"))
    }

    /// True once either side was closed.
    pub fn is_closed(&self) -> bool {
        self.slot.is_closed(Side::Producer) || self.slot.is_closed(Side::Consumer)
    }

    /// Closes the handoff from the receiving side, dropping a value still in the slot. A
    /// sender waiting for consumption wakes with [`HandoffError::Closed`].
    pub fn close(&mut self) {
        self.slot.close(Side::Consumer);
    }

    /// The handoff's name.
    pub fn name(&self) -> &str {
        self.slot.name()
    }
}

impl<T> Drop for HandoffReceiver<T> {
    fn drop(&mut self) {
        self.slot.close(Side::Consumer);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(20))
    }

    fn assert_send<T: Send>() {}

    #[test]
    fn halves_are_send() {
        assert_send::<HandoffSender<Vec<u8>>>();
        assert_send::<HandoffReceiver<Vec<u8>>>();
    }

    #[test]
    fn publish_then_take_then_consumed() {
        let (mut tx, mut rx) = named_handoff::<u32>("layer 0 result");
        assert!(tx.is_consumed());
        assert_eq!(rx.try_take(), Ok(None));
        tx.publish(5).unwrap();
        assert!(!tx.is_consumed());
        assert_eq!(rx.try_take(), Ok(Some(5)));
        assert!(tx.is_consumed());
        // Nothing pending: returns at once even with an expired deadline.
        tx.wait_consumed(Deadline::after(Duration::ZERO)).unwrap();
        assert_eq!(rx.try_take(), Ok(None));
    }

    #[test]
    fn publishing_into_a_full_slot_returns_the_value() {
        let (mut tx, mut rx) = named_handoff::<String>("layer 4 result");
        tx.publish("first".to_owned()).unwrap();
        let err = tx.publish("second".to_owned()).unwrap_err();
        assert_eq!(
            err.error(),
            &HandoffError::Full {
                name: "layer 4 result".to_owned(),
                pending_round: 1
            }
        );
        assert!(err.to_string().contains("layer 4 result"));
        assert_eq!(err.into_value(), "second");
        assert_eq!(rx.try_take().unwrap().as_deref(), Some("first"));
    }

    #[test]
    fn wait_consumed_returns_when_the_value_is_taken() {
        let (mut tx, mut rx) = handoff::<u64>();
        tx.publish(11).unwrap();
        let waiter = thread::spawn(move || {
            let r = tx.wait_consumed(soon());
            (r, tx)
        });
        thread::sleep(Duration::from_millis(50));
        assert_eq!(rx.try_take(), Ok(Some(11)));
        let (r, _tx) = waiter.join().unwrap();
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn receiver_drop_wakes_a_parked_sender() {
        // The failure mode where a worker stays parked forever on a published result: here the
        // serving side goes away and the worker must wake with an error.
        let (mut tx, rx) = named_handoff::<u64>("layer 9 result");
        tx.publish(1).unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            ready_tx.send(()).unwrap();
            tx.wait_consumed(soon())
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        drop(rx);
        assert_eq!(
            worker.join().unwrap(),
            Err(HandoffError::Closed {
                name: "layer 9 result".to_owned(),
                side: Side::Consumer
            })
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn parked_sender_times_out_when_nobody_consumes() {
        let (mut tx, _rx) = named_handoff::<u64>("layer 2 result");
        tx.publish(1).unwrap();
        let budget = Duration::from_millis(120);
        let start = Instant::now();
        let err = tx.wait_consumed(Deadline::after(budget)).unwrap_err();
        let took = start.elapsed();
        match err {
            HandoffError::Timeout(e) => {
                assert!(e.what.contains("layer 2 result"), "{}", e.what);
                assert!(e.what.contains("round 1"), "{}", e.what);
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(took >= budget, "returned early after {took:?}");
        assert!(took < budget + Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn sender_close_wakes_a_blocked_receiver() {
        let (mut tx, mut rx) = handoff::<u64>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = thread::spawn(move || {
            ready_tx.send(()).unwrap();
            rx.take_until(soon())
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        thread::sleep(Duration::from_millis(50));
        tx.close();
        assert!(tx.is_closed());
        assert!(matches!(
            receiver.join().unwrap(),
            Err(HandoffError::Closed {
                side: Side::Producer,
                ..
            })
        ));
        // A closed sender cannot publish.
        assert!(matches!(
            tx.publish(3).map_err(PublishError::into_error),
            Err(HandoffError::Closed {
                side: Side::Producer,
                ..
            })
        ));
    }

    #[test]
    fn value_published_before_sender_drop_is_delivered_once() {
        let (mut tx, mut rx) = handoff::<&'static str>();
        tx.publish("last layer").unwrap();
        drop(tx);
        assert!(rx.is_closed());
        assert_eq!(rx.take_until(soon()), Ok("last layer"));
        assert!(matches!(
            rx.try_take(),
            Err(HandoffError::Closed {
                side: Side::Producer,
                ..
            })
        ));
    }

    #[test]
    fn receiver_close_drops_the_pending_value_and_refuses_more() {
        let payload = std::sync::Arc::new(());
        let (mut tx, mut rx) = handoff::<std::sync::Arc<()>>();
        tx.publish(std::sync::Arc::clone(&payload)).unwrap();
        rx.close();
        assert_eq!(std::sync::Arc::strong_count(&payload), 1);
        let err = tx.publish(std::sync::Arc::clone(&payload)).unwrap_err();
        assert!(matches!(
            err.error(),
            HandoffError::Closed {
                side: Side::Consumer,
                ..
            }
        ));
        assert!(matches!(
            rx.try_take(),
            Err(HandoffError::Closed {
                side: Side::Consumer,
                ..
            })
        ));
    }

    #[test]
    fn take_until_times_out_in_about_the_deadline() {
        let (_tx, mut rx) = named_handoff::<u8>("layer 1 result");
        let budget = Duration::from_millis(100);
        let start = Instant::now();
        let err = rx.take_until(Deadline::after(budget)).unwrap_err();
        assert!(matches!(err, HandoffError::Timeout(_)), "{err:?}");
        let took = start.elapsed();
        assert!(took >= budget && took < budget + Duration::from_secs(2));
    }

    #[test]
    fn many_layers_in_order_across_threads() {
        const LAYERS: u32 = 2_000;
        let (mut tx, mut rx) = handoff::<u32>();
        let worker = thread::spawn(move || -> Result<(), HandoffError> {
            for layer in 0..LAYERS {
                tx.publish(layer)?;
                tx.wait_consumed(soon())?;
            }
            Ok(())
        });
        let deadline = soon();
        let mut next = 0;
        while next < LAYERS {
            match rx.try_take().unwrap() {
                Some(layer) => {
                    assert_eq!(layer, next);
                    next += 1;
                }
                None => {
                    assert!(!deadline.is_expired(), "stalled at layer {next}");
                    thread::yield_now();
                }
            }
        }
        worker.join().unwrap().unwrap();
    }
}
