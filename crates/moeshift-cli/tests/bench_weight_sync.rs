//! `moeshift bench weight-sync` end to end with the host engine: the real binary under
//! `moeshift launch`, a trainer and two workers.

mod common;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

/// Runs `moeshift` with `args`, killing it if it runs past `limit`.
fn moeshift(args: &[&str], limit: Duration) -> Output {
    common::moeshift(args, limit).0
}

/// Launches 3 ranks of the benchmark with `extra` arguments; returns rank 0's JSON.
fn bench(extra: &[&str]) -> Value {
    let exe = env!("CARGO_BIN_EXE_moeshift");
    let mut args = vec![
        "launch",
        "--nproc",
        "3",
        "--timeout",
        "60",
        "--",
        exe,
        "bench",
        "weight-sync",
        "--engine",
        "host",
        "--deadline",
        "30",
        "--reps",
        "2",
        "--verify",
    ];
    args.extend_from_slice(extra);
    let out = moeshift(&args, Duration::from_secs(90));
    let (line, stdout) = common::rank0_line(&out);
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("[rank 1] ") || l.starts_with("[rank 2] ")),
        "workers print nothing on stdout:\n{stdout}"
    );
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn check_common(v: &Value, mode: &str, bytes: u64) {
    assert_eq!(v["engine"], "host", "{v}");
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["workers"], 2, "{v}");
    assert_eq!(v["params"], 100_000, "{v}");
    assert_eq!(v["bytes_on_wire"], bytes, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    let seconds = v["seconds"].as_f64().expect("seconds");
    assert!(seconds > 0.0, "{v}");
    let gbps = v["GBps_per_worker"].as_f64().expect("GBps_per_worker");
    let expected = bytes as f64 / seconds / 1e9;
    assert!((gbps - expected).abs() <= expected * 1e-9, "{v}");
}

#[test]
fn packed_dense_reaches_every_worker() {
    // 100 000 bf16 elements in 4 tensors: 200 000 bytes per worker per session.
    let v = bench(&[
        "--params",
        "100000",
        "--tensors",
        "4",
        "--mode",
        "packed",
        "--buffer-mib",
        "1",
    ]);
    check_common(&v, "packed", 200_000);
}

#[test]
fn sparse_moves_indices_and_values_only() {
    // 4 tensors of 25 000 elements, 1 % changed: 250 entries each, 6 bytes per bf16 entry
    // (int32 index + value): 4 · 250 · 6 = 6 000 bytes.
    let v = bench(&[
        "--params",
        "100000",
        "--tensors",
        "4",
        "--mode",
        "sparse",
        "--sparse-fraction",
        "0.01",
    ]);
    check_common(&v, "sparse", 6_000);
    assert_eq!(v["nnz"], 1_000, "{v}");
}

#[test]
fn bad_combinations_fail_with_a_reason() {
    let exe = env!("CARGO_BIN_EXE_moeshift");
    for (extra, reason) in [
        (&["--device", "cuda"][..], "use --device cpu"),
        (
            &["--share-gpus"][..],
            "--share-gpus applies to the nccl and ipc engines",
        ),
    ] {
        let mut args = vec![
            "launch",
            "--nproc",
            "2",
            "--timeout",
            "30",
            "--",
            exe,
            "bench",
            "weight-sync",
            "--engine",
            "host",
            "--params",
            "10",
        ];
        args.extend_from_slice(extra);
        let out = moeshift(&args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{extra:?}");
        assert!(stderr.contains(reason), "{extra:?}: {stderr}");
    }
}
