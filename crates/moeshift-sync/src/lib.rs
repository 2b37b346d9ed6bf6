//! Cross-thread ordering primitives for moeshift: `CpuGpuEvent`, `Handoff<T>` and `Deadline`.
#![deny(missing_docs)]

pub mod deadline;

pub use deadline::{Deadline, DeadlineExceeded};
