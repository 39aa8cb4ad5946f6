//! A helper's private view of the host's file system: a mount namespace of
//! its own (root), or a user namespace that maps only the user and its
//! group with one (a user), in which some paths are read-only binds of
//! themselves and others are hidden under an empty read-only tmpfs.
//!
//! The mounts are made in the forked child before it execs (and before it
//! drops its ids, `proc::spawn_as`), so the helper inherits them locked:
//! without CAP_SYS_ADMIN in their namespace it can neither unmount nor
//! remount them.

use keystone_backend::BackendError;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

#[derive(Default)]
pub struct View {
    /// Path, and the flags (nosuid, nodev, noexec) its mount already has,
    /// which a read-only remount of a bind must keep.
    read_only: Vec<(CString, libc::c_ulong)>,
    hidden: Vec<CString>,
}

fn c_path(p: &Path) -> Result<CString, BackendError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| BackendError::Failed(format!("{}: a NUL in the path", p.display())))
}

impl View {
    /// `path` (which must exist, and be no link) becomes read-only.
    pub fn read_only(&mut self, path: &Path, keep: libc::c_ulong) -> Result<(), BackendError> {
        self.read_only.push((c_path(path)?, keep));
        Ok(())
    }

    /// `path`, if it is a directory, shows nothing.
    pub fn hide(&mut self, path: &Path) -> Result<(), BackendError> {
        if path.is_dir() {
            self.hidden.push(c_path(path)?);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.read_only.is_empty() && self.hidden.is_empty()
    }

    /// Make `cmd`'s child see the view.
    pub fn apply(self, cmd: &mut Command) {
        if self.is_empty() {
            return;
        }
        let as_root = nix::unistd::geteuid().is_root();
        // Prepared before the fork: pre_exec may only make system calls.
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let uid_map = format!("{uid} {uid} 1");
        let gid_map = format!("{gid} {gid} 1");
        let c = |s: &str| CString::new(s).unwrap_or_default();
        let (uid_file, gid_file, setgroups) = (
            c("/proc/self/uid_map"),
            c("/proc/self/gid_map"),
            c("/proc/self/setgroups"),
        );
        let (root, tmpfs, empty) = (c("/"), c("tmpfs"), c("size=4k,nr_inodes=1,mode=0755"));
        let View { read_only, hidden } = self;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes system calls on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                let write = |file: &CString, text: &[u8]| -> std::io::Result<()> {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, text.as_ptr().cast(), text.len());
                    libc::close(fd);
                    if n == text.len() as isize {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                if as_root {
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                } else {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
                    write(&setgroups, b"deny")?;
                    write(&uid_file, uid_map.as_bytes())?;
                    write(&gid_file, gid_map.as_bytes())?;
                }
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (p, keep) in &read_only {
                    check(libc::mount(
                        p.as_ptr(),
                        p.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    check(libc::mount(
                        std::ptr::null(),
                        p.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | keep,
                        std::ptr::null(),
                    ))?;
                }
                for p in &hidden {
                    check(libc::mount(
                        tmpfs.as_ptr(),
                        p.as_ptr(),
                        tmpfs.as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        empty.as_ptr().cast(),
                    ))?;
                }
                Ok(())
            });
        }
    }
}
