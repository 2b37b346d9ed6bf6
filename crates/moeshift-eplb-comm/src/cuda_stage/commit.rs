//! Committing a layer staged in device memory: device-to-device copies from staging into
//! the weights' rows, then duplicate fills from the freshly written rows, on the staging's
//! commit stream.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use moeshift_placement::RankPlan;
use moeshift_sync::Deadline;

use super::memory::{driver_error, join_streams, wait_event, CopyQueue};
use crate::error::EplbCommError;
use crate::staging::{Staging, StagingMemory};
use crate::weights::LayerWeights;

/// Writes every staged row of `staging` into `weights`, then the duplicate fills of `plan`,
/// and waits for the copies (until `deadline`). The caller checked the rows and devices.
pub(crate) fn commit_on_device(
    rank: usize,
    layer: usize,
    staging: &Staging,
    plan: &RankPlan,
    weights: &mut LayerWeights<'_>,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let done = queue_commit_on_device(rank, layer, staging, plan, weights)?;
    wait_commit(rank, layer, &done, deadline)
}

/// Waits until the copies of a queued commit finished, or `deadline` passes
/// ([`EplbCommError::DeviceTimeout`]).
pub(crate) fn wait_commit(
    rank: usize,
    layer: usize,
    done: &CudaEvent,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    match wait_event(done, deadline) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EplbCommError::DeviceTimeout {
            rank,
            layer: Some(layer),
            op: "committing staged rows".into(),
        }),
        Err(e) => Err(driver_error(
            rank,
            Some(layer),
            "waiting for the commit's copies".into(),
            e,
        )),
    }
}

/// Queues the commit's copies (staged rows, then duplicate fills) on the staging's commit
/// stream and returns an event recorded after them. On error, what was queued is settled
/// (waited for, bounded) before returning. The caller keeps `staging` alive until the event
/// completed, and checked the rows and devices.
pub(crate) fn queue_commit_on_device(
    rank: usize,
    layer: usize,
    staging: &Staging,
    plan: &RankPlan,
    weights: &mut LayerWeights<'_>,
) -> Result<CudaEvent, EplbCommError> {
    let StagingMemory::Device { buf, commit_stream } = staging.memory() else {
        return Err(EplbCommError::CommitMismatch {
            rank,
            layer,
            detail: "the layer is not staged in device memory".into(),
        });
    };
    let queue = CopyQueue::new(commit_stream, rank, layer)?;
    let tensors = weights.num_tensors();
    let queued = (|| {
        for (i, row) in staging.rows().iter().enumerate() {
            for t in 0..tensors {
                let range =
                    staging
                        .tensor_range(i, t)
                        .ok_or_else(|| EplbCommError::CommitMismatch {
                            rank,
                            layer,
                            detail: format!(
                                "staged row {i} (expert {}) has no tensor {t}",
                                row.expert
                            ),
                        })?;
                queue.buffer_to_row(buf, range.start, weights, t, row.dst_row)?;
            }
        }
        // Same stream: each fill reads its primary after the primary was written.
        for fill in &plan.dup_fills {
            for t in 0..tensors {
                queue.row_to_row(weights, t, fill.src_row, fill.dst_row)?;
            }
        }
        commit_stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| {
                driver_error(
                    rank,
                    Some(layer),
                    "recording the end of the commit's copies".into(),
                    e,
                )
            })
    })();
    if queued.is_err() {
        queue.settle();
    }
    // The staging is freed (or reused) in its allocating stream's order: after the reads
    // queued here.
    if let Some(alloc_stream) = buf.stream() {
        join_streams(alloc_stream, commit_stream).map_err(|e| {
            driver_error(
                rank,
                Some(layer),
                "ordering the release of device staging after the commit".into(),
                e,
            )
        })?;
    }
    queued
}
