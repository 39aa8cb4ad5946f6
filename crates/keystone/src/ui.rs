//! What the user reads, kept apart from logs (tracing goes to stderr only
//! with -v or RUST_LOG). Results go to stdout; notes, warnings and
//! progress to stderr. Colour only on a terminal and without NO_COLOR.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn paint(code: &str, s: &str) -> String {
    if color() {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// `s` with every control character but tab and newline shown as an
/// escape (`\u{1b}`), so text the sandbox wrote (its stderr in an error,
/// a process name, a path, a cluster's reason) cannot drive the user's
/// terminal: no escape sequences, carriage returns or bells. Every note,
/// warning and error passes through it; results that carry guest text
/// call it themselves.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\t' && c != '\n' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn note(msg: impl AsRef<str>) {
    eprintln!("{}", escape_controls(msg.as_ref()));
}

pub fn warn(msg: impl AsRef<str>) {
    eprintln!(
        "{} {}",
        paint("33;1", "warning:"),
        escape_controls(msg.as_ref())
    );
}

pub fn error(msg: impl AsRef<str>) {
    eprintln!(
        "{} {}",
        paint("31;1", "error:"),
        escape_controls(msg.as_ref())
    );
}

/// One cause of the error above it, indented under it (as uv prints them).
pub fn caused_by(msg: impl AsRef<str>) {
    eprintln!(
        "  {} {}",
        paint("2", "caused by:"),
        escape_controls(msg.as_ref())
    );
}

/// A spinner on a terminal; plain phase lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(msg: &str) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message(msg.to_string());
            Progress { bar: Some(bar) }
        } else {
            note(msg);
            Progress { bar: None }
        }
    }

    pub fn phase(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => note(msg),
        }
    }

    /// Detail lines only update a spinner; they are not printed plainly.
    pub fn detail(&self, line: &str) {
        if let Some(b) = &self.bar {
            let mut l = line.trim().to_string();
            l.truncate(100);
            b.set_message(l);
        }
    }

    pub fn finish(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        note(msg);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl keystone_image::Progress for Progress {
    fn phase(&self, message: &str) {
        Progress::phase(self, message)
    }
    fn line(&self, line: &str) {
        self.detail(line)
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Ask yes/no on the terminal; false when there is no terminal.
pub fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn guest_text_cannot_drive_the_terminal() {
        // A title change, a colour, a carriage return over the line, a bell.
        let hostile = "ok\x1b]0;pwned\x07 \x1b[31mred\r\x08x\ttab\nnext";
        let shown = escape_controls(hostile);
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() && c != '\t' && c != '\n'),
            "{shown:?}"
        );
        assert_eq!(
            shown,
            "ok\\u{1b}]0;pwned\\u{7} \\u{1b}[31mred\\u{d}\\u{8}x\ttab\nnext"
        );
    }
}
