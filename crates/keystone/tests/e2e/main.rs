//! End-to-end tests: the real binary, a real guest image (built once into
//! a shared cache), a real backend, real sshd and git. Run them one at a
//! time (`--test-threads=1`): backends compete for the machine's cores.

mod agents;
mod attack;
mod bridge_share;
mod egress;
mod harness;
mod kubernetes;
mod lab;
mod leaks;
mod proxy;
mod scenarios;
#[path = "../support/mod.rs"]
mod support;
mod sync_matrix;
mod web;

/// The backend-independent scenarios, listed once: a test per scenario in
/// a module per backend, named `<module>::<scenario>`, its project (and so
/// its sandbox) `<prefix>-<backend>`. Each is marked `all` or `local`:
/// `local` ones the Kubernetes suite leaves out, the reason beside each.
///
/// - `backend_suite!(container, "container")`: every scenario, on
///   `Host::new("container", …)`.
/// - `backend_suite!(kubernetes shared, host, { items })`: the `all` ones,
///   each on `host(project)`, and `items` (scenarios that need a host of
///   their own there) in the same module.
macro_rules! backend_suite {
    ($module:ident, $backend:literal) => {
        $crate::backend_suite!(@module $module, local, $backend,
            |project| $crate::harness::Host::new($backend, project), {});
    };
    (kubernetes $module:ident, $host:expr, { $($item:item)* }) => {
        $crate::backend_suite!(@module $module, kubernetes, "kube", $host, { $($item)* });
    };
    (@module $module:ident, $on:ident, $backend:literal, $host:expr, { $($item:item)* }) => {
        mod $module {
            // Kubernetes runs no proxy or web scenario.
            #[allow(unused_imports)]
            use $crate::{proxy, scenarios, web};

            $crate::backend_suite!(@tests $on, $backend, $host;
                // kubernetes::lifecycle is the pod's own: pod, claim and
                // secret instead of host processes, mounts and cgroups.
                lifecycle "life" scenarios::lifecycle, local;
                // Probes this host's files, loopback and gateway from the
                // sandbox; a pod runs on a cluster node, not necessarily
                // this host. The pod's confinement is
                // kubernetes::attack_pod_is_confined.
                isolation "iso" scenarios::isolation, local;
                // --network none is a NetworkPolicy there, enforced only by
                // a network plugin that implements it (docs/SECURITY.md S12);
                // kubernetes::pod_deleted_outside checks it is created.
                network_none "nonet" scenarios::network_none, local;
                supervisor_killed "kill" scenarios::supervisor_killed, all;
                concurrent_starts "race" scenarios::concurrent_starts, all;
                sync_rules "sync" scenarios::sync_rules, all;
                sync_hostile "hostile" scenarios::sync_hostile, all;
                unborn_branch "unborn" scenarios::unborn_branch, all;
                env_files "envf" scenarios::env_files, all;
                artifacts "art" scenarios::artifacts, all;
                // The sync modes, the web terminal and the dev proxy have
                // not been run on a pod yet.
                auto_commit "autoc" scenarios::auto_commit, local;
                auto_idle "autoi" scenarios::auto_idle, local;
                // Kubernetes runs it with 1-vCPU sandboxes (kubernetes.rs).
                two_at_once_and_fresh "two" scenarios::two_at_once_and_fresh, local;
                worktrees "wt" scenarios::worktrees, all;
                attach_session "attach" scenarios::attach_session, all;
                web_terminal "web" web::web_terminal, local;
                dev_proxy "proxy" proxy::dev_proxy, local;
                // A pod's memory use is not reported (no metrics API is
                // assumed), and its disk is a claim, not a layer over an
                // image on this host.
                memory_given_back "mem" scenarios::memory_given_back, local;
                disk_base "base" scenarios::disk_base, local;
                submodules "sub" scenarios::submodules, all;
                // leaks::points lists fault points of the local backends.
                fault_points_leave_nothing "leak"
                    |h| $crate::leaks::fault_points(h, $crate::leaks::points($backend)), local;
                destroy_guards "guard" scenarios::destroy_guards, all;
                // The lab is a network namespace on this host, routed into
                // the test cluster's namespace for pods (lab.rs).
                egress_policy "egress" $crate::egress::egress_policy, all;
            );

            $($item)*
        }
    };
    (@tests $on:ident, $backend:literal, $host:expr;
        $($name:ident $prefix:literal $scenario:expr, $applies:ident;)*) => {
        $($crate::backend_suite!(@test $on $applies $name $prefix $scenario, $backend, $host);)*
    };
    (@test kubernetes local $($skipped:tt)*) => {};
    (@test $on:ident $applies:ident $name:ident $prefix:literal $scenario:expr,
        $backend:literal, $host:expr) => {
        #[test]
        fn $name() {
            let host = $host;
            let scenario = $scenario;
            scenario(host(concat!($prefix, "-", $backend)));
        }
    };
}
pub(crate) use backend_suite;

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
    fn egress_policy_rootless() {
        crate::egress::egress_policy(Host::with_user(
            "container",
            "egress-rootless",
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
