//! End-to-end tests: the real binary, a real guest image (built once into
//! a shared cache), a real backend, real sshd and git. Run them one at a
//! time (`--test-threads=1`): backends compete for the machine's cores.

mod agents;
mod attack;
mod bridge_share;
mod harness;
mod kubernetes;
mod leaks;
mod proxy;
mod scenarios;
#[path = "../support/mod.rs"]
mod support;
mod sync_matrix;
mod web;

/// The same scenarios for every local backend.
macro_rules! backend_suite {
    ($module:ident, $backend:literal) => {
        mod $module {
            use crate::harness::Host;
            use crate::scenarios;

            #[test]
            fn lifecycle() {
                scenarios::lifecycle(Host::new($backend, concat!("life-", $backend)));
            }
            #[test]
            fn isolation() {
                scenarios::isolation(Host::new($backend, concat!("iso-", $backend)));
            }
            #[test]
            fn network_none() {
                scenarios::network_none(Host::new($backend, concat!("nonet-", $backend)));
            }
            #[test]
            fn supervisor_killed() {
                scenarios::supervisor_killed(Host::new($backend, concat!("kill-", $backend)));
            }
            #[test]
            fn concurrent_starts() {
                scenarios::concurrent_starts(Host::new($backend, concat!("race-", $backend)));
            }
            #[test]
            fn sync_rules() {
                scenarios::sync_rules(Host::new($backend, concat!("sync-", $backend)));
            }
            #[test]
            fn sync_hostile() {
                scenarios::sync_hostile(Host::new($backend, concat!("hostile-", $backend)));
            }
            #[test]
            fn unborn_branch() {
                scenarios::unborn_branch(Host::new($backend, concat!("unborn-", $backend)));
            }
            #[test]
            fn env_files() {
                scenarios::env_files(Host::new($backend, concat!("envf-", $backend)));
            }
            #[test]
            fn artifacts() {
                scenarios::artifacts(Host::new($backend, concat!("art-", $backend)));
            }
            #[test]
            fn auto_commit() {
                scenarios::auto_commit(Host::new($backend, concat!("autoc-", $backend)));
            }
            #[test]
            fn auto_idle() {
                scenarios::auto_idle(Host::new($backend, concat!("autoi-", $backend)));
            }
            #[test]
            fn two_at_once_and_fresh() {
                scenarios::two_at_once_and_fresh(Host::new($backend, concat!("two-", $backend)));
            }
            #[test]
            fn worktrees() {
                scenarios::worktrees(Host::new($backend, concat!("wt-", $backend)));
            }
            #[test]
            fn attach_session() {
                scenarios::attach_session(Host::new($backend, concat!("attach-", $backend)));
            }
            #[test]
            fn web_terminal() {
                crate::web::web_terminal(Host::new($backend, concat!("web-", $backend)));
            }
            #[test]
            fn dev_proxy() {
                crate::proxy::dev_proxy(Host::new($backend, concat!("proxy-", $backend)));
            }
            #[test]
            fn memory_given_back() {
                scenarios::memory_given_back(Host::new($backend, concat!("mem-", $backend)));
            }
            #[test]
            fn disk_base() {
                scenarios::disk_base(Host::new($backend, concat!("base-", $backend)));
            }
            #[test]
            fn submodules() {
                scenarios::submodules(Host::new($backend, concat!("sub-", $backend)));
            }
            #[test]
            fn fault_points_leave_nothing() {
                crate::leaks::fault_points(
                    Host::new($backend, concat!("leak-", $backend)),
                    crate::leaks::points($backend),
                );
            }
            #[test]
            fn destroy_guards() {
                scenarios::destroy_guards(Host::new($backend, concat!("guard-", $backend)));
            }
        }
    };
}

backend_suite!(container, "container");

/// What sync does about the host's own state (host-side: one backend).
mod sync_host {
    use crate::harness::Host;

    /// The host's disk fills during a sync.
    #[test]
    fn out_of_disk_container() {
        crate::scenarios::sync_out_of_disk(Host::new("container", "nospace-container"));
    }

    /// Every state a host repository is really in, with new commits in the
    /// sandbox or on both sides (sync_matrix.rs prints the table).
    #[test]
    fn state_matrix_container() {
        crate::sync_matrix::state_matrix(Host::new("container", "matrix-container"));
    }

    /// A shallow host clone starts a sandbox and takes its commits back.
    #[test]
    fn shallow_clone_container() {
        crate::sync_matrix::shallow_clone(Host::new("container", "shallow-src"));
    }
}

/// The attack suite (attack.rs) on the backends each attack applies to.
mod containment {
    use crate::harness::Host;

    /// The container's ids: root's sandbox on keystone's own range.
    #[test]
    fn guest_root_is_not_host_root_container() {
        crate::attack::guest_root_is_not_host_root(Host::new("container", "atk-root-container"));
    }

    /// A root sandbox from before the range keeps its disk and work.
    #[test]
    fn legacy_layer_survives_the_upgrade_container() {
        crate::attack::legacy_layer_survives_the_upgrade(Host::new(
            "container",
            "upgrade-container",
        ));
    }

    /// The writable layer cannot fill the host's disk.
    #[test]
    fn disk_is_bounded_container() {
        crate::attack::disk_is_bounded(Host::new("container", "disk-container"));
    }

    /// Masks, locked mounts, the seccomp filter and the bounding set.
    #[test]
    fn kernel_surface_is_reduced_container() {
        crate::attack::kernel_surface_is_reduced(Host::new("container", "atk-kern-container"));
    }

    /// Root's QEMU runs on an id of its own, with descriptors only.
    #[test]
    fn qemu_holds_no_host_powers_microvm() {
        crate::attack::qemu_holds_no_host_powers(Host::new("microvm", "atk-qemu-microvm"));
    }
}

/// Zellij instead of tmux (its build from crates.io is cached with the images).
mod zellij {
    use crate::harness::Host;

    #[test]
    fn sessions_container() {
        crate::web::zellij_sessions(Host::new("container", "zellij-container"));
    }
}
backend_suite!(microvm, "microvm");

/// The container scenario as an unprivileged user (rootless): user
/// namespaces with subordinate ids, no cgroup delegation on v1.
mod rootless {
    use crate::harness::Host;
    use crate::scenarios;

    const USER: &str = "keystone-test";

    fn user() -> &'static str {
        assert!(
            nix_is_root(),
            "the rootless test switches to user {USER} and must run as root (scripts/test.sh does)"
        );
        let ok = std::process::Command::new("id")
            .arg("-u")
            .arg(USER)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "user {USER} is missing: create it with `useradd -m {USER} && usermod --add-subuids 300000-365535 --add-subgids 300000-365535 {USER}` (scripts/test.sh does)"
        );
        USER
    }

    fn nix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    }

    #[test]
    fn lifecycle_rootless() {
        scenarios::lifecycle(Host::with_user("container", "life-rootless", Some(user())));
    }

    #[test]
    fn dev_proxy_rootless() {
        crate::proxy::dev_proxy(Host::with_user("container", "proxy-rootless", Some(user())));
    }

    #[test]
    fn attack_kernel_surface_is_reduced_rootless() {
        crate::attack::kernel_surface_is_reduced(Host::with_user(
            "container",
            "atk-kern-rootless",
            Some(user()),
        ));
    }

    #[test]
    fn attack_guest_root_is_not_host_root_rootless() {
        crate::attack::guest_root_is_not_host_root(Host::with_user(
            "container",
            "atk-root-rootless",
            Some(user()),
        ));
    }

    #[test]
    fn isolation_rootless() {
        scenarios::isolation(Host::with_user("container", "iso-rootless", Some(user())));
    }
}

/// The agents on the full image (npm registry and Debian archive at the
/// first build; cached after).
mod full {
    use crate::agents::{self, Depth};

    #[test]
    fn agents_work_without_prompts() {
        agents::agents_work_without_prompts("container", Depth::Agents);
    }

    /// The image's behaviour is the container test's; this one what the
    /// microVM does differently (see `agents.rs`).
    #[test]
    fn agents_work_without_prompts_microvm() {
        agents::agents_work_without_prompts("microvm", Depth::Backend);
    }
}
