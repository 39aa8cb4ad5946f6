//! The per-boot configuration disk: a tar archive of what the guest's
//! init puts in `/etc/keystone` (keys, hostname, network, resolvers).

use super::{qemu, share};
use keystone_backend::{plumbing, BackendError, Instance};
use keystone_registry::NetworkMode;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The per-boot configuration archive the guest's init unpacks into
/// `/etc/keystone`.
pub(super) fn write_config(inst: &Instance, run: &Path) -> Result<PathBuf, BackendError> {
    let stage = run.join("config");
    if stage.exists() {
        let _ = fs::remove_dir_all(&stage);
    }
    fs::create_dir_all(&stage).map_err(BackendError::io(stage.display().to_string()))?;
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o700))
        .map_err(BackendError::io(stage.display().to_string()))?;
    let copy = |name: &str, mode: u32| -> Result<(), BackendError> {
        let from = inst.guest_dir.join(name);
        let to = stage.join(name);
        fs::copy(&from, &to).map_err(BackendError::io(from.display().to_string()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode))
            .map_err(BackendError::io(to.display().to_string()))
    };
    copy("ssh_host_ed25519_key", 0o600)?;
    copy("authorized_keys", 0o644)?;
    let write = |name: &str, body: String| -> Result<(), BackendError> {
        let to = stage.join(name);
        fs::write(&to, body).map_err(BackendError::io(to.display().to_string()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))
            .map_err(BackendError::io(to.display().to_string()))
    };
    write("hostname", format!("{}\n", inst.name))?;
    let mut network = format!("ADDRESS={}\n", qemu::GUEST_ADDRESS);
    if inst.settings.network == NetworkMode::Nat {
        network.push_str(&format!(
            "NAT_ADDRESS={}\nNAT_GATEWAY={}\n",
            qemu::NAT_ADDRESS,
            qemu::NAT_GATEWAY
        ));
    }
    if inst.settings.network == NetworkMode::Bridge {
        // The address comes from the bridge's network, by DHCP.
        network.push_str("BRIDGE=1\n");
    }
    write("network", network)?;
    write(
        "workspace",
        if inst.settings.is_share() {
            format!("SHARE_TAG={}\n", share::TAG)
        } else {
            String::new()
        },
    )?;
    write("resolv.conf", plumbing::resolv_conf(&inst.settings))?;
    let tar = run.join("config.tar");
    // Files only: a "./" entry would give the guest's /etc/keystone the
    // staging directory's 0700, and sshd reads authorized_keys as the user.
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&stage)
        .args(CONFIG_FILES)
        .output()
        .map_err(BackendError::io("tar"))?;
    let _ = fs::remove_dir_all(&stage);
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "cannot write {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(tar)
}

pub(super) const CONFIG_FILES: [&str; 6] = [
    "ssh_host_ed25519_key",
    "authorized_keys",
    "hostname",
    "network",
    "resolv.conf",
    "workspace",
];
