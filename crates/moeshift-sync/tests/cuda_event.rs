//! Device half of `CpuGpuEvent` on a real GPU (feature `cuda`). On a machine without a CUDA
//! driver or device these tests return early after saying so; GPU runs happen through
//! `cargo xtask test-multigpu`.
//!
//! The producer stream is kept busy with a long chain of memsets over a large buffer, each
//! writing the next value, and records the event after the last one. A consumer that is
//! correctly ordered after the event must read the final value; one that runs ahead reads an
//! earlier value. cudarc's automatic cross-stream tracking is bypassed (raw pointers and raw
//! driver calls), so only the event provides the ordering.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use moeshift_sync::{CpuGpuEvent, Deadline, EventError};

const BUF_BYTES: usize = 1 << 30;

fn gpu() -> Option<Arc<CudaContext>> {
    // SAFETY: only tries to load the driver library; calls no driver function.
    if !unsafe { sys::is_culib_present() } {
        eprintln!("no CUDA driver library: skipping");
        return None;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => CudaContext::new(0).ok(),
        other => {
            eprintln!("no CUDA device ({other:?}): skipping");
            None
        }
    }
}

struct Busy {
    _buf: CudaSlice<u8>,
    ptr: sys::CUdeviceptr,
}

/// Allocates the buffer (finished before returning), then queues `rounds` memsets on `stream`,
/// round `r` writing the value `r` (1-based, wrapping at 255).
fn queue_memsets(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, rounds: usize) -> Busy {
    let buf = stream.alloc_zeros::<u8>(BUF_BYTES).unwrap();
    let ptr = {
        let (p, _record) = buf.device_ptr(stream);
        p
    };
    stream.synchronize().unwrap();
    ctx.bind_to_thread().unwrap();
    for r in 1..=rounds {
        let value = (r % 255) as u8;
        // SAFETY: `ptr` is a live allocation of BUF_BYTES bytes owned by `buf`, which outlives
        // the queued work (the tests synchronize before dropping it).
        unsafe { result::memset_d8_async(ptr, value, BUF_BYTES, stream.cu_stream()) }.unwrap();
    }
    Busy { _buf: buf, ptr }
}

/// Reads the buffer's last byte on `stream` (raw copy, no implicit cross-stream waits).
fn last_byte(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, ptr: sys::CUdeviceptr) -> u8 {
    ctx.bind_to_thread().unwrap();
    let mut out = [0u8; 1];
    // SAFETY: reads one byte inside the live allocation into `out`, which outlives the copy
    // (the stream is synchronized before `out` is read).
    unsafe {
        result::memcpy_dtoh_async(
            &mut out[..],
            ptr + (BUF_BYTES as u64 - 1),
            stream.cu_stream(),
        )
    }
    .unwrap();
    stream.synchronize().unwrap();
    out[0]
}

#[test]
fn wait_on_orders_the_consumer_stream_after_the_recorded_work() {
    let Some(ctx) = gpu() else { return };
    let producer = ctx.new_stream().unwrap();
    let consumer = ctx.new_stream().unwrap();
    let rounds = 120;
    let expected = (rounds % 255) as u8;

    // Control, for the log only: without the event the consumer usually runs ahead.
    let busy = queue_memsets(&ctx, &producer, rounds);
    let early = last_byte(&ctx, &consumer, busy.ptr);
    producer.synchronize().unwrap();
    eprintln!("control without the event read {early} (final value {expected})");
    drop(busy);

    let (mut rec, mut wait) = CpuGpuEvent::named("gpu ordering");
    let busy = queue_memsets(&ctx, &producer, rounds);
    let ptr = busy.ptr;
    let (ctx2, consumer2) = (Arc::clone(&ctx), Arc::clone(&consumer));
    let reader = thread::spawn(move || {
        wait.wait_on(&consumer2, Deadline::after(Duration::from_secs(60)))
            .unwrap();
        last_byte(&ctx2, &consumer2, ptr)
    });
    // Let the reader block on the CPU flag first: record→wait order must hold either way.
    thread::sleep(Duration::from_millis(20));
    rec.record_on(&producer).unwrap();
    let seen = reader.join().unwrap();
    producer.synchronize().unwrap();
    assert_eq!(seen, expected, "the consumer stream ran ahead of the event");
    drop(busy);
}

#[test]
fn host_wait_on_a_device_event_waits_for_the_device_work() {
    let Some(ctx) = gpu() else { return };
    let producer = ctx.new_stream().unwrap();
    let (mut rec, mut wait) = CpuGpuEvent::named("host wait");
    let busy = queue_memsets(&ctx, &producer, 120);
    rec.record_on(&producer).unwrap();
    wait.wait_until(Deadline::after(Duration::from_secs(60)))
        .unwrap();
    // The recorded work is the producer stream's only work, so the stream is idle now.
    ctx.bind_to_thread().unwrap();
    // SAFETY: queries a live stream owned by `producer`.
    let status = unsafe { sys::cuStreamQuery(producer.cu_stream()) };
    assert_eq!(status, sys::cudaError_enum::CUDA_SUCCESS);
    drop(busy);
}

#[test]
fn host_wait_on_slow_device_work_times_out_with_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let producer = ctx.new_stream().unwrap();
    let (mut rec, mut wait) = CpuGpuEvent::named("slow device");
    // Far more work than the deadline allows (hundreds of GiB of writes).
    let busy = queue_memsets(&ctx, &producer, 2000);
    rec.record_on(&producer).unwrap();
    let err = wait
        .wait_until(Deadline::after(Duration::from_millis(20)))
        .unwrap_err();
    match &err {
        EventError::Timeout(e) => assert!(e.what.contains("device work"), "{}", e.what),
        other => panic!("expected a timeout, got {other:?}"),
    }
    producer.synchronize().unwrap();
    drop(busy);
    // The round counts as consumed: the recorder can record again.
    rec.record_on(&producer).unwrap();
    wait.wait_until(Deadline::after(Duration::from_secs(10)))
        .unwrap();
}

#[test]
fn record_on_refuses_an_unconsumed_round_without_touching_the_device() {
    let Some(ctx) = gpu() else { return };
    let stream = ctx.new_stream().unwrap();
    let (mut rec, mut wait) = CpuGpuEvent::named("double");
    rec.record_on(&stream).unwrap();
    assert!(matches!(
        rec.record_on(&stream),
        Err(EventError::AlreadyRecorded {
            pending_round: 1,
            ..
        })
    ));
    // A host-recorded round waited on a stream is only CPU ordering, and still works.
    wait.wait_on(&stream, Deadline::after(Duration::from_secs(10)))
        .unwrap();
    rec.record().unwrap();
    wait.wait_on(&stream, Deadline::after(Duration::from_secs(10)))
        .unwrap();
    stream.synchronize().unwrap();
}
