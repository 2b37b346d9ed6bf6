//! [`CpuGpuEvent`]: record→wait ordering between one producer thread and one consumer thread.
//!
//! A device event alone cannot order two threads: making a stream wait on an event that was
//! never recorded is a no-op, so a consumer that reaches its wait before the producer reached
//! its record would run ahead. A `CpuGpuEvent` pairs a CPU flag with an optional device event:
//!
//! * [`EventRecorder::record`] (host only) or `EventRecorder::record_on` (feature `cuda`: also
//!   records a fresh device event on the producer's stream) sets the flag. Recording again
//!   before the consumer waited is an error ([`EventError::AlreadyRecorded`]), never a silent
//!   overwrite.
//! * [`EventWaiter::wait_until`] blocks the consumer thread until the flag is set (or the
//!   deadline passes, or the recorder is gone), then clears it so the event serves the next
//!   round. With feature `cuda`, `EventWaiter::wait_on` instead makes the consumer's stream wait
//!   on the recorded device event, without blocking the CPU on the device.
//!
//! # Host and device halves
//!
//! One type serves both: every round carries an *optional* device event. The four
//! combinations are all sound:
//!
//! | recorded with | waited with | the consumer is ordered after |
//! | --- | --- | --- |
//! | `record` | `wait_until` | the producer's CPU work before `record` |
//! | `record` | `wait_on(stream)` | the same (nothing was recorded on a device) |
//! | `record_on(stream)` | `wait_on(stream)` | the producer's stream work, on the consumer's stream |
//! | `record_on(stream)` | `wait_until` | the producer's stream work, by polling the event from the CPU |
//!
//! So CPU-only paths and tests use the host forms, and code that is compiled with and without
//! `cuda` keeps one type.
//!
//! ```
//! use moeshift_sync::{CpuGpuEvent, Deadline};
//! use std::time::Duration;
//!
//! let (mut recorder, mut waiter) = CpuGpuEvent::named("layer 3 buffer ready");
//! let worker = std::thread::spawn(move || {
//!     // Blocks until the other thread recorded.
//!     waiter.wait_until(Deadline::after(Duration::from_secs(10)))
//! });
//! recorder.record().unwrap();
//! worker.join().unwrap().unwrap();
//! ```

use crate::deadline::{Deadline, DeadlineExceeded};
use crate::shim::Arc;
use crate::slot::{Side, Slot, SlotError};

/// What one round carries from the recorder to the waiter.
#[derive(Debug)]
struct Recorded {
    /// The device event recorded with this round, if it was recorded on a stream.
    #[cfg(feature = "cuda")]
    device: Option<cudarc::driver::CudaEvent>,
}

/// Error from [`EventRecorder`] or [`EventWaiter`]. Every variant names the event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// `record` was called while the previous record had not been consumed by a wait yet.
    #[error("event `{name}`: record called while round {pending_round} was still waiting to be consumed")]
    AlreadyRecorded {
        /// The event's name.
        name: String,
        /// The round that was recorded and not waited for yet.
        pending_round: u64,
    },
    /// One half was closed or dropped. Returned to the other half instead of blocking forever,
    /// and to a half that was closed itself.
    #[error("event `{name}`: the {side} side is closed")]
    Closed {
        /// The event's name.
        name: String,
        /// The half that was closed.
        side: Side,
    },
    /// The deadline passed first. The `what` of the inner error names the event and round.
    #[error(transparent)]
    Timeout(#[from] DeadlineExceeded),
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("event `{name}`: {op} failed: {source}")]
    Device {
        /// The event's name.
        name: String,
        /// The operation that failed, e.g. "recording the device event".
        op: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
}

impl EventError {
    fn from_slot(name: &str, err: SlotError, waiting_for: &str) -> Self {
        match err {
            SlotError::Full { pending_round } => EventError::AlreadyRecorded {
                name: name.to_owned(),
                pending_round,
            },
            SlotError::Closed(side) => EventError::Closed {
                name: name.to_owned(),
                side,
            },
            SlotError::Expired { round } => EventError::Timeout(DeadlineExceeded {
                what: format!("waiting for event `{name}` round {round} {waiting_for}"),
            }),
        }
    }
}

/// Constructors for the two halves of a CPU/GPU event. See the [module docs](self).
///
/// The halves are `Send` and not `Clone`, and their operations take `&mut self`: one thread
/// records and one thread waits, which is the only use the event is correct for.
#[derive(Debug)]
pub struct CpuGpuEvent {
    _no_values: (),
}

impl CpuGpuEvent {
    /// A new event named `"event"`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> (EventRecorder, EventWaiter) {
        Self::named("event")
    }

    /// A new event whose errors quote `name` (e.g. `"layer 12 buffer consumed"`).
    pub fn named(name: impl Into<String>) -> (EventRecorder, EventWaiter) {
        let slot = Slot::new(name.into());
        (
            EventRecorder {
                slot: Arc::clone(&slot),
            },
            EventWaiter { slot },
        )
    }
}

/// The recording half of a [`CpuGpuEvent`]. Dropping it closes the event: a waiter blocked on
/// it gets [`EventError::Closed`].
#[derive(Debug)]
pub struct EventRecorder {
    slot: Arc<Slot<Recorded>>,
}

impl EventRecorder {
    /// Records a round with no device event and wakes the waiter.
    ///
    /// Errors: [`EventError::AlreadyRecorded`] if the previous round was not waited for yet,
    /// [`EventError::Closed`] if either half was closed.
    pub fn record(&mut self) -> Result<(), EventError> {
        self.put(Recorded {
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Records a fresh device event on `stream`, then sets the CPU flag and wakes the waiter.
    /// The waiter is ordered after all work queued on `stream` so far.
    ///
    /// Errors as [`EventRecorder::record`], plus [`EventError::Device`] when the driver fails.
    /// The state is checked before the device event is created, so a failed call records
    /// nothing.
    #[cfg(feature = "cuda")]
    pub fn record_on(&mut self, stream: &cudarc::driver::CudaStream) -> Result<(), EventError> {
        self.slot
            .check_put()
            .map_err(|e| EventError::from_slot(self.slot.name(), e, "to be recorded"))?;
        let event = stream
            .record_event(None)
            .map_err(|source| EventError::Device {
                name: self.slot.name().to_owned(),
                op: "recording the device event",
                source,
            })?;
        self.put(Recorded {
            device: Some(event),
        })
    }

    fn put(&mut self, recorded: Recorded) -> Result<(), EventError> {
        self.slot
            .put(recorded)
            .map(|_round| ())
            .map_err(|(e, _)| EventError::from_slot(self.slot.name(), e, "to be recorded"))
    }

    /// True while a recorded round has not been waited for yet (recording now would fail).
    pub fn is_pending(&self) -> bool {
        self.slot.pending_round().is_some()
    }

    /// True once either half was closed.
    pub fn is_closed(&self) -> bool {
        self.slot.is_closed(Side::Producer) || self.slot.is_closed(Side::Consumer)
    }

    /// Closes the event from the recording side; the waiter's next wait (or its current one)
    /// returns [`EventError::Closed`] once a round recorded before is consumed.
    pub fn close(&mut self) {
        self.slot.close(Side::Producer);
    }

    /// The event's name.
    pub fn name(&self) -> &str {
        self.slot.name()
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.slot.close(Side::Producer);
    }
}

/// The waiting half of a [`CpuGpuEvent`]. Dropping it closes the event: the recorder's next
/// `record` returns [`EventError::Closed`].
#[derive(Debug)]
pub struct EventWaiter {
    slot: Arc<Slot<Recorded>>,
}

impl EventWaiter {
    /// Blocks until a round was recorded, consumes it, and returns. If the round carries a
    /// device event, also waits (polling from the CPU, up to `deadline`) until the device work
    /// before it finished.
    ///
    /// Errors: [`EventError::Timeout`] when `deadline` passes first (if it passes while the
    /// device work is still running, the round counts as consumed), [`EventError::Closed`]
    /// when the recorder is gone and nothing is pending.
    pub fn wait_until(&mut self, deadline: Deadline) -> Result<(), EventError> {
        let (_round, recorded) = self.take(deadline)?;
        #[cfg(feature = "cuda")]
        if let Some(event) = recorded.device {
            crate::device::wait_complete(&event, deadline, self.slot.name(), _round)?;
        }
        #[cfg(not(feature = "cuda"))]
        let Recorded {} = recorded;
        Ok(())
    }

    /// Blocks the CPU until a round was recorded, then makes `stream` wait on the round's
    /// device event (if it has one) without blocking the CPU on the device, and consumes the
    /// round.
    ///
    /// Errors as [`EventWaiter::wait_until`], plus [`EventError::Device`] when the driver
    /// fails.
    #[cfg(feature = "cuda")]
    pub fn wait_on(
        &mut self,
        stream: &cudarc::driver::CudaStream,
        deadline: Deadline,
    ) -> Result<(), EventError> {
        let (_round, recorded) = self.take(deadline)?;
        if let Some(event) = recorded.device {
            stream.wait(&event).map_err(|source| EventError::Device {
                name: self.slot.name().to_owned(),
                op: "making the stream wait on the device event",
                source,
            })?;
        }
        Ok(())
    }

    fn take(&mut self, deadline: Deadline) -> Result<(u64, Recorded), EventError> {
        self.slot
            .take(deadline)
            .map_err(|e| EventError::from_slot(self.slot.name(), e, "to be recorded"))
    }

    /// True once either half was closed.
    pub fn is_closed(&self) -> bool {
        self.slot.is_closed(Side::Producer) || self.slot.is_closed(Side::Consumer)
    }

    /// Closes the event from the waiting side; the recorder's next `record` returns
    /// [`EventError::Closed`].
    pub fn close(&mut self) {
        self.slot.close(Side::Consumer);
    }

    /// The event's name.
    pub fn name(&self) -> &str {
        self.slot.name()
    }
}

impl Drop for EventWaiter {
    fn drop(&mut self) {
        self.slot.close(Side::Consumer);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(20))
    }

    fn assert_send<T: Send>() {}

    #[test]
    fn halves_are_send() {
        assert_send::<EventRecorder>();
        assert_send::<EventWaiter>();
    }

    #[test]
    fn wait_before_record_blocks_then_proceeds() {
        let (mut rec, mut wait) = CpuGpuEvent::named("ready");
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let done2 = std::sync::Arc::clone(&done);
        let waiter = thread::spawn(move || {
            let r = wait.wait_until(soon());
            done2.store(true, Ordering::SeqCst);
            r
        });
        thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "waiter returned before anything was recorded"
        );
        rec.record().unwrap();
        assert!(waiter.join().unwrap().is_ok());
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn double_record_is_an_error_not_a_panic() {
        let (mut rec, mut wait) = CpuGpuEvent::named("ready");
        rec.record().unwrap();
        assert!(rec.is_pending());
        match rec.record() {
            Err(EventError::AlreadyRecorded {
                name,
                pending_round: 1,
            }) => assert_eq!(name, "ready"),
            other => panic!("expected AlreadyRecorded, got {other:?}"),
        }
        // The error leaves the pending round intact; consuming it frees the event again.
        wait.wait_until(soon()).unwrap();
        assert!(!rec.is_pending());
        rec.record().unwrap();
        wait.wait_until(soon()).unwrap();
    }

    #[test]
    fn error_messages_name_the_event_and_round() {
        let (mut rec, _wait) = CpuGpuEvent::named("layer 7 consumed");
        rec.record().unwrap();
        let msg = rec.record().unwrap_err().to_string();
        assert!(msg.contains("layer 7 consumed"), "{msg}");
        assert!(msg.contains("round 1"), "{msg}");
    }

    #[test]
    fn ping_pong_ten_thousand_rounds() {
        const ROUNDS: u64 = 10_000;
        let (mut ping_rec, mut ping_wait) = CpuGpuEvent::named("ping");
        let (mut pong_rec, mut pong_wait) = CpuGpuEvent::named("pong");
        // Each side bumps a counter it owns between events; the other side checks that it sees
        // exactly the value the ordering promises.
        let a_count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let b_count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a2, b2) = (
            std::sync::Arc::clone(&a_count),
            std::sync::Arc::clone(&b_count),
        );
        let deadline = Deadline::after(Duration::from_secs(60));
        let other = thread::spawn(move || -> Result<(), String> {
            for i in 1..=ROUNDS {
                ping_wait.wait_until(deadline).map_err(|e| e.to_string())?;
                let seen = a2.load(Ordering::Relaxed);
                if seen != i {
                    return Err(format!("round {i}: saw producer count {seen}"));
                }
                b2.store(i, Ordering::Relaxed);
                pong_rec.record().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        for i in 1..=ROUNDS {
            a_count.store(i, Ordering::Relaxed);
            ping_rec.record().unwrap();
            pong_wait.wait_until(deadline).unwrap();
            assert_eq!(b_count.load(Ordering::Relaxed), i);
        }
        other.join().unwrap().unwrap();
    }

    #[test]
    fn wait_times_out_in_about_the_deadline() {
        let (_rec, mut wait) = CpuGpuEvent::named("never recorded");
        let budget = Duration::from_millis(150);
        let start = Instant::now();
        let err = wait.wait_until(Deadline::after(budget)).unwrap_err();
        let took = start.elapsed();
        match &err {
            EventError::Timeout(e) => {
                assert!(e.what.contains("never recorded"), "{}", e.what);
                assert!(e.what.contains("round 1"), "{}", e.what);
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(took >= budget, "returned early after {took:?}");
        assert!(took < budget + Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn dropping_the_recorder_wakes_a_blocked_waiter() {
        let (rec, mut wait) = CpuGpuEvent::named("ready");
        let (tx, rx) = mpsc::channel();
        let waiter = thread::spawn(move || {
            tx.send(()).unwrap();
            wait.wait_until(soon())
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        drop(rec);
        match waiter.join().unwrap() {
            Err(EventError::Closed {
                side: Side::Producer,
                ..
            }) => {}
            other => panic!("expected Closed(producer), got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn closing_the_waiter_makes_record_fail() {
        let (mut rec, mut wait) = CpuGpuEvent::named("ready");
        wait.close();
        assert!(rec.is_closed());
        match rec.record() {
            Err(EventError::Closed {
                side: Side::Consumer,
                ..
            }) => {}
            other => panic!("expected Closed(consumer), got {other:?}"),
        }
        // A closed waiter does not wait either.
        assert!(matches!(
            wait.wait_until(soon()),
            Err(EventError::Closed {
                side: Side::Consumer,
                ..
            })
        ));
    }

    #[test]
    fn a_round_recorded_before_the_recorder_left_is_still_delivered() {
        let (mut rec, mut wait) = CpuGpuEvent::new();
        rec.record().unwrap();
        drop(rec);
        wait.wait_until(soon()).unwrap();
        assert!(matches!(
            wait.wait_until(soon()),
            Err(EventError::Closed {
                side: Side::Producer,
                ..
            })
        ));
    }
}
