//! `moeshift demo` end to end: real processes, the host EPLB backend, every row verified.

mod common;

use std::time::Duration;

/// Runs `moeshift demo` with `args`, killed if it runs past two minutes.
fn demo(args: &[&str]) -> std::process::Output {
    let all: Vec<&str> = std::iter::once("demo")
        .chain(args.iter().copied())
        .collect();
    common::moeshift(&all, Duration::from_secs(120)).0
}

#[test]
fn demo_rebalances_and_verifies_every_row() {
    let out = demo(&[
        "--ranks",
        "3",
        "--windows",
        "3",
        "--layers",
        "2",
        "--experts",
        "24",
        "--slots-per-rank",
        "10",
        "--groups",
        "4",
        "--nodes",
        "1",
        "--expert-bytes",
        "4096",
        "--backend",
        "host",
        "--deadline",
        "30",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let summary = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[rank 0] "))
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(summary).expect("summary is JSON");
    assert_eq!(v["every_row_verified"], true);
    assert_eq!(v["backend"], "host");
    assert_eq!(v["windows"], 3);
    let after = v["mean_balancedness_after"].as_f64().unwrap();
    let before = v["mean_balancedness_before"].as_f64().unwrap();
    let fresh = v["mean_balancedness_fresh_plan"].as_f64().unwrap();
    assert!(
        after >= before,
        "rebalancing made balance worse: {before} -> {after}"
    );
    assert!(
        after >= fresh - 0.01 - 1e-9,
        "migration {after} vs fresh {fresh}"
    );
    let moved = v["mean_share_moved"].as_f64().unwrap();
    let fresh_moved = v["mean_share_moved_fresh_plan"].as_f64().unwrap();
    assert!(
        moved <= fresh_moved,
        "migration moved {moved} > fresh {fresh_moved}"
    );
    assert!(v["bytes_moved"].as_f64().unwrap() > 0.0);
}

#[test]
fn demo_rejects_impossible_sizes() {
    let out = demo(&["--ranks", "2", "--slots-per-rank", "3", "--experts", "10"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot hold 10 experts"), "{stderr}");
}
