//! Cross-thread ordering primitives for moeshift.
//!
//! moeshift moves expert weights on a worker thread while the serving thread keeps running the
//! model. The two threads meet at a few points, and this crate owns those meeting points:
//!
//! * [`CpuGpuEvent`]: record→wait ordering between one producer thread and one consumer
//!   thread. A CPU flag makes the consumer block until the producer recorded; an optional
//!   device event (feature `cuda`) then orders the consumer's CUDA stream after the producer's.
//! * [`handoff()`]: a one-slot handoff of a per-layer result from the worker to the serving
//!   thread, with a non-blocking take and a deadline-bounded "wait until consumed".
//! * [`Deadline`]: the point in time after which any blocking call gives up.
//!
//! Every blocking call takes a [`Deadline`], and every primitive has two non-`Clone`, `Send`
//! halves: dropping or closing one half wakes the other with a typed `Closed` error, so a thread
//! never stays parked on a partner that went away.
//!
//! # Example
//!
//! A worker stages a layer, hands the result over, and waits (bounded) until the serving
//! thread took it before reusing its staging buffer:
//!
//! ```
//! use moeshift_sync::{handoff, CpuGpuEvent, Deadline};
//! use std::time::Duration;
//!
//! let (mut start_rec, mut start_wait) = CpuGpuEvent::named("rearrange requested");
//! let (mut result_tx, mut result_rx) = handoff::<(usize, Vec<u32>)>();
//!
//! let worker = std::thread::spawn(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     start_wait.wait_until(Deadline::after(Duration::from_secs(10)))?;
//!     for layer in 0..3 {
//!         let new_map = vec![layer as u32; 4];
//!         result_tx.publish((layer, new_map)).map_err(|e| e.into_error())?;
//!         result_tx.wait_consumed(Deadline::after(Duration::from_secs(10)))?;
//!     }
//!     Ok(())
//! });
//!
//! start_rec.record()?;
//! let deadline = Deadline::after(Duration::from_secs(10));
//! let mut committed = Vec::new();
//! while committed.len() < 3 && !deadline.is_expired() {
//!     // Once per serving step: commit a finished layer if there is one.
//!     match result_rx.try_take()? {
//!         Some((layer, _map)) => committed.push(layer),
//!         None => std::thread::yield_now(),
//!     }
//! }
//! worker.join().unwrap().unwrap();
//! assert_eq!(committed, vec![0, 1, 2]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! * `cuda`: `EventRecorder::record_on(&CudaStream)` and `EventWaiter::wait_on(&CudaStream, _)`
//!   through cudarc 0.19 (loaded at run time; nothing is linked at build time).
//!
//! # Model checking
//!
//! Under `RUSTFLAGS="--cfg loom"` the primitives are built on loom's mutex and condition
//! variable, and `tests/loom.rs` explores their interleavings.
#![deny(missing_docs)]

pub mod deadline;
#[cfg(feature = "cuda")]
mod device;
pub mod event;
pub mod handoff;
mod shim;
mod slot;

pub use deadline::{Deadline, DeadlineExceeded};
pub use event::{CpuGpuEvent, EventError, EventRecorder, EventWaiter};
pub use handoff::{
    handoff, named_handoff, HandoffError, HandoffReceiver, HandoffSender, PublishError,
};
pub use slot::Side;
