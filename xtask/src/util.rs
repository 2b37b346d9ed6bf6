//! Small helpers: the workspace root, running commands, finding test executables.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The workspace root (the folder above `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A `cargo` command (the same cargo that runs xtask) started in the workspace root.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// Runs a command, echoing it, and fails when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command and returns its standard output; fails when it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed with {}", show(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.len() > 120 || a.contains('\n') {
            s.push_str("<script>");
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Builds the integration-test executables (`cargo test --no-run`) with the given selection
/// arguments and returns their paths. `profile` picks a cargo profile (`None` = dev).
pub fn test_executables(select: &[&str], profile: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut cmd = cargo();
    cmd.args(["test", "--no-run", "--message-format=json"])
        .args(select);
    if let Some(p) = profile {
        cmd.args(["--profile", p]);
    }
    let json = output(&mut cmd)?;
    let mut exes = Vec::new();
    for line in json.lines() {
        // Integration tests and unit-test harnesses are built with the test profile
        // (`"profile":{…,"test":true}`); the target object has a `test` flag of its own (whether
        // `cargo test` tests it), so only the profile's counts.
        if !line.contains("\"reason\":\"compiler-artifact\"") || !built_for_test(line) {
            continue;
        }
        if let Some(exe) = json_string_field(line, "executable") {
            exes.push(PathBuf::from(exe));
        }
    }
    exes.sort();
    exes.dedup();
    Ok(exes)
}

/// Whether a compiler-artifact message's profile is a test profile.
fn built_for_test(line: &str) -> bool {
    line.split_once("\"profile\":{")
        .and_then(|(_, rest)| rest.split_once('}'))
        .is_some_and(|(profile, _)| profile.contains("\"test\":true"))
}

/// The names of the tests in a libtest executable.
pub fn list_tests(exe: &Path) -> Result<Vec<String>> {
    let out = output(Command::new(exe).args(["--list", "--format", "terse"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// Extracts a JSON string field from one line of cargo's JSON output (cargo escapes only
/// quotes and backslashes in paths, which this undoes).
fn json_string_field(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn only_the_profile_decides_what_was_built_for_testing() {
        use super::built_for_test;
        let bin = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"test":true},"profile":{"opt_level":"0","test":false},"executable":"/t/moeshift"}"#;
        let harness = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"test":true},"profile":{"opt_level":"0","test":true},"executable":"/t/deps/x-1"}"#;
        assert!(!built_for_test(bin));
        assert!(built_for_test(harness));
        assert!(!built_for_test(r#"{"reason":"compiler-artifact"}"#));
    }

    #[test]
    fn reads_string_fields() {
        let line = r#"{"reason":"compiler-artifact","executable":"/a/b\"c/d","fresh":true}"#;
        assert_eq!(
            json_string_field(line, "executable").as_deref(),
            Some("/a/b\"c/d")
        );
        assert_eq!(json_string_field(line, "missing"), None);
        assert_eq!(
            json_string_field(r#"{"executable":null}"#, "executable"),
            None
        );
    }
}
