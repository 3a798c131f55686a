//! The control protocol: one command per line on stdin, one reply line on stdout.
//!
//! ```text
//! link <src> <dst> <delay_ms> <loss>   ->  ok            (one direction; loss a fraction 0..=1)
//! stats                                ->  {"pairs":[...],"unmatched":0,...}   (one JSON line)
//! quit                                 ->  ok, then the emulator exits
//! anything else                        ->  error: <why>
//! ```
//!
//! Lines are text because the only client is a test fixture that wants to stay readable; the
//! parser and the line splitter are pure so that malformed input is tested here, not discovered
//! in a hung test. End of input (the fixture closed the pipe, or died) stops the emulator.

use std::time::Duration;

use crate::sched::Link;
use crate::WanError;

/// Longest accepted command line, bytes. A longer one is answered with an error and skipped.
pub const MAX_LINE: usize = 1024;

/// A parsed command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Set the link from `src` to `dst`.
    Link {
        src: String,
        dst: String,
        link: Link,
    },
    /// Report every counter.
    Stats,
    /// Exit.
    Quit,
}

/// Parses one line (without its newline).
pub fn parse(line: &str) -> Result<Command, WanError> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    match words.as_slice() {
        ["link", src, dst, delay_ms, loss] => {
            let delay_ms: f64 = delay_ms
                .parse()
                .map_err(|_| WanError::Command(format!("delay {delay_ms:?} is not a number")))?;
            let loss: f64 = loss
                .parse()
                .map_err(|_| WanError::Command(format!("loss {loss:?} is not a number")))?;
            let delay = Duration::try_from_secs_f64(delay_ms / 1e3)
                .map_err(|_| WanError::Command(format!("delay {delay_ms} ms is not a duration")))?;
            Ok(Command::Link {
                src: src.to_string(),
                dst: dst.to_string(),
                link: Link::new(delay, loss)?,
            })
        }
        ["link", ..] => Err(WanError::Command(
            "usage: link <src> <dst> <delay_ms> <loss>".into(),
        )),
        ["stats"] => Ok(Command::Stats),
        ["quit"] => Ok(Command::Quit),
        [] => Err(WanError::Command("empty command".into())),
        [other, ..] => Err(WanError::Command(format!("unknown command {other:?}"))),
    }
}

/// Splits a byte stream into lines, bounded by [`MAX_LINE`].
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Inside an over-long line: its bytes are skipped up to the next newline.
    skipping: bool,
}

/// One item out of a [`LineBuffer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, newline removed (invalid UTF-8 replaced).
    Text(String),
    /// A line longer than [`MAX_LINE`] was dropped.
    TooLong,
}

impl LineBuffer {
    /// Appends `bytes` and returns every line they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.skipping {
                    self.skipping = false;
                } else {
                    out.push(Line::Text(
                        String::from_utf8_lossy(&self.buf)
                            .trim_end_matches('\r')
                            .to_string(),
                    ));
                }
                self.buf.clear();
            } else if !self.skipping {
                if self.buf.len() == MAX_LINE {
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Line::TooLong);
                } else {
                    self.buf.push(b);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("link a b 20.5 0.02").unwrap(),
            Command::Link {
                src: "a".into(),
                dst: "b".into(),
                link: Link {
                    delay: Duration::from_micros(20_500),
                    loss: 0.02
                }
            }
        );
        assert_eq!(parse("  stats ").unwrap(), Command::Stats);
        assert_eq!(parse("quit").unwrap(), Command::Quit);
    }

    #[test]
    fn rejects_bad_commands_with_a_reason() {
        for bad in [
            "",
            "link a b",
            "link a b x 0",
            "link a b 10 y",
            "link a b -1 0",
            "link a b NaN 0",
            "link a b inf 0",
            "link a b 10 1.5",
            "link a b 1e12 0",
            "stats now",
            "reboot",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn splits_lines_across_reads_and_bounds_them() {
        let mut lb = LineBuffer::default();
        assert!(lb.push(b"sta").is_empty());
        assert_eq!(
            lb.push(b"ts\r\nquit\nli"),
            vec![Line::Text("stats".into()), Line::Text("quit".into())]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        assert_eq!(lb.push(&long), vec![Line::TooLong]);
        assert_eq!(lb.push(b"yyy\nstats\n"), vec![Line::Text("stats".into())]);
        let exact = vec![b'z'; MAX_LINE];
        assert_eq!(lb.push(&exact), vec![]);
        assert_eq!(lb.push(b"\n"), vec![Line::Text("z".repeat(MAX_LINE))]);
    }
}
