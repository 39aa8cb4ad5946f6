//! Identifying a process across commands without trusting a bare PID.
//!
//! A PID recorded by one command may have been reused by the time the next
//! command reads it. We record the PID together with the process's start
//! time (field 22 of `/proc/PID/stat`, in clock ticks since boot); a process
//! is "the same" only if both match.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of the calling process.
    pub fn current() -> Option<ProcessId> {
        Self::of(std::process::id() as i32)
    }

    /// The identity of a live process, if it exists.
    pub fn of(pid: i32) -> Option<ProcessId> {
        start_time(pid).map(|start_time| ProcessId { pid, start_time })
    }

    /// Whether this exact process is still alive (and not a zombie).
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

fn start_time(pid: i32) -> Option<u64> {
    read_stat(pid).map(|(_, t)| t)
}

/// (state char, start time) from /proc/PID/stat.
fn read_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: parse from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state come fields 4.. ; start time is field 22 overall,
    // i.e. the 20th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive() {
        let me = ProcessId::current().expect("own stat");
        assert!(me.is_alive());
        let wrong = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !wrong.is_alive(),
            "a different start time is another process"
        );
    }

    #[test]
    fn dead_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let id = ProcessId::of(child.id() as i32);
        child.wait().expect("wait");
        if let Some(id) = id {
            assert!(!id.is_alive());
        }
    }
}
