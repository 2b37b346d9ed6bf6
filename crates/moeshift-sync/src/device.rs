//! Device-side helpers (feature `cuda`): waiting from the CPU for a device event, with a
//! deadline.

use std::time::Duration;

use cudarc::driver::CudaEvent;

use crate::deadline::{Deadline, DeadlineExceeded};
use crate::event::EventError;

/// Polls `event` until the device work recorded in it finished or `deadline` passes.
///
/// `cuEventSynchronize` cannot be given a timeout, so this polls `cuEventQuery`, first
/// yielding and then sleeping with a growing pause (at most 1 ms, so completion is noticed
/// within about a millisecond).
pub(crate) fn wait_complete(
    event: &CudaEvent,
    deadline: Deadline,
    name: &str,
    round: u64,
) -> Result<(), EventError> {
    let mut pause = Duration::from_micros(20);
    let mut polls = 0u32;
    loop {
        let done = event
            .try_is_complete()
            .map_err(|source| EventError::Device {
                name: name.to_owned(),
                op: "querying the device event",
                source,
            })?;
        if done {
            return Ok(());
        }
        if deadline.is_expired() {
            return Err(EventError::Timeout(DeadlineExceeded {
                what: format!(
                    "waiting for the device work recorded in event `{name}` round {round} to finish"
                ),
            }));
        }
        polls += 1;
        if polls < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause.min(deadline.remaining()));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
}
