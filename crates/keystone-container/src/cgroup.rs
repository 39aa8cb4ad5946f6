//! Resource limits for a container sandbox: memory and CPU (and a pids cap
//! against fork bombs), through cgroup v2 where the host has it unified,
//! else the v1 controllers (this project's CI machines mount only v1).
//!
//! Root creates `keystone/<id>` groups. An unprivileged user can only use
//! a delegated v2 subtree (its own cgroup, writable); without one, limits
//! are not enforced and the reason is reported, never hidden.

use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum Cgroup {
    V2 { path: PathBuf },
    V1 { dirs: Vec<PathBuf> },
    None { reason: String },
}

pub fn version() -> &'static str {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        "v2"
    } else if Path::new(ROOT).join("memory").is_dir() {
        "v1"
    } else {
        "none"
    }
}

impl Cgroup {
    pub fn create(id: &str, memory_mb: u32, vcpus: u32) -> Cgroup {
        let rootless = !nix::unistd::geteuid().is_root();
        let result = match version() {
            "v2" => create_v2(id, memory_mb, vcpus, rootless),
            "v1" if rootless => Err(
                "this host has cgroup v1, which cannot be delegated to an unprivileged user".into(),
            ),
            "v1" => create_v1(id, memory_mb, vcpus),
            _ => Err("no cgroup filesystem is mounted at /sys/fs/cgroup".into()),
        };
        match result {
            Ok(cg) => cg,
            Err(reason) => Cgroup::None {
                reason: format!("memory and CPU limits are not enforced: {reason}"),
            },
        }
    }

    /// Put `pid` into the group.
    pub fn add(&self, pid: i32) -> Result<(), String> {
        for dir in self.dirs() {
            let f = dir.join("cgroup.procs");
            fs::write(&f, pid.to_string()).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        Ok(())
    }

    fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V2 { path } => vec![path.clone()],
            Cgroup::V1 { dirs } => dirs.clone(),
            Cgroup::None { .. } => vec![],
        }
    }

    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match self {
            Cgroup::V2 { path } => path.join("memory.current"),
            Cgroup::V1 { dirs } => dirs
                .iter()
                .find(|d| d.starts_with(Path::new(ROOT).join("memory")))?
                .join("memory.usage_in_bytes"),
            Cgroup::None { .. } => return None,
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in self.dirs() {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kill everything left in the group and remove it; verified: returns
    /// an error naming what remains.
    pub fn destroy(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "processes {pids:?} survived SIGKILL in the sandbox's cgroup"
                ));
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in self.dirs() {
            let mut tries = 0;
            while d.exists() {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("cannot remove cgroup {}: {e}", d.display())),
                }
            }
        }
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }
}

fn create_v1(id: &str, memory_mb: u32, vcpus: u32) -> Result<Cgroup, String> {
    let mut dirs = Vec::new();
    let settings: [(&str, Vec<(&str, String)>); 3] = [
        (
            "memory",
            vec![(
                "memory.limit_in_bytes",
                (u64::from(memory_mb) << 20).to_string(),
            )],
        ),
        (
            "cpu",
            vec![
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", (u64::from(vcpus) * 100_000).to_string()),
            ],
        ),
        ("pids", vec![("pids.max", "32768".into())]),
    ];
    for (controller, files) in settings {
        let base = Path::new(ROOT).join(controller);
        if !base.is_dir() {
            continue;
        }
        let dir = base.join("keystone").join(id);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        dirs.push(dir.clone());
        for (file, value) in files {
            fs::write(dir.join(file), &value)
                .map_err(|e| format!("{}/{file}: {e}", dir.display()))?;
        }
    }
    Ok(Cgroup::V1 { dirs })
}

fn create_v2(id: &str, memory_mb: u32, vcpus: u32, rootless: bool) -> Result<Cgroup, String> {
    let parent = if rootless {
        // Our own cgroup, if it was delegated to us (writable).
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
            .ok_or("cannot read /proc/self/cgroup")?;
        let dir = Path::new(ROOT).join(own.trim_start_matches('/'));
        if nix::unistd::access(&dir.join("cgroup.procs"), nix::unistd::AccessFlags::W_OK).is_err() {
            return Err(format!(
                "cgroup {} is not delegated to this user (run under `systemd-run --user --scope -p Delegate=yes`)",
                dir.display()
            ));
        }
        dir.parent()
            .map(Path::to_path_buf)
            .ok_or("no parent cgroup")?
    } else {
        let dir = Path::new(ROOT).join("keystone");
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let _ = fs::write(
            Path::new(ROOT).join("cgroup.subtree_control"),
            "+memory +cpu +pids",
        );
        dir
    };
    let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
    let dir = parent.join(format!("keystone-{id}"));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |file: &str, value: String| {
        fs::write(dir.join(file), value).map_err(|e| format!("{}/{file}: {e}", dir.display()))
    };
    write("memory.max", (u64::from(memory_mb) << 20).to_string())?;
    write("cpu.max", format!("{} 100000", u64::from(vcpus) * 100_000))?;
    let _ = write("pids.max", "32768".into());
    Ok(Cgroup::V2 { path: dir })
}
