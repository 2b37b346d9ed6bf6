//! Model checks of `CpuGpuEvent` and the handoff under every interleaving loom explores.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p moeshift-sync --test loom --release`
//!
//! loom cannot model time, so every wait here uses a deadline that never expires; the timed
//! branch of the primitives then behaves exactly like an untimed wait. A lost wake-up shows up
//! as a loom deadlock report, a double consume as a failed assertion.
#![cfg(loom)]

use std::time::Duration;

use loom::thread;
use moeshift_sync::{handoff, CpuGpuEvent, Deadline, EventError, HandoffError, Side};

fn never() -> Deadline {
    Deadline::after(Duration::from_secs(24 * 3600))
}

#[test]
fn record_racing_wait_is_never_lost() {
    loom::model(|| {
        let (mut rec, mut wait) = CpuGpuEvent::named("model");
        let producer = thread::spawn(move || {
            rec.record().unwrap();
            rec
        });
        wait.wait_until(never()).unwrap();
        let rec = producer.join().unwrap();
        assert!(!rec.is_pending());
    });
}

#[test]
fn ping_pong_two_rounds() {
    loom::model(|| {
        let (mut ping_rec, mut ping_wait) = CpuGpuEvent::named("ping");
        let (mut pong_rec, mut pong_wait) = CpuGpuEvent::named("pong");
        let other = thread::spawn(move || {
            for _ in 0..2 {
                ping_wait.wait_until(never()).unwrap();
                pong_rec.record().unwrap();
            }
        });
        for _ in 0..2 {
            // Never AlreadyRecorded: the previous ping was consumed before the pong came.
            ping_rec.record().unwrap();
            pong_wait.wait_until(never()).unwrap();
        }
        other.join().unwrap();
    });
}

#[test]
fn one_record_is_consumed_exactly_once() {
    loom::model(|| {
        let (mut rec, mut wait) = CpuGpuEvent::named("model");
        let producer = thread::spawn(move || {
            rec.record().unwrap();
            drop(rec);
        });
        wait.wait_until(never()).unwrap();
        match wait.wait_until(never()) {
            Err(EventError::Closed {
                side: Side::Producer,
                ..
            }) => {}
            other => panic!("second wait must see the recorder closed, got {other:?}"),
        }
        producer.join().unwrap();
    });
}

#[test]
fn recorder_drop_wakes_the_waiter() {
    loom::model(|| {
        let (rec, mut wait) = CpuGpuEvent::named("model");
        let producer = thread::spawn(move || drop(rec));
        assert!(matches!(
            wait.wait_until(never()),
            Err(EventError::Closed {
                side: Side::Producer,
                ..
            })
        ));
        producer.join().unwrap();
    });
}

#[test]
fn waiter_close_racing_record() {
    loom::model(|| {
        let (mut rec, mut wait) = CpuGpuEvent::named("model");
        let consumer = thread::spawn(move || wait.close());
        // Either the record landed before the close, or it sees the close; never a hang.
        match rec.record() {
            Ok(())
            | Err(EventError::Closed {
                side: Side::Consumer,
                ..
            }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
        consumer.join().unwrap();
        assert!(rec.is_closed());
    });
}

#[test]
fn publish_racing_take_delivers_and_wakes_the_sender() {
    loom::model(|| {
        let (mut tx, mut rx) = handoff::<u32>();
        let producer = thread::spawn(move || {
            tx.publish(7).unwrap();
            tx.wait_consumed(never()).unwrap();
        });
        assert_eq!(rx.take_until(never()), Ok(7));
        producer.join().unwrap();
    });
}

#[test]
fn publish_racing_try_take_and_close_is_consumed_exactly_once() {
    loom::model(|| {
        let (mut tx, mut rx) = handoff::<u32>();
        let producer = thread::spawn(move || {
            tx.publish(7).unwrap();
            drop(tx);
        });
        let first = match rx.try_take() {
            Ok(Some(v)) => v,
            Ok(None) => rx.take_until(never()).unwrap(),
            Err(e) => panic!("the value was published before the close: {e:?}"),
        };
        assert_eq!(first, 7);
        assert!(matches!(
            rx.take_until(never()),
            Err(HandoffError::Closed {
                side: Side::Producer,
                ..
            })
        ));
        producer.join().unwrap();
    });
}

#[test]
fn receiver_close_wakes_a_parked_sender() {
    loom::model(|| {
        let (mut tx, mut rx) = handoff::<u32>();
        let producer = thread::spawn(move || match tx.publish(1) {
            Ok(()) => tx.wait_consumed(never()),
            Err(e) => Err(e.into_error()),
        });
        rx.close();
        assert!(matches!(
            producer.join().unwrap(),
            Err(HandoffError::Closed {
                side: Side::Consumer,
                ..
            })
        ));
    });
}

#[test]
fn sender_close_wakes_a_parked_receiver() {
    loom::model(|| {
        let (mut tx, mut rx) = handoff::<u32>();
        let producer = thread::spawn(move || tx.close());
        assert!(matches!(
            rx.take_until(never()),
            Err(HandoffError::Closed {
                side: Side::Producer,
                ..
            })
        ));
        producer.join().unwrap();
    });
}

#[test]
fn take_racing_receiver_side_wait_consumed() {
    // The sender waits for consumption while the receiver takes and then closes: the sender
    // must see Ok (taken first) and never a Closed that hides a completed take.
    loom::model(|| {
        let (mut tx, mut rx) = handoff::<u32>();
        tx.publish(3).unwrap();
        let consumer = thread::spawn(move || {
            assert_eq!(rx.try_take(), Ok(Some(3)));
            rx.close();
        });
        assert_eq!(tx.wait_consumed(never()), Ok(()));
        consumer.join().unwrap();
    });
}
