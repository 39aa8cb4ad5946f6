//! The decision log: one JSON line per decision (every DNS answer, CONNECT,
//! HTTP request, TLS check and captured connection), so `keystone agent
//! status` can show what a sandbox tried and `allow` can be suggested.
//! Rotated at [`ROTATE_BYTES`] to `PATH.1` (one old file kept), so a
//! chatty guest cannot fill the disk.

use crate::policy::Decision;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Size at which the log moves to `PATH.1`.
pub const ROTATE_BYTES: u64 = 8 * 1024 * 1024;

/// One decision, as written and as read back by [`tail`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    /// `dns`, `connect`, `http`, `tls` or `tcp`.
    pub proto: String,
    /// The name or address.
    pub host: String,
    /// 53 for DNS.
    pub port: u16,
    /// `allow` or `deny`.
    pub decision: String,
    /// What decided.
    pub rule: String,
}

struct Inner {
    file: Option<File>,
    size: u64,
}

/// The writer: shared by every listener; each line is written whole.
pub struct DecisionLog {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".1");
    PathBuf::from(s)
}

impl DecisionLog {
    /// Append to `path` (created mode 0600 if missing).
    pub fn open(path: &Path) -> io::Result<DecisionLog> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(DecisionLog {
            path: Some(path.to_path_buf()),
            inner: Mutex::new(Inner {
                file: Some(file),
                size,
            }),
        })
    }

    /// A log that only goes to `tracing` (tests).
    pub fn discard() -> DecisionLog {
        DecisionLog {
            path: None,
            inner: Mutex::new(Inner {
                file: None,
                size: 0,
            }),
        }
    }

    /// Write one decision (and trace it). Failures to write are traced,
    /// never fatal: the decision itself already stands.
    pub fn record(&self, proto: &str, host: &str, port: u16, decision: &Decision) {
        let verdict = if decision.allowed { "allow" } else { "deny" };
        if decision.allowed {
            tracing::info!(proto, host, port, rule = %decision.rule, "egress allow");
        } else {
            tracing::warn!(proto, host, port, rule = %decision.rule, "egress deny");
        }
        let Some(path) = &self.path else { return };
        let ev = Event {
            time: rfc3339(SystemTime::now()),
            proto: proto.to_string(),
            host: host.to_string(),
            port,
            decision: verdict.to_string(),
            rule: decision.rule.clone(),
        };
        let Ok(mut line) = serde_json::to_vec(&ev) else {
            return;
        };
        line.push(b'\n');
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.size + line.len() as u64 > ROTATE_BYTES && inner.size > 0 {
            inner.file = None;
            if let Err(e) = std::fs::rename(path, rotated(path)) {
                tracing::warn!("decision log rotate {}: {e}", path.display());
            }
            inner.size = 0;
        }
        if inner.file.is_none() {
            match open_append(path) {
                Ok(f) => {
                    inner.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                    inner.file = Some(f);
                }
                Err(e) => {
                    tracing::warn!("decision log {}: {e}", path.display());
                    return;
                }
            }
        }
        let n = line.len() as u64;
        if let Some(f) = inner.file.as_mut() {
            match f.write_all(&line) {
                Ok(()) => inner.size += n,
                Err(e) => tracing::warn!("decision log {}: {e}", path.display()),
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The latest `n` decisions, oldest first, from `PATH.1` and `PATH`.
/// Missing files and lines that do not parse are skipped.
pub fn tail(path: &Path, n: usize) -> Vec<Event> {
    let mut out = std::collections::VecDeque::with_capacity(n.min(4096));
    if n == 0 {
        return Vec::new();
    }
    for p in [rotated(path), path.to_path_buf()] {
        let Ok(f) = File::open(&p) else { continue };
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                if out.len() == n {
                    out.pop_front();
                }
                out.push_back(ev);
            }
        }
    }
    out.into()
}

/// `2026-01-02T03:04:05Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn d(allowed: bool, rule: &str) -> Decision {
        Decision {
            allowed,
            rule: rule.into(),
        }
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // leap day 2024
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn writes_lines_and_tails() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("egress.log");
        let log = DecisionLog::open(&path).expect("open");
        log.record("dns", "a.com", 53, &d(true, "allow a.com"));
        log.record("connect", "evil.com", 443, &d(false, "no rule allows it"));
        let text = std::fs::read_to_string(&path).expect("read");
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("line")).expect("json");
        assert_eq!(first["proto"], "dns");
        assert_eq!(first["port"], 53);
        assert_eq!(first["decision"], "allow");
        assert!(first["time"].as_str().expect("time").ends_with('Z'));
        let t = tail(&path, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].host, "evil.com");
        assert_eq!(t[0].decision, "deny");
        assert_eq!(tail(&path, 10).len(), 2);
        assert!(tail(&dir.path().join("none"), 5).is_empty());
    }

    #[test]
    fn rotates_and_tail_reads_both() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("egress.log");
        // Start just under the limit.
        let mut fill = vec![b'x'; ROTATE_BYTES as usize - 151];
        fill.push(b'\n');
        std::fs::write(&path, fill).expect("fill");
        let log = DecisionLog::open(&path).expect("open");
        log.record("tcp", "old.com", 22, &d(true, "r"));
        log.record("tcp", "new.com", 22, &d(true, "r"));
        assert!(rotated(&path).exists());
        assert!(std::fs::metadata(&path).expect("meta").len() < 1000);
        let t = tail(&path, 5);
        let hosts: Vec<&str> = t.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, vec!["old.com", "new.com"]);
    }
}
