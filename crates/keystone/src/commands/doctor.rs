//! `keystone agent doctor`: what this host can do, and what to install or
//! change where it cannot.

use crate::cli::DoctorArgs;
use crate::error::{CliError, Exit, Result};
use keystone_channel::which;
use serde::Serialize;

#[derive(Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
    /// Needed by every backend (a failure makes doctor exit 4).
    required: bool,
    fix: Option<String>,
}

fn tool(name: &str, package: &str, needed_for: &str, required: bool) -> Check {
    let found = which(name);
    Check {
        name: format!("tool {name}"),
        ok: found.is_some(),
        detail: match &found {
            Some(p) => format!("{} ({needed_for})", p.display()),
            None => format!("missing ({needed_for})"),
        },
        required,
        fix: found
            .is_none()
            .then(|| format!("apt-get install {package}")),
    }
}

/// KVM as it really is: usable, or why not (absent, PVM host, no access),
/// decided by the microvm backend itself so doctor and start agree.
pub fn kvm_state() -> (bool, String) {
    let (choice, _) = keystone_microvm::host_acceleration();
    let ok = choice.accel == keystone_microvm::accel::Accel::Kvm;
    let detail = if ok {
        "KVM is usable: microVMs run accelerated".to_string()
    } else {
        choice
            .reason
            .trim_start_matches("acceleration: ")
            .to_string()
    };
    (ok, detail)
}

fn nested() -> (bool, String) {
    let (choice, host) = keystone_microvm::host_acceleration();
    let (flag, line) = keystone_microvm::accel::nested_decision(true, choice.accel, &host);
    (
        flag.is_some(),
        format!(
            "{} [{}]",
            line.trim_start_matches("nested virtualization: "),
            host.describe()
        ),
    )
}

pub fn run(args: DoctorArgs) -> Result<i32> {
    let root = nix::unistd::geteuid().is_root();
    let mut checks = vec![
        tool("git", "git", "sync", true),
        tool("ssh", "openssh-client", "the channel into sandboxes", true),
        tool("ssh-keygen", "openssh-client", "per-sandbox keys", true),
        tool("mmdebstrap", "mmdebstrap", "building the guest image", true),
        tool("tar", "tar", "unpacking the image", true),
        tool("pasta", "passt", "container backend, --egress open", false),
        tool(
            "ip",
            "iproute2",
            "the egress allowlist (the default): its network namespace",
            false,
        ),
        tool(
            "qemu-system-x86_64",
            "qemu-system-x86",
            "microvm backend",
            false,
        ),
        tool(
            "qemu-img",
            "qemu-utils",
            "microvm backend: per-sandbox disk overlays",
            false,
        ),
        tool(
            "mkfs.ext4",
            "e2fsprogs",
            "microvm backend: the root disk",
            false,
        ),
        tool("passt", "passt", "microvm backend, --egress open", false),
        tool("rsync", "rsync", "sync --artifacts", false),
        tool("skopeo", "skopeo", "image push", false),
    ];
    // The Kubernetes backend: the configured context's cluster, as start
    // would reach it (not required: most hosts run local sandboxes).
    let project = std::env::current_dir()
        .ok()
        .and_then(|d| keystone_sync::toplevel(&d).ok());
    let context = crate::context::load_config(project.as_deref(), Vec::new())
        .map(|e| e.config.backend.kubernetes.context.clone())
        .unwrap_or_default();
    let cluster = keystone_kubernetes::probe_cluster(&context);
    checks.push(Check {
        name: "kubernetes cluster".into(),
        ok: cluster.is_ok(),
        detail: match &cluster {
            Ok(line) => format!("{line} (kubernetes backend)"),
            Err(e) => format!("not reachable (kubernetes backend): {e}"),
        },
        required: false,
        fix: None,
    });
    let virtiofsd = keystone_microvm::virtiofsd();
    checks.push(Check {
        name: "tool virtiofsd".into(),
        ok: virtiofsd.is_some(),
        detail: match &virtiofsd {
            Some(p) => format!("{} (microvm live share, --share)", p.display()),
            None => "missing (microvm live share, --share; not in bookworm)".into(),
        },
        required: false,
        fix: virtiofsd.is_none().then(|| {
            "apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd, then put ~/.cargo/bin on PATH".into()
        }),
    });
    if !root {
        checks.push(tool("newuidmap", "uidmap", "rootless containers", true));
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_default();
        let has = std::fs::read_to_string("/etc/subuid")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(':').next() == Some(user.as_str()));
        checks.push(Check {
            name: "subordinate ids".into(),
            ok: has,
            detail: if has {
                format!("{user} has a range in /etc/subuid")
            } else {
                format!("{user} has no range in /etc/subuid")
            },
            required: true,
            fix: (!has).then(|| {
                format!("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}")
            }),
        });
    }
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    checks.push(Check {
        name: "user namespaces".into(),
        ok: userns > 0,
        detail: format!("max_user_namespaces={userns}"),
        required: true,
        fix: (userns == 0).then(|| "sysctl -w user.max_user_namespaces=15000".into()),
    });
    let cg = keystone_container::cgroup_version();
    checks.push(Check {
        name: "cgroups".into(),
        ok: cg != "none" && (root || cg == "v2"),
        detail: format!(
            "cgroup {cg}{}",
            if !root && cg == "v1" {
                ": limits cannot be enforced for an unprivileged user"
            } else {
                ""
            }
        ),
        required: false,
        fix: None,
    });
    let (kvm_ok, kvm_detail) = kvm_state();
    checks.push(Check {
        name: "acceleration".into(),
        ok: kvm_ok,
        detail: kvm_detail,
        required: false,
        fix: None,
    });
    let (nested_ok, nested_detail) = nested();
    checks.push(Check {
        name: "nested virtualization".into(),
        ok: nested_ok,
        detail: nested_detail,
        required: false,
        fix: None,
    });
    checks.push(Check {
        name: "rootless".into(),
        ok: true,
        detail: if root {
            "running as root".into()
        } else {
            "running unprivileged (rootless)".into()
        },
        required: false,
        fix: None,
    });

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).map_err(|e| CliError::failed(e.to_string()))?
        );
    } else {
        for c in &checks {
            let mark = if c.ok {
                "ok  "
            } else if c.required {
                "FAIL"
            } else {
                "warn"
            };
            println!("{mark}  {:<24} {}", c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("      fix: {f}");
            }
        }
    }
    if checks.iter().any(|c| c.required && !c.ok) {
        return Err(CliError::new(
            Exit::Requirements,
            "this host is missing requirements (see above)",
        ));
    }
    Ok(0)
}
