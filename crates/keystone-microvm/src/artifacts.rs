//! What `prepare` derives from an image, once per image and shared by its
//! sandboxes (the kernel and the ext4 root, `Artifacts`), and each
//! sandbox's qcow2 overlay over it, with the check that an overlay is only
//! booted over the very file it was made on.

use super::{MicrovmBackend, ROOT_SIZE};
use keystone_backend::disk::{self, FileIdentity};
use keystone_backend::idmap::{self, IdMap};
use keystone_backend::{BackendError, Instance};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `prepare` derives from an image, shared by its sandboxes.
pub(super) struct Artifacts {
    pub(super) dir: PathBuf,
}

impl Artifacts {
    pub(super) fn of(inst: &Instance) -> Artifacts {
        Artifacts {
            dir: inst.cache_dir.join("microvm").join(&inst.image_id),
        }
    }
    pub(super) fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub(super) fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    pub(super) fn complete(&self) -> bool {
        self.dir.join(".keystone-complete").exists()
    }
}

pub(super) fn overlay(inst: &Instance) -> PathBuf {
    if inst.settings.persist {
        inst.dir.join("disk/root.qcow2")
    } else {
        inst.dir.join("run/root.qcow2")
    }
}

impl MicrovmBackend {
    /// Remove an image's derived disk and kernel (on `image rm`).
    pub fn forget_image(cache_dir: &Path, image_id: &str) -> Result<(), BackendError> {
        let dir = cache_dir.join("microvm").join(image_id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(BackendError::io(dir.display().to_string()))?;
        }
        Ok(())
    }

    pub(super) fn build_artifacts(
        inst: &Instance,
        art: &Artifacts,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), BackendError> {
        let parent = art.dir.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(BackendError::io(parent.display().to_string()))?;
        let lock_path = parent.join(format!("{}.lock", inst.image_id));
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(BackendError::io(lock_path.display().to_string()))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| BackendError::Failed(format!("lock {}: {e}", lock_path.display())))?;
        if art.complete() {
            return Ok(());
        }
        progress(&format!(
            "making the microVM disk of image {}",
            inst.image_id
        ));
        let map = IdMap::for_current_user()?;
        let tmp = parent.join(format!(".{}.tmp-{}", inst.image_id, std::process::id()));
        let root = tmp.join("root");
        if tmp.exists() {
            let _ = idmap::run_mapped(
                &map,
                &["rm", "-rf", "--one-file-system", &tmp.display().to_string()],
            );
        }
        fs::create_dir_all(&root).map_err(BackendError::io(root.display().to_string()))?;
        let cleanup = |map: &IdMap| {
            let _ = idmap::run_mapped(
                map,
                &["rm", "-rf", "--one-file-system", &tmp.display().to_string()],
            );
        };
        let tar = inst.image_tar.display().to_string();
        // Unpacked (and the ext4 made) in a user namespace with the
        // sandbox id map, so owners are the image's; the guest's init
        // mounts a devtmpfs.
        let status = idmap::unpack_image(&map, &inst.image_tar, &root)?;
        let root_s = root.display().to_string();
        if !status.success() {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "unpacking {tar} failed ({status})"
            )));
        }
        let kernel = fs::read_dir(root.join("boot")).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
                .max()
        });
        let Some(kernel) = kernel else {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "image {} has no kernel in /boot (it predates the microvm backend); rebuild it with `keystone agent image build`",
                inst.image_id
            )));
        };
        let has_init = root.join("usr/local/sbin/keystone-init").exists();
        if !has_init {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "image {} has no /usr/local/sbin/keystone-init; rebuild it with `keystone agent image build`",
                inst.image_id
            )));
        }
        fs::copy(&kernel, tmp.join("vmlinuz"))
            .map_err(BackendError::io(kernel.display().to_string()))?;
        let ext4 = tmp.join("rootfs.ext4");
        let f = fs::File::create(&ext4).map_err(BackendError::io(ext4.display().to_string()))?;
        f.set_len(ROOT_SIZE)
            .map_err(BackendError::io(ext4.display().to_string()))?;
        drop(f);
        let ext4_s = ext4.display().to_string();
        let status = idmap::run_mapped(
            &map,
            &[
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "keystone",
                "-m",
                "1",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                "-d",
                &root_s,
                &ext4_s,
            ],
        )?;
        let _ = idmap::run_mapped(&map, &["rm", "-rf", "--one-file-system", &root_s]);
        if !status.success() {
            cleanup(&map);
            return Err(BackendError::Failed(format!(
                "mkfs.ext4 -d failed ({status})"
            )));
        }
        // Shared by every sandbox of the image: never written again.
        let _ = fs::set_permissions(&ext4, fs::Permissions::from_mode(0o444));
        fs::write(tmp.join(".keystone-complete"), b"")
            .map_err(BackendError::io(tmp.display().to_string()))?;
        if art.dir.exists() {
            let _ = fs::remove_dir_all(&art.dir);
        }
        fs::rename(&tmp, &art.dir).map_err(BackendError::io(art.dir.display().to_string()))?;
        Ok(())
    }
}

pub(super) fn make_overlay(base: &Path, path: &Path) -> Result<(), BackendError> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).map_err(BackendError::io(p.display().to_string()))?;
    }
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b"],
        &[base, path],
    )?;
    Ok(())
}

/// A qcow2 overlay is only good over the very file it was made on: refuse
/// to boot it over anything else (see `keystone_backend::disk`).
pub(super) fn check_disk_base(
    inst: &Instance,
    base: &Path,
    disk_path: &Path,
) -> Result<(), BackendError> {
    let Some(record) = disk::recorded_for(inst)? else {
        // A disk from before the record existed: its qcow2 header names
        // the base file; the same path is taken as the same base.
        let backing = backing_file(disk_path)?;
        if backing.as_deref() != Some(base) {
            return Err(BackendError::Failed(format!(
                "the disk of sandbox {} is built on {}, not on image {}'s {}; {}",
                inst.name,
                backing.map_or("nothing".into(), |b| b.display().to_string()),
                inst.image_id,
                base.display(),
                disk::fresh_hint(inst)
            )));
        }
        return disk::record_for(inst, Some(base));
    };
    let now = FileIdentity::of(base).map_err(BackendError::io(base.display().to_string()))?;
    if record.file != Some(now) {
        return Err(BackendError::Failed(format!(
            "the disk of sandbox {} was made over another build of image {} (it was removed and \
             built again since), and booting it over this one would corrupt it; {}",
            inst.name,
            inst.image_id,
            disk::fresh_hint(inst)
        )));
    }
    Ok(())
}

/// Run `qemu-img ARGS FILES…`; its output when it succeeded. An error
/// names the last file, the disk being made or read.
pub(super) fn qemu_img(
    args: &[&str],
    files: &[&Path],
) -> Result<std::process::Output, BackendError> {
    let out = Command::new("qemu-img")
        .args(args)
        .args(files)
        .output()
        .map_err(BackendError::io("qemu-img"))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "qemu-img {} {} failed: {}",
            args[0],
            files
                .last()
                .map_or(String::new(), |f| f.display().to_string()),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// The backing file a qcow2 overlay names in its header.
pub(super) fn backing_file(disk: &Path) -> Result<Option<PathBuf>, BackendError> {
    let out = qemu_img(&["info", "--output=json", "-U"], &[disk])?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| BackendError::Failed(format!("qemu-img info {}: {e}", disk.display())))?;
    Ok(info["backing-filename"].as_str().map(PathBuf::from))
}
