//! `moeshift plan` end to end: the built binary on files in a temporary directory.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// DeepSeek's README example (also vLLM's `test_basic_rebalance`).
const README_LOAD: &str = "[[90,132,40,61,104,165,39,4,73,56,183,86],\
                           [20,107,104,64,19,197,187,157,172,86,16,27]]";
const README_PHY2LOG: [[usize; 16]; 2] = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
];
const README_LOGCNT: [[usize; 12]; 2] = [
    [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
    [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
];

/// A fresh directory for one test's files.
fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "moeshift-plan-cli-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn moeshift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeshift"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run moeshift")
}

fn readme_args(load: &str) -> Vec<String> {
    [
        "--load",
        load,
        "--replicas",
        "16",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--gpus",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    moeshift(&refs)
}

/// Exit code 2, exactly one line on stderr mentioning `needle`, no panic.
fn assert_bad_input(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "no output on bad input");
}

#[test]
fn readme_vector_as_json() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    let mut args = readme_args(&load);
    args.extend(["--format".into(), "json".into()]);
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["phy2log"], serde_json::json!(README_PHY2LOG));
    assert_eq!(v["logcnt"], serde_json::json!(README_LOGCNT));
    assert_eq!(v["moved"], serde_json::json!([0, 0]));
    // log2phy lists each expert's slots: expert 1 of layer 0 sits in slots 13 and 15.
    assert_eq!(v["log2phy"][0][1], serde_json::json!([13, 15]));
    let bal = v["balancedness"]
        .as_array()
        .expect("per-layer balancedness");
    assert_eq!(bal.len(), 2);
    for b in bal {
        let b = b.as_f64().unwrap();
        assert!(b > 0.0 && b <= 1.0, "{b}");
    }
}

#[test]
fn weights_object_and_table_format() {
    let dir = scratch();
    let load = write(
        &dir,
        "load.json",
        &format!("{{\"weights\": {README_LOAD}}}"),
    );
    let out = run(&readme_args(&load));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("layer 0") && text.contains("layer 1"),
        "{text}"
    );
    // Rank 0 of layer 0 holds experts 5 and 6.
    assert!(
        text.lines().any(|l| l.trim_end().ends_with(" 5 6")),
        "{text}"
    );
}

#[test]
fn migration_from_an_old_placement() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    // vLLM's initial placement for 12 experts in 16 slots.
    let old = write(
        &dir,
        "old.json",
        "[[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3],[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3]]",
    );
    let mut args = readme_args(&load);
    args.extend(
        [
            "--policy",
            "migration",
            "--old",
            &old,
            "--format",
            "json",
            "--max-moves",
            "4",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for m in v["moved"].as_array().unwrap() {
        assert!(m.as_u64().unwrap() <= 4, "{v}");
    }
    assert_eq!(v["phy2log"].as_array().unwrap().len(), 2);
}

#[test]
fn plot_is_an_svg_file() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    let plot = dir.join("ranks.svg");
    let mut args = readme_args(&load);
    args.extend(["--plot".into(), plot.to_string_lossy().into_owned()]);
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    // Two bars per rank for 8 ranks.
    assert!(svg.matches("<rect").count() >= 16);
}

#[test]
fn malformed_json() {
    let dir = scratch();
    let load = write(&dir, "load.json", "[[1, 2,");
    assert_bad_input(&run(&readme_args(&load)), "not valid JSON");
    let load = write(&dir, "nan.json", "[[NaN, 1]]");
    assert_bad_input(&run(&readme_args(&load)), "not valid JSON");
}

#[test]
fn missing_file() {
    let dir = scratch();
    let missing = dir.join("nope.json").to_string_lossy().into_owned();
    assert_bad_input(&run(&readme_args(&missing)), "cannot read load file");
}

#[test]
fn ragged_rows() {
    let dir = scratch();
    let load = write(&dir, "load.json", "[[1,2,3,4],[1,2,3]]");
    assert_bad_input(&run(&readme_args(&load)), "layer 1");
}

#[test]
fn negative_and_infinite_loads() {
    let dir = scratch();
    let load = write(&dir, "neg.json", "[[1,2,-3,4,5,6,7,8,9,10,11,12]]");
    assert_bad_input(&run(&readme_args(&load)), "expert 2");
    // Finite as JSON, infinite as f32.
    let load = write(&dir, "inf.json", "[[1,2,3,1e39,5,6,7,8,9,10,11,12]]");
    assert_bad_input(&run(&readme_args(&load)), "expert 3");
    let load = write(&dir, "str.json", "[[1,2,\"x\",4]]");
    assert_bad_input(&run(&readme_args(&load)), "not a number");
}

#[test]
fn divisibility_violated() {
    let dir = scratch();
    let load = write(&dir, "load.json", "[[10,20,30,40]]");
    // The "invalid" row of the policy vectors: 7 replicas on 4 GPUs.
    let out = moeshift(&[
        "--load",
        &load,
        "--replicas",
        "7",
        "--groups",
        "2",
        "--nodes",
        "2",
        "--gpus",
        "4",
    ]);
    assert_bad_input(&out, "replicas = 7 is not divisible by gpus = 4");
    // Absurd sizes are refused, not allocated.
    let out = moeshift(&[
        "--load",
        &load,
        "--replicas",
        "1000000000000",
        "--groups",
        "1",
        "--nodes",
        "1",
        "--gpus",
        "1",
    ]);
    assert_bad_input(&out, "larger than moeshift plan handles");
}

#[test]
fn old_placement_of_the_wrong_width() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    let old = write(
        &dir,
        "old.json",
        "[[0,1,2,3,4,5,6,7,8,9,10,11],[0,1,2,3,4,5,6,7,8,9,10,11]]",
    );
    let mut args = readme_args(&load);
    args.extend(["--old".into(), old]);
    assert_bad_input(&run(&args), "has 12 slots, but --replicas is 16");
    let bad = write(
        &dir,
        "bad.json",
        "[[0,1,-2,3,4,5,6,7,8,9,10,11,0,1,2,3],[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3]]",
    );
    let mut args = readme_args(&load);
    args.extend(["--old".into(), bad]);
    assert_bad_input(&run(&args), "slot 2");
}

#[test]
fn migration_without_old() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    let mut args = readme_args(&load);
    args.extend(["--policy".into(), "migration".into()]);
    assert_bad_input(&run(&args), "--old");
}

#[test]
fn migration_options_with_deepseek_or_out_of_range() {
    let dir = scratch();
    let load = write(&dir, "load.json", README_LOAD);
    let mut args = readme_args(&load);
    args.extend(["--max-moves".into(), "3".into()]);
    assert_bad_input(&run(&args), "--policy migration");
    let old = write(
        &dir,
        "old.json",
        "[[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3],[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3]]",
    );
    let mut args = readme_args(&load);
    args.extend(
        ["--policy", "migration", "--old", &old, "--tolerance", "-1"]
            .iter()
            .map(|s| s.to_string()),
    );
    assert_bad_input(&run(&args), "tolerance");
    // An old placement with another number of layers than the load.
    let one_layer = write(&dir, "one.json", "[[0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3]]");
    let mut args = readme_args(&load);
    args.extend(["--old".into(), one_layer]);
    assert_bad_input(&run(&args), "num_layers");
}
