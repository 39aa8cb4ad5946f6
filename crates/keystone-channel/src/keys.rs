//! Per-sandbox keys, made on the host at creation with `ssh-keygen`.
//!
//! - the client key (`id_ed25519`): the host's way in; only its public half
//!   enters the guest, as `authorized_keys`;
//! - the guest's host key (`ssh_host_ed25519_key`): given to the guest so
//!   that its sshd has an identity we pinned in `known_hosts` beforehand —
//!   no trust-on-first-use.

use crate::{io_err, which, ChannelError};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const CLIENT_KEY: &str = "id_ed25519";
pub const HOST_KEY: &str = "ssh_host_ed25519_key";
pub const KNOWN_HOSTS: &str = "known_hosts";
/// The directory handed to the guest (bind-mounted or copied to
/// `/etc/keystone`): host key and authorized_keys, nothing else.
pub const GUEST_DIR: &str = "guest";

/// Make the keys in `ssh_dir` unless they exist; returns the guest
/// directory's path.
pub fn ensure(ssh_dir: &Path, alias: &str) -> Result<PathBuf, ChannelError> {
    fs::create_dir_all(ssh_dir).map_err(io_err(ssh_dir))?;
    fs::set_permissions(ssh_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(ssh_dir))?;
    let guest = ssh_dir.join(GUEST_DIR);
    fs::create_dir_all(&guest).map_err(io_err(&guest))?;
    fs::set_permissions(&guest, fs::Permissions::from_mode(0o755)).map_err(io_err(&guest))?;

    let client = ssh_dir.join(CLIENT_KEY);
    if !client.exists() {
        keygen(&client, &format!("keystone@{alias}"))?;
    }
    let host = guest.join(HOST_KEY);
    if !host.exists() {
        keygen(&host, alias)?;
    }
    let client_pub = read(&client.with_extension("pub"))?;
    let host_pub = read(&guest.join(format!("{HOST_KEY}.pub")))?;

    let auth = guest.join("authorized_keys");
    replace_file(
        &auth,
        (client_pub.trim().to_string() + "\n").as_bytes(),
        0o644,
    )?;

    // known_hosts entry under the alias, which the config sets as
    // HostKeyAlias: the pinned key is all the client will accept.
    let mut parts = host_pub.split_whitespace();
    let (kind, key) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let known = ssh_dir.join(KNOWN_HOSTS);
    replace_file(&known, format!("{alias} {kind} {key}\n").as_bytes(), 0o644)?;
    Ok(guest)
}

/// Write `path` as a new file: whatever is there (a link included) is
/// removed first and the new one is created without following a link, so
/// no earlier content of the directory decides where the bytes go.
fn replace_file(path: &Path, body: &[u8], mode: u32) -> Result<(), ChannelError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(body).map_err(io_err(path))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, ChannelError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn keygen(path: &Path, comment: &str) -> Result<(), ChannelError> {
    let prog = which("ssh-keygen").ok_or(ChannelError::Missing {
        program: "ssh-keygen",
        package: "openssh-client",
    })?;
    let out = Command::new(prog)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(path))?;
    if !out.status.success() {
        return Err(ChannelError::Command {
            command: format!("ssh-keygen -f {}", path.display()),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_keys_once_and_pins_host_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ssh = dir.path().join("ssh");
        let guest = ensure(&ssh, "keystone-t").expect("keys");
        let first = fs::read(ssh.join(CLIENT_KEY)).expect("key");
        ensure(&ssh, "keystone-t").expect("again");
        assert_eq!(
            first,
            fs::read(ssh.join(CLIENT_KEY)).expect("key"),
            "keys are kept"
        );
        let known = fs::read_to_string(ssh.join(KNOWN_HOSTS)).expect("known");
        assert!(known.starts_with("keystone-t ssh-ed25519 "));
        let auth = fs::read_to_string(guest.join("authorized_keys")).expect("auth");
        assert!(auth.starts_with("ssh-ed25519 "));
        assert!(
            !guest.join(CLIENT_KEY).exists(),
            "the client key never enters the guest dir"
        );
    }
}
