//! Helpers shared by the CLI's end-to-end tests.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `moeshift` with `args` (outside any rank environment: `RANK` is removed, so `demo`
/// acts as its own launcher), killing it if it runs past `limit`. Returns its output and
/// how long it ran.
pub fn moeshift(args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeshift"))
        .args(args)
        .env_remove("RANK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moeshift");
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out_pipe, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err_pipe, &mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moeshift {args:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    let output = Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    };
    (output, elapsed)
}

/// The one line rank 0 printed on stdout (without the launcher's `[rank 0] ` prefix) and the
/// whole stdout, after checking that the run succeeded and rank 0 printed exactly one line.
#[allow(dead_code)] // the bench tests use it, the other test files share this module
pub fn rank0_line(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[rank 0] "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "rank 0 prints one line:\n{stdout}\n{stderr}"
    );
    (lines[0].to_string(), stdout)
}
