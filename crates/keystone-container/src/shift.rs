//! Moving a persistent upper layer onto the id map it runs under.
//!
//! Root's sandboxes once ran on the host's own ids (`0 0 65536`); they now
//! run on keystone's range. A layer made then holds files owned by host
//! ids 0..65535 and overlay metadata in `trusted.overlay.*` xattrs, which
//! the sandbox, whose overlay is now mounted from its own user namespace
//! (`userxattr`), could not read. At its next start the layer is moved
//! once: every owner in the old range gets the same offset in the new one
//! (`lchown`, links never followed, set-id bits restored after), the
//! overlay xattrs become `user.overlay.*`, the work directory is emptied,
//! and `disk/idmap.json` records the range. The walk is idempotent (ids
//! already moved are outside the old range), so an interrupted move is
//! finished by the next start; the agent's unsynced work is kept.

use super::idmap::{IdMap, Mapping, SIZE};
use keystone_backend::BackendError;
use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

const RECORD: &str = "idmap.json";

/// The host ids a layer's namespace root was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    uid: u32,
    gid: u32,
}

/// Make the layer `upper` (with its overlay `work` directory, both under
/// `disk`) belong to `map`. Only root's shifted map moves anything.
pub(super) fn ensure_layer_on(
    map: &IdMap,
    disk: &Path,
    upper: &Path,
    work: &Path,
) -> Result<(), BackendError> {
    let Mapping::Shifted { uid, gid } = map.mapping else {
        return Ok(());
    };
    let to = Record { uid, gid };
    let record_path = disk.join(RECORD);
    let from = match fs::read(&record_path) {
        Ok(bytes) => serde_json::from_slice::<Record>(&bytes).map_err(|e| {
            BackendError::Failed(format!(
                "{} is not a valid id-map record ({e}); it says which host ids the sandbox's disk is on",
                record_path.display()
            ))
        })?,
        // No record: made when root's sandboxes ran on the host's own ids.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record { uid: 0, gid: 0 },
        Err(e) => return Err(BackendError::io(record_path.display().to_string())(e)),
    };
    if from != to {
        let legacy_xattrs = from == Record { uid: 0, gid: 0 };
        tracing::info!(?from, ?to, upper = %upper.display(), "moving a sandbox layer onto its id range");
        walk(upper, &|path, meta| {
            shift_one(path, meta, from, to)?;
            if legacy_xattrs {
                convert_overlay_xattrs(path)?;
            }
            Ok(())
        })?;
        // The work directory is overlay's scratch space: start it empty.
        if let Ok(entries) = fs::read_dir(work) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }
    for d in [upper, work] {
        nix::unistd::chown(d, Some(uid.into()), Some(gid.into()))
            .map_err(|e| BackendError::Failed(format!("chown {}: {e}", d.display())))?;
    }
    if from != to || !record_path.exists() {
        let json = serde_json::to_vec(&to).map_err(|e| BackendError::Failed(e.to_string()))?;
        let tmp = disk.join(format!(".{RECORD}.tmp"));
        fs::write(&tmp, json).map_err(BackendError::io(tmp.display().to_string()))?;
        fs::rename(&tmp, &record_path)
            .map_err(BackendError::io(record_path.display().to_string()))?;
    }
    Ok(())
}

/// Calls `f` on every entry below `dir` (not `dir` itself), parents first;
/// descends only into real directories.
fn walk(
    dir: &Path,
    f: &dyn Fn(&Path, &fs::Metadata) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let entries = fs::read_dir(dir).map_err(BackendError::io(dir.display().to_string()))?;
    for e in entries {
        let e = e.map_err(BackendError::io(dir.display().to_string()))?;
        let path = e.path();
        let meta =
            fs::symlink_metadata(&path).map_err(BackendError::io(path.display().to_string()))?;
        f(&path, &meta)?;
        if meta.file_type().is_dir() {
            walk(&path, f)?;
        }
    }
    Ok(())
}

/// The id `id` had in a namespace mapped at `from`, mapped at `to`; ids
/// outside the old range are left as they are.
fn moved(id: u32, from: u32, to: u32) -> u32 {
    if id >= from && id - from < SIZE {
        to + (id - from)
    } else {
        id
    }
}

fn cpath(path: &Path) -> Result<CString, BackendError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| BackendError::Failed(format!("NUL in path {}", path.display())))
}

fn shift_one(
    path: &Path,
    meta: &fs::Metadata,
    from: Record,
    to: Record,
) -> Result<(), BackendError> {
    let (uid, gid) = (
        moved(meta.uid(), from.uid, to.uid),
        moved(meta.gid(), from.gid, to.gid),
    );
    if (uid, gid) == (meta.uid(), meta.gid()) {
        return Ok(());
    }
    let c = cpath(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; lchown
    // changes the entry itself, never what a link names.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(BackendError::Failed(format!(
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    // chown clears the set-id bits of a file; the layer keeps its modes.
    let mode = meta.permissions().mode();
    if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(BackendError::io(path.display().to_string()))?;
    }
    Ok(())
}

/// `trusted.overlay.X` → `user.overlay.X` on `path` itself (whiteouts,
/// opaque directories, origins: what an overlay mounted with `userxattr`
/// reads).
fn convert_overlay_xattrs(path: &Path) -> Result<(), BackendError> {
    let c = cpath(path)?;
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; llistxattr writes at
    // most that many bytes and never follows a link.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Ok(());
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(rest) = name.strip_prefix(b"trusted.overlay.") else {
            continue;
        };
        let old = CString::new(name).map_err(|_| BackendError::Failed("xattr name".into()))?;
        let mut value = vec![0u8; 65536];
        // SAFETY: as above; `old` is NUL-terminated.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                old.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        value.truncate(len as usize);
        let mut new = b"user.overlay.".to_vec();
        new.extend_from_slice(rest);
        let new = CString::new(new).map_err(|_| BackendError::Failed("xattr name".into()))?;
        // SAFETY: as above; the value buffer holds `value.len()` bytes.
        let set = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                new.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if set != 0 {
            return Err(BackendError::Failed(format!(
                "set {} on {}: {}",
                OsStr::from_bytes(new.as_bytes()).to_string_lossy(),
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: as above.
        unsafe { libc::lremovexattr(c.as_ptr(), old.as_ptr()) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_move_by_the_ranges_offset_and_others_stay() {
        assert_eq!(moved(0, 0, 1 << 20), 1 << 20);
        assert_eq!(moved(1000, 0, 1 << 20), (1 << 20) + 1000);
        assert_eq!(moved(65535, 0, 1 << 20), (1 << 20) + 65535);
        // Already moved (an interrupted move, run again): unchanged.
        assert_eq!(moved((1 << 20) + 1000, 0, 1 << 20), (1 << 20) + 1000);
        // From one range to another.
        assert_eq!(moved(200_000 + 5, 200_000, 400_000), 400_005);
    }

    /// Root only: a layer made on the host's ids (owners 0 and 1000, a
    /// setuid file, an opaque directory, a link to a host file) is moved
    /// onto a range, the link not followed, and a second run changes
    /// nothing.
    #[test]
    fn a_legacy_layer_moves_once_and_keeps_its_modes() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test changes owners: run it as root (scripts/test.sh does)"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk = tmp.path();
        let (upper, work) = (disk.join("upper"), disk.join("work"));
        fs::create_dir_all(upper.join("home/agent/opaque")).expect("mkdir");
        fs::create_dir_all(work.join("work")).expect("mkdir");
        let host_file = tmp.path().join("host-file");
        fs::write(&host_file, "host").expect("write");
        let agent_file = upper.join("home/agent/notes.txt");
        fs::write(&agent_file, "unsynced work").expect("write");
        std::os::unix::fs::chown(&agent_file, Some(1000), Some(1000)).expect("chown");
        let suid = upper.join("suid");
        fs::write(&suid, "#!/bin/sh\n").expect("write");
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).expect("chmod");
        std::os::unix::fs::symlink(&host_file, upper.join("link")).expect("symlink");
        let opaque = cpath(&upper.join("home/agent/opaque")).expect("path");
        // SAFETY: NUL-terminated name, value and path.
        let set = unsafe {
            libc::lsetxattr(
                opaque.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());

        let start = 1 << 20;
        let map = IdMap {
            uid: 0,
            gid: 0,
            mapping: Mapping::Shifted {
                uid: start,
                gid: start,
            },
        };
        ensure_layer_on(&map, disk, &upper, &work).expect("move");
        let meta = |p: &Path| fs::symlink_metadata(p).expect("stat");
        assert_eq!(meta(&agent_file).uid(), start + 1000);
        assert_eq!(
            fs::read_to_string(&agent_file).expect("read"),
            "unsynced work"
        );
        assert_eq!(meta(&suid).uid(), start);
        assert_eq!(meta(&suid).permissions().mode() & 0o7777, 0o4755);
        assert_eq!(meta(&upper.join("link")).uid(), start);
        assert_eq!(meta(&host_file).uid(), 0, "a link was followed");
        assert_eq!(meta(&upper).uid(), start);
        assert!(
            fs::read_dir(&work).expect("work").next().is_none(),
            "work not emptied"
        );
        let mut value = [0u8; 4];
        // SAFETY: as above.
        let user = unsafe {
            libc::lgetxattr(
                opaque.as_ptr(),
                c"user.overlay.opaque".as_ptr(),
                value.as_mut_ptr().cast(),
                4,
            )
        };
        assert_eq!(user, 1);
        // SAFETY: as above.
        let trusted = unsafe {
            libc::lgetxattr(
                opaque.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                value.as_mut_ptr().cast(),
                4,
            )
        };
        assert!(trusted < 0, "the trusted xattr is still there");

        // Recorded: a second start moves nothing.
        ensure_layer_on(&map, disk, &upper, &work).expect("again");
        assert_eq!(meta(&agent_file).uid(), start + 1000);
    }
}
