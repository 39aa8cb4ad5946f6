//! What a sandbox's persistent disk is built on.
//!
//! Both local backends keep a sandbox's disk as a layer over its image: a
//! qcow2 overlay over the image's ext4 file (microVM), an overlayfs upper
//! directory over the image's unpacked tree (container). Such a disk is
//! only good over the very base it was made on: a qcow2 overlay over any
//! other ext4, even one built from the same recipe, is a corrupt file
//! system. `disk/base.json` records that base when the disk is made, so
//! that `start` keeps a sandbox on the image of its disk (not whatever the
//! configuration asks for today), `image rm` refuses an image a disk needs,
//! and the microVM refuses to boot a disk over a base that was rebuilt.

use crate::{BackendError, Instance};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The base of a sandbox's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBase {
    /// The image id.
    pub image: String,
    /// For a block-level base (the microVM's ext4), the identity of the
    /// exact file; a rebuilt file of the same image differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileIdentity>,
}

/// A file as the file system knows it: rebuilt or replaced, it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

fn record_path(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("disk/base.json")
}

/// The recorded base of the disk in `sandbox_dir`, if it has one.
pub fn read(sandbox_dir: &Path) -> Option<DiskBase> {
    let text = std::fs::read_to_string(record_path(sandbox_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Record the base of the disk in `sandbox_dir` (atomically).
pub fn write(sandbox_dir: &Path, base: &DiskBase) -> std::io::Result<()> {
    let path = record_path(sandbox_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(base).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// What to do about a disk that cannot be used.
pub fn fresh_hint(inst: &Instance) -> String {
    format!(
        "`keystone agent start --fresh {}` discards that disk (what was not synced from it is lost)",
        inst.name
    )
}

/// The recorded base of `inst`'s disk, if any; refused when it is another
/// image than the one the sandbox starts on (`start` keeps a sandbox on the
/// image of its disk, so this is a guard, not a path).
pub fn recorded_for(inst: &Instance) -> Result<Option<DiskBase>, BackendError> {
    match read(&inst.dir) {
        Some(base) if base.image != inst.image_id => Err(BackendError::Failed(format!(
            "the disk of sandbox {} is built on image {}, not {}; {}",
            inst.name,
            base.image,
            inst.image_id,
            fresh_hint(inst)
        ))),
        other => Ok(other),
    }
}

/// Record that `inst`'s disk is built on its image and, for a block-level
/// base, on exactly the file `base_file`.
pub fn record_for(inst: &Instance, base_file: Option<&Path>) -> Result<(), BackendError> {
    let file = match base_file {
        Some(f) => Some(FileIdentity::of(f).map_err(BackendError::io(f.display().to_string()))?),
        None => None,
    };
    let base = DiskBase {
        image: inst.image_id.clone(),
        file,
    };
    write(&inst.dir, &base).map_err(BackendError::io("disk/base.json"))
}

/// The disks under `sandboxes_dir` (one directory per sandbox, registered
/// or a disk kept by `destroy --keep-disk`) that are built on `image`:
/// their directory names, sorted.
pub fn built_on(sandboxes_dir: &Path, image: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sandboxes_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| read(&e.path()).is_some_and(|b| b.image == image))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_finds_its_users() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = root.path().join("a");
        let b = root.path().join("b");
        std::fs::create_dir_all(root.path().join("no-disk")).expect("mkdir");
        let base_file = root.path().join("rootfs.ext4");
        std::fs::write(&base_file, b"ext4").expect("write");
        let rec = DiskBase {
            image: "minimal-1".into(),
            file: Some(FileIdentity::of(&base_file).expect("stat")),
        };
        write(&a, &rec).expect("write a");
        write(
            &b,
            &DiskBase {
                image: "full-2".into(),
                file: None,
            },
        )
        .expect("write b");
        assert_eq!(read(&a), Some(rec));
        assert_eq!(read(&root.path().join("no-disk")), None);
        assert_eq!(built_on(root.path(), "minimal-1"), ["a"]);
        assert_eq!(built_on(root.path(), "full-2"), ["b"]);
        assert!(built_on(root.path(), "other").is_empty());
    }

    #[test]
    fn a_rebuilt_file_has_another_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("rootfs.ext4");
        std::fs::write(&f, b"one build").expect("write");
        let first = FileIdentity::of(&f).expect("stat");
        assert_eq!(FileIdentity::of(&f).expect("stat"), first);
        // A rebuild writes a new file and renames it into place.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, b"one build").expect("write");
        std::fs::rename(&tmp, &f).expect("rename");
        assert_ne!(FileIdentity::of(&f).expect("stat"), first);
    }
}
