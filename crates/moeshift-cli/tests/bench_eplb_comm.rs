//! `moeshift bench eplb-comm` end to end with the host backend: the real binary under
//! `moeshift launch`, four ranks, plans from the placement policies, and the plan file the
//! PyTorch peer replays.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

const RANKS: usize = 4;
const SLOTS: usize = 6;
const EXPERT_BYTES: u64 = 4096;

/// Runs `moeshift` with `args`, killing it if it runs past `limit`.
fn moeshift(args: &[&str], limit: Duration) -> Output {
    common::moeshift(args, limit).0
}

/// A fresh path for a plan file of the test `name`.
fn plan_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "moeshift-bench-eplb-{name}-{}.json",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// The arguments of `moeshift launch --nproc 4 -- moeshift bench eplb-comm` over the host
/// backend, 4 ranks of 6 slots, 3 layers of two 2048-byte tensors, verified, then `extra`.
fn launch_args<'a>(exe: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "launch",
        "--nproc",
        "4",
        "--timeout",
        "60",
        "--",
        exe,
        "bench",
        "eplb-comm",
        "--backend",
        "host",
        "--deadline",
        "30",
        "--experts-per-rank",
        "6",
        "--layers",
        "3",
        "--expert-bytes",
        "4096",
        "--tensors",
        "2",
        "--verify",
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs the benchmark with `extra` arguments; returns rank 0's JSON.
fn bench(extra: &[&str]) -> Value {
    let exe = env!("CARGO_BIN_EXE_moeshift");
    let out = moeshift(&launch_args(exe, extra), Duration::from_secs(90));
    let (line, _) = common::rank0_line(&out);
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn usize_of(v: &Value) -> usize {
    let n = v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    usize::try_from(n).expect("count fits usize")
}

fn list_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(usize_of)
        .collect()
}

/// Checks the plan file at `path` against the benchmark's JSON `v`: the shape, every index
/// in range, every row written once, the moves and fills turning the old map into the new
/// one, and the rows over the wire matching the bytes the benchmark moved. Returns the rows
/// received over the wire and the fills, over all layers.
fn check_plan_file(path: &PathBuf, v: &Value, logical: Option<usize>) -> (usize, usize) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no plan file at {}: {e}", path.display()));
    let plan: Value = serde_json::from_str(&text).expect("the plan file is JSON");
    assert_eq!(plan["ranks"], RANKS, "{plan}");
    assert_eq!(plan["slots_per_rank"], SLOTS, "{plan}");
    assert_eq!(plan["tensor_bytes"], serde_json::json!([2048, 2048]));
    assert_eq!(plan["plan"], v["plan"]);
    let layers = plan["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3);
    let mut cross_total = 0usize;
    let mut fills_total = 0usize;
    for (l, layer) in layers.iter().enumerate() {
        let old = list_of(&layer["old_phy2log"]);
        let new = list_of(&layer["new_phy2log"]);
        assert_eq!((old.len(), new.len()), (RANKS * SLOTS, RANKS * SLOTS));
        if let Some(n) = logical {
            for expert in 0..n {
                assert!(new.contains(&expert), "layer {l} lost expert {expert}");
            }
            assert!(new.iter().all(|&x| x < n), "layer {l}: {new:?}");
        }
        // Replay: moves read the old rows, fills the rows the moves wrote.
        let mut rows = old.clone();
        let mut written = vec![false; rows.len()];
        let (mut cross, mut local) = (0usize, 0usize);
        for m in layer["moves"].as_array().expect("moves") {
            let m = list_of(m);
            assert_eq!(m.len(), 4, "{m:?}");
            let (src, src_row, dst, dst_row) = (m[0], m[1], m[2], m[3]);
            assert!(src < RANKS && dst < RANKS, "layer {l}: {m:?}");
            assert!(src_row < SLOTS && dst_row < SLOTS, "layer {l}: {m:?}");
            let at = dst * SLOTS + dst_row;
            assert!(
                !written[at],
                "layer {l}: row {dst_row} of rank {dst} written twice"
            );
            written[at] = true;
            rows[at] = old[src * SLOTS + src_row];
            if src == dst {
                local += 1;
            } else {
                cross += 1;
            }
        }
        let fills = layer["fills"].as_array().expect("fills");
        for f in fills {
            let f = list_of(f);
            assert_eq!(f.len(), 3, "{f:?}");
            let (rank, src_row, dst_row) = (f[0], f[1], f[2]);
            assert!(rank < RANKS && src_row < SLOTS && dst_row < SLOTS, "{f:?}");
            assert!(
                written[rank * SLOTS + src_row],
                "layer {l}: {f:?} reads no new row"
            );
            let at = rank * SLOTS + dst_row;
            assert!(
                !written[at],
                "layer {l}: row {dst_row} of rank {rank} written twice"
            );
            written[at] = true;
            rows[at] = rows[rank * SLOTS + src_row];
        }
        assert_eq!(rows, new, "layer {l}: the moves do not produce the new map");
        // Every row that changes expert is written.
        for (at, (&o, &n)) in old.iter().zip(&new).enumerate() {
            assert!(
                o == n || written[at],
                "layer {l}: slot {at} changes but is not written"
            );
        }
        if v["plan"] != "random" {
            assert_eq!(usize_of(&v["layer_rows_received"][l]), cross, "layer {l}");
            assert_eq!(
                usize_of(&v["layer_rows_copied"][l]),
                local + fills.len(),
                "layer {l}"
            );
        }
        cross_total += cross;
        fills_total += fills.len();
    }
    assert_eq!(
        cross_total as u64 * EXPERT_BYTES,
        v["bytes_moved"].as_u64().expect("bytes_moved"),
        "rows over the wire × expert bytes"
    );
    let _ = std::fs::remove_file(path);
    (cross_total, fills_total)
}

#[test]
fn migration_plans_move_verified_rows_and_write_the_plan_file() {
    let path = plan_path("migration");
    let file = path.to_str().expect("utf-8 temp path");
    let v = bench(&[
        "--plan",
        "migration",
        "--logical-experts",
        "16",
        "--plan-out",
        file,
    ]);
    assert_eq!(v["plan"], "migration", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["ranks"], RANKS, "{v}");
    assert_eq!(v["experts_per_rank"], SLOTS, "{v}");
    assert_eq!(v["logical_experts"], 16, "{v}");
    assert_eq!(v["drift_sigma"], 0.25, "{v}");
    assert_eq!(v["expert_groups"], 8, "{v}");
    assert!(v["moved_per_rank"].is_null(), "{v}");
    let (cross, _) = check_plan_file(&path, &v, Some(16));
    // Seed 0 moves a few experts over the wire at this shape.
    assert!(cross > 0, "{v}");
}

#[test]
fn deepseek_plans_fill_replicas_from_received_rows() {
    let path = plan_path("deepseek");
    let file = path.to_str().expect("utf-8 temp path");
    let v = bench(&[
        "--plan",
        "deepseek",
        "--logical-experts",
        "16",
        "--plan-out",
        file,
    ]);
    assert_eq!(v["plan"], "deepseek", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    let (cross, fills) = check_plan_file(&path, &v, Some(16));
    // A full re-plan moves far more than the migration-aware one, and with seed 0 places
    // a second replica of a received expert on a rank.
    assert!(cross > 10, "{v}");
    assert!(fills > 0, "{v}");
}

#[test]
fn random_plans_keep_their_output_and_write_the_plan_file() {
    let path = plan_path("random");
    let file = path.to_str().expect("utf-8 temp path");
    let v = bench(&["--moved-per-rank", "2", "--plan-out", file]);
    assert_eq!(v["plan"], "random", "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["moved_per_rank"], 2, "{v}");
    // 2 experts of each of 4 ranks in each of 3 layers.
    assert_eq!(v["bytes_moved"], 2 * 4 * 3 * EXPERT_BYTES, "{v}");
    assert!(v.get("logical_experts").is_none(), "{v}");
    let (cross, fills) = check_plan_file(&path, &v, None);
    assert_eq!((cross, fills), (24, 0));
}

#[test]
fn bad_plan_options_fail_with_a_reason() {
    let exe = env!("CARGO_BIN_EXE_moeshift");
    for (extra, reason) in [
        (
            &["--plan", "migration", "--logical-experts", "25"][..],
            "--logical-experts 25 exceeds the 24 slots",
        ),
        (
            &["--plan", "migration", "--moved-per-rank", "2"][..],
            "--moved-per-rank 2 does not apply",
        ),
        (
            &["--plan", "migration", "--drift-sigma", "-0.5"][..],
            "--drift-sigma",
        ),
        (
            &["--share-gpus"][..],
            "--share-gpus applies to --device cuda",
        ),
    ] {
        let out = moeshift(&launch_args(exe, extra), Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{extra:?}");
        assert!(stderr.contains(reason), "{extra:?}: {stderr}");
    }
}
