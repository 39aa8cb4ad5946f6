//! Synthetic addresses: the guest never learns a real IP. Each allowed name
//! the guest resolves gets an address in 198.18.0.0/15 (RFC 2544's
//! benchmarking range, unused on the Internet) that names the host again
//! when a connection to it is captured.
//!
//! An address, once given, is never given to another name for the pool's
//! life, and the pool is persisted (one JSON file per sandbox, written
//! atomically on every allocation), so an address a guest cached before a
//! daemon restart can never reach a different host than the one it was
//! resolved for (the "Clash" failure mode: reused fake IPs sending host A's
//! credentials to host B). Nothing is evicted; a full pool fails closed.
//!
//! Reserved: the network and broadcast addresses of the /15, [`GATEWAY`],
//! and every address ending in .0 or .255 (some stacks treat those as
//! network/broadcast addresses of a /24).

use crate::GATEWAY;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first address of the range, 198.18.0.0.
pub const POOL_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Its size: a /15.
pub const POOL_SIZE: u32 = 1 << 17;

/// Is `ip` inside 198.18.0.0/15 (allocated or not)?
pub fn in_range(ip: Ipv4Addr) -> bool {
    u32::from(ip) & !(POOL_SIZE - 1) == u32::from(POOL_BASE)
}

fn reserved(ip: Ipv4Addr) -> bool {
    let last = ip.octets()[3];
    ip == GATEWAY || last == 0 || last == 255
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    version: u32,
    names: BTreeMap<String, Ipv4Addr>,
}

struct Inner {
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
    path: Option<PathBuf>,
}

/// One sandbox's name ↔ address map. Thread-safe.
pub struct FakePool {
    inner: Mutex<Inner>,
}

impl FakePool {
    /// A pool that lives in memory only (tests, or a caller that accepts
    /// losing the map on restart).
    pub fn in_memory() -> FakePool {
        FakePool {
            inner: Mutex::new(Inner {
                by_name: HashMap::new(),
                by_ip: HashMap::new(),
                path: None,
            }),
        }
    }

    /// Load the pool persisted at `path` (missing is empty). A file that
    /// does not parse, or maps an address outside the range, a reserved
    /// one, or one address to two names, is an error: better no network
    /// than a map that could send a cached address to the wrong host.
    pub fn open(path: &Path) -> io::Result<FakePool> {
        let file: File = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(e),
        };
        let mut by_name = HashMap::new();
        let mut by_ip = HashMap::new();
        for (name, ip) in file.names {
            let bad = |why: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {name} -> {ip}: {why}", path.display()),
                )
            };
            if !in_range(ip) || reserved(ip) {
                return Err(bad("not an address this pool hands out"));
            }
            if let Some(other) = by_ip.insert(ip, name.clone()) {
                return Err(bad(&format!("address also given to {other}")));
            }
            by_name.insert(name, ip);
        }
        Ok(FakePool {
            inner: Mutex::new(Inner {
                by_name,
                by_ip,
                path: Some(path.to_path_buf()),
            }),
        })
    }

    /// The name an address was given to.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<String> {
        self.inner.lock().ok()?.by_ip.get(&ip).cloned()
    }

    /// The address for `name` (already normalised by the caller): the one
    /// it has, or a new one, persisted before it is returned. `None` when
    /// the pool is full or the file cannot be written (fail closed).
    pub fn assign(&self, name: &str) -> Option<Ipv4Addr> {
        let mut inner = self.inner.lock().ok()?;
        if let Some(ip) = inner.by_name.get(name) {
            return Some(*ip);
        }
        let start = fnv1a(name.as_bytes()) % POOL_SIZE as u64;
        let ip = (0..POOL_SIZE as u64)
            .map(|i| Ipv4Addr::from(u32::from(POOL_BASE) + ((start + i) % POOL_SIZE as u64) as u32))
            .find(|ip| !reserved(*ip) && !inner.by_ip.contains_key(ip))?;
        inner.by_name.insert(name.to_string(), ip);
        inner.by_ip.insert(ip, name.to_string());
        if let Some(path) = inner.path.clone() {
            if let Err(e) = save(&path, &inner.by_name) {
                tracing::error!("pool {}: {e}; {name} gets no address", path.display());
                inner.by_name.remove(name);
                inner.by_ip.remove(&ip);
                return None;
            }
        }
        Some(ip)
    }

    /// How many names have addresses.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.by_name.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Write the whole map to a temp file beside `path`, fsync, rename.
fn save(path: &Path, names: &HashMap<String, Ipv4Addr>) -> io::Result<()> {
    let file = File {
        version: 1,
        names: names.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let a = FakePool::in_memory();
        let b = FakePool::in_memory();
        let x = a.assign("api.example.com").expect("x");
        assert_eq!(b.assign("api.example.com"), Some(x));
        assert_eq!(a.assign("api.example.com"), Some(x));
        assert!(in_range(x) && !reserved(x) && x != GATEWAY);
        assert_eq!(a.lookup(x).as_deref(), Some("api.example.com"));
        assert_eq!(a.lookup(GATEWAY), None);
        let y = a.assign("other.example.com").expect("y");
        assert_ne!(x, y);
    }

    #[test]
    fn never_reassigns_and_probes_past_collisions() {
        let p = FakePool::in_memory();
        let mut seen = HashMap::new();
        for i in 0..5000 {
            let n = format!("h{i}.example.com");
            let ip = p.assign(&n).expect("assign");
            assert!(!reserved(ip), "{ip}");
            if let Some(prev) = seen.insert(ip, n.clone()) {
                panic!("{ip} given to {prev} and {n}");
            }
        }
        for (ip, n) in &seen {
            assert_eq!(p.lookup(*ip).as_deref(), Some(n.as_str()));
        }
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("pool.json");
        let p = FakePool::open(&path).expect("open");
        let a = p.assign("a.example.com").expect("a");
        let b = p.assign("b.example.com").expect("b");
        drop(p);
        let p = FakePool::open(&path).expect("reopen");
        assert_eq!(p.lookup(a).as_deref(), Some("a.example.com"));
        assert_eq!(p.lookup(b).as_deref(), Some("b.example.com"));
        assert_eq!(p.assign("b.example.com"), Some(b));
        let c = p.assign("c.example.com").expect("c");
        assert!(c != a && c != b);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn refuses_a_corrupt_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("pool.json");
        for body in [
            r#"{"version":1,"names":{"a.com":"198.18.0.1"}}"#,
            r#"{"version":1,"names":{"a.com":"10.0.0.1"}}"#,
            r#"{"version":1,"names":{"a.com":"198.18.3.4","b.com":"198.18.3.4"}}"#,
            "garbage",
        ] {
            std::fs::write(&path, body).expect("write");
            assert!(FakePool::open(&path).is_err(), "{body}");
        }
    }

    #[test]
    fn unwritable_file_fails_closed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("missing-dir").join("pool.json");
        let p = FakePool::open(&path).expect("open");
        assert_eq!(p.assign("a.com"), None);
        assert!(p.is_empty());
    }
}
