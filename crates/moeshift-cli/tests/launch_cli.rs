//! `moeshift launch` end to end: the real binary, real child processes.

mod common;

use common::moeshift;
use std::time::Duration;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_rank_runs_with_its_variables_and_prefixed_output() {
    let (out, _) = moeshift(
        &[
            "launch",
            "--nproc",
            "3",
            "--",
            "sh",
            "-c",
            "echo \"out $RANK of $WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE at $MASTER_ADDR nvls=$NCCL_NVLS_ENABLE\"; echo \"err $RANK\" >&2",
        ],
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for rank in 0..3 {
        let expected = format!("[rank {rank}] out {rank} of 3 local {rank}/3 at 127.0.0.1 nvls=0");
        assert!(
            stdout.lines().any(|l| l == expected),
            "missing {expected:?} in\n{stdout}"
        );
        let expected_err = format!("[rank {rank}] err {rank}");
        assert!(
            stderr.lines().any(|l| l == expected_err),
            "missing {expected_err:?} in\n{stderr}"
        );
    }
    // Every line is prefixed: nothing unprefixed leaks through.
    assert!(stdout.lines().all(|l| l.starts_with("[rank ")), "{stdout}");
}

#[test]
fn master_port_is_passed_through() {
    let (out, _) = moeshift(
        &[
            "launch",
            "--nproc",
            "2",
            "--master-port",
            "23456",
            "--",
            "sh",
            "-c",
            "echo port=$MASTER_PORT",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("[rank 0] port=23456") && stdout.contains("[rank 1] port=23456"),
        "{stdout}"
    );
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let (out, elapsed) = moeshift(
        &[
            "launch",
            "--nproc",
            "3",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            "if [ \"$RANK\" = 1 ]; then echo failing; exit 5; fi; sleep 60",
        ],
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        stderr.contains("rank 1 exited with code 5 first"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 0: was stopped by the launcher"),
        "{stderr}"
    );
    assert!(text(&out.stdout).contains("[rank 1] failing"));
}

#[test]
fn a_rank_killed_by_a_signal_gives_128_plus_the_signal() {
    let (out, elapsed) = moeshift(
        &[
            "launch",
            "--nproc",
            "2",
            "--",
            "sh",
            "-c",
            "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 60",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(text(&out.stderr).contains("SIGKILL"));
}

#[test]
fn the_timeout_stops_everything_with_124() {
    let (out, elapsed) = moeshift(
        &[
            "launch",
            "--nproc",
            "2",
            "--timeout",
            "0.5",
            "--",
            "sleep",
            "60",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(text(&out.stderr).contains("timed out"));
}

#[test]
fn bad_invocations_fail_with_a_message() {
    let (out, _) = moeshift(&["launch", "--nproc", "2"], Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("CMD"), "{}", text(&out.stderr));

    let (out, _) = moeshift(
        &["launch", "--nproc", "0", "--", "true"],
        Duration::from_secs(30),
    );
    assert_ne!(out.status.code(), Some(0));

    let (out, _) = moeshift(
        &[
            "launch",
            "--nproc",
            "1",
            "--",
            "/nonexistent/moeshift-missing-program",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot start rank 0"), "{stderr}");
}
