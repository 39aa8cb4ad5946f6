//! A bounded writable layer for root's container sandboxes: the overlay's
//! upper and work directories live on an ext4 file system in a sparse
//! image file (`disk/layer.img`) of the sandbox's `disk` size, as the
//! microVM's live on its 16 GB disk. Filling it fails inside the sandbox
//! (ENOSPC) and leaves the host's file system, the registry and the other
//! sandboxes alone. The image is loop-mounted in the sandbox's own staging
//! mount namespace (see `init::stage`), so the mount and its loop device go
//! away with the sandbox, however it ends.
//!
//! Not bounded, and said so at start: an unprivileged user's sandbox (no
//! loop mounts without root), and a layer made before this existed (a
//! plain `disk/upper` directory, kept as it is so nothing is lost; `start
//! --fresh` makes a bounded one).

use keystone_backend::{BackendError, Instance};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const IMAGE: &str = "layer.img";

/// Where a sandbox's writable layer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    /// `disk/layer.img`, this many GB.
    Bounded { image: PathBuf, gb: u32 },
    /// `disk/upper` on the host's file system, with the reason.
    Unbounded { reason: String },
}

pub fn image_of(inst: &Instance) -> PathBuf {
    inst.dir.join("disk").join(IMAGE)
}

/// The layer for `inst`, the image made (empty, sparse, ext4 with its root
/// owned by `owner`) when there is none yet.
pub fn prepare(inst: &Instance, as_root: bool, owner: (u32, u32)) -> Result<Layer, BackendError> {
    let image = image_of(inst);
    let gb = inst.settings.disk_gb;
    if image.exists() {
        let gb = size_gb(&image);
        return Ok(Layer::Bounded { image, gb });
    }
    if inst.dir.join("disk/upper").is_dir() {
        return Ok(Layer::Unbounded {
            reason: "its disk was made before disks were bounded and is kept as it is; `start --fresh` makes a bounded one".into(),
        });
    }
    if !as_root {
        return Ok(Layer::Unbounded {
            reason: "an unprivileged user cannot mount a disk image".into(),
        });
    }
    let dir = inst.dir.join("disk");
    fs::create_dir_all(&dir).map_err(BackendError::io(dir.display().to_string()))?;
    let partial = dir.join(format!(".{IMAGE}.partial"));
    let _ = fs::remove_file(&partial);
    let made = (|| -> Result<(), BackendError> {
        let f =
            fs::File::create(&partial).map_err(BackendError::io(partial.display().to_string()))?;
        f.set_len(u64::from(gb) << 30)
            .map_err(BackendError::io(partial.display().to_string()))?;
        drop(f);
        // No reserved blocks (the guest's root is the only user), the
        // root directory already the guest root's, lazy inode tables (a
        // 16 GB image is made in well under a second).
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E"])
            .arg(format!(
                "root_owner={}:{},lazy_itable_init=1,lazy_journal_init=1",
                owner.0, owner.1
            ))
            .arg(&partial)
            .output()
            .map_err(|e| {
                BackendError::Requirement(format!(
                    "mkfs.ext4 is required for the container's disk: apt-get install e2fsprogs ({e})"
                ))
            })?;
        if !out.status.success() {
            return Err(BackendError::Failed(format!(
                "mkfs.ext4 {}: {}",
                partial.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::rename(&partial, &image).map_err(BackendError::io(image.display().to_string()))
    })();
    if made.is_err() {
        let _ = fs::remove_file(&partial);
    }
    made?;
    Ok(Layer::Bounded { image, gb })
}

/// The image's size in whole GB.
fn size_gb(image: &Path) -> u32 {
    fs::metadata(image)
        .map(|m| u32::try_from(m.len() >> 30).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// What the layer takes on the host: the image's allocated blocks, or the
/// directory's size.
pub fn used_bytes(inst: &Instance) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let image = image_of(inst);
    if let Ok(m) = fs::metadata(&image) {
        return Some(m.blocks() * 512);
    }
    let upper = inst.dir.join("disk/upper");
    upper.exists().then(|| keystone_backend::dir_size(&upper))
}

/// Mount `image` on `target` through a loop device (autocleared: it goes
/// when the mount does). Runs in C's staging mount namespace.
pub fn mount(image: &Path, target: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
        .arg(image)
        .arg(target)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cannot mount the sandbox's disk {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
