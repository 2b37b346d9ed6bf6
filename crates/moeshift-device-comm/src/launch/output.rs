//! Reading the ranks' output: every line of every rank, prefixed with `[rank K] `,
//! forwarded to the launcher's own stdout/stderr and/or kept for the outcome.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;

use parking_lot::Mutex;

/// A line longer than this is cut into several.
const MAX_LINE: usize = 64 * 1024;

/// Which stream of a rank a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line a rank printed (without its line break).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Where it was printed.
    pub stream: Stream,
    /// The text (invalid UTF-8 replaced).
    pub text: String,
}

/// What the launcher does with the ranks' output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Write each line to the launcher's stdout/stderr with a `[rank K] ` prefix, and keep
    /// the last lines of each rank for the outcome.
    Forward,
    /// Only keep the lines for the outcome (up to the capture limit per rank).
    Capture,
}

/// The lines kept for one rank: the last `limit`, plus how many were dropped before them.
#[derive(Debug)]
pub(crate) struct Kept {
    pub lines: VecDeque<OutputLine>,
    pub dropped: usize,
    limit: usize,
}

impl Kept {
    pub fn new(limit: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            dropped: 0,
            limit,
        }
    }

    fn push(&mut self, line: OutputLine) {
        if self.limit == 0 {
            self.dropped += 1;
            return;
        }
        if self.lines.len() == self.limit {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
    }
}

/// Formats one forwarded line.
pub(crate) fn prefixed(rank: usize, text: &str) -> String {
    format!("[rank {rank}] {text}\n")
}

fn emit(rank: usize, stream: Stream, bytes: &[u8], mode: OutputMode, kept: &Mutex<Kept>) {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.ends_with('\r') {
        text.pop();
    }
    if mode == OutputMode::Forward {
        let line = prefixed(rank, &text);
        // A closed stdout (`moeshift launch … | head`) must not stop the draining, or the
        // rank would block on a full pipe: errors are ignored.
        let _ = match stream {
            Stream::Stdout => io::stdout().lock().write_all(line.as_bytes()),
            Stream::Stderr => io::stderr().lock().write_all(line.as_bytes()),
        };
    }
    kept.lock().push(OutputLine { stream, text });
}

/// Reads `source` to its end, splitting it into lines. Runs on its own thread per stream.
pub(crate) fn pump(
    rank: usize,
    stream: Stream,
    mut source: impl Read,
    mode: OutputMode,
    kept: Arc<Mutex<Kept>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut rest = &buf[..n];
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&rest[..pos]);
            emit(rank, stream, &line, mode, &kept);
            line.clear();
            rest = &rest[pos + 1..];
        }
        line.extend_from_slice(rest);
        while line.len() >= MAX_LINE {
            let tail = line.split_off(MAX_LINE);
            emit(rank, stream, &line, mode, &kept);
            line = tail;
        }
    }
    if !line.is_empty() {
        emit(rank, stream, &line, mode, &kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Vec<String> {
        let kept = Arc::new(Mutex::new(Kept::new(100)));
        pump(
            2,
            Stream::Stdout,
            input,
            OutputMode::Capture,
            Arc::clone(&kept),
        );
        let k = kept.lock();
        k.lines.iter().map(|l| l.text.clone()).collect()
    }

    #[test]
    fn splits_lines_and_keeps_an_unterminated_last_line() {
        assert_eq!(run(b"a\nbb\n\nccc"), vec!["a", "bb", "", "ccc"]);
        assert_eq!(run(b"x\r\ny\n"), vec!["x", "y"]);
        assert!(run(b"").is_empty());
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        assert_eq!(run(b"ok\xff\n"), vec!["ok\u{fffd}"]);
    }

    #[test]
    fn very_long_lines_are_cut() {
        let long = vec![b'z'; MAX_LINE * 2 + 5];
        let lines = run(&long);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 5);
    }

    #[test]
    fn keeps_only_the_last_lines_and_counts_the_rest() {
        let mut k = Kept::new(2);
        for t in ["1", "2", "3"] {
            k.push(OutputLine {
                stream: Stream::Stderr,
                text: t.into(),
            });
        }
        let texts: Vec<&str> = k.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, vec!["2", "3"]);
        assert_eq!(k.dropped, 1);
    }

    #[test]
    fn prefix_format() {
        assert_eq!(prefixed(3, "hello"), "[rank 3] hello\n");
    }
}
