//! The Kubernetes backend: each sandbox is a Pod running the guest image's
//! sshd, reached through the API server's port-forward, so the cluster
//! never needs a route back to the developer's machine.
//!
//! Objects, all in `[backend.kubernetes] namespace` (created when missing)
//! and labelled `app.kubernetes.io/managed-by=keystone`,
//! `keystone.dev/sandbox=<name>`:
//! - Pod `keystone-<name>`: the guest image, command `objects::START` (copies the
//!   per-sandbox SSH keys from the Secret into `/etc/keystone` with the
//!   modes sshd demands, then runs sshd under tini), `restartPolicy:
//!   Never` (sshd gone means the sandbox ended, as on the other backends),
//!   requests = limits from `--memory`/`--vcpus`, no service-account token.
//! - Secret `keystone-<name>-ssh`: the guest's host key and
//!   `authorized_keys`; written at every start, deleted at stop.
//! - PersistentVolumeClaim `keystone-<name>-workspace` for `/workspace`
//!   when `persist`: created by the start that finds it missing (and
//!   deleted again if that start fails), kept by `stop`, deleted by
//!   `--fresh` and `destroy`.
//! - NetworkPolicy `keystone-<name>-isolate`: no ingress (port-forward
//!   does not cross the pod network); no egress with `--network none` or
//!   the egress allowlist, else none to the cloud metadata addresses.
//!   Enforced only by a network plugin that implements NetworkPolicy.
//! - With the egress allowlist: an init container `egress-fence` (the
//!   only one holding NET_ADMIN) installs `keystone_egress::relay`'s
//!   nftables fence in the pod's network namespace; the Secret carries the
//!   relay program, which START runs beside sshd; the pod's resolver is
//!   198.18.0.1 (`dnsPolicy: None`). The supervisor serves the relayed
//!   egress point (policy, DNS, proxy, capture, control socket) in its
//!   runtime, its pulls opened through the port-forward like SSH.
//! - The pod's security context: the runtime's default seccomp profile,
//!   all capabilities dropped but the baseline set, no host namespaces,
//!   no service-account token, no service links.
//!
//! The supervisor runs [`Backend::run`]: it creates the claim when missing,
//! the Secret, the NetworkPolicy and the pod, watches the pod's phase and
//! conditions until the container runs (a pull error, an
//! unschedulable pod, an OOM kill or an eviction is an error carrying the
//! cluster's reason), then serves the sandbox's Unix socket, opening one
//! port-forward (kube-rs, WebSocket) to port 22 per connection. While the
//! sandbox runs it polls the pod, so a pod deleted or killed by someone
//! else ends the sandbox with that reason (`status` shows it). `stop`
//! deletes the pod and its Secret and waits until the pod is gone. A start
//! that fails at any step deletes what it created ([`guard`]).
//!
//! The pieces: [`objects`] builds the manifests (no I/O), [`cluster`]
//! makes the API calls, [`readiness`] reads a pod's status,
//! [`supervision`] runs one sandbox's life with [`guard`] holding what a
//! start has made. All of it takes a [`kube::Client`], so `mock_tests`
//! drives the lifecycle against a scripted API server, without a cluster.
//!
//! kube-rs needs an async runtime: the supervisor's signals are blocked
//! (see `signals`) before the tokio runtime starts its threads, so they
//! keep arriving on the signalfd only. This backend forks no processes:
//! its egress point runs in the same runtime.

use keystone_backend::signals::Signals;
use keystone_backend::{Backend, BackendError, Ended, Instance, Running, Usage};
use keystone_registry::KubeSettings;
use kube::Api;
use std::collections::BTreeMap;
use std::time::Duration;

mod cluster;
mod guard;
#[cfg(test)]
mod mock_tests;
mod objects;
mod readiness;
mod supervision;

pub use cluster::probe_cluster;

/// How long the pod may take to run sshd (image pull included); below
/// `start`'s own limit, so the user gets the cluster's reason.
const READY_TIMEOUT: Duration = Duration::from_secs(100);
/// How long a pod may stay unschedulable before the start fails with the
/// scheduler's reason (e.g. a memory request larger than any node): long
/// enough for a transient shortage, short of making the user wait for
/// [`READY_TIMEOUT`].
const UNSCHEDULABLE_GRACE: Duration = Duration::from_secs(20);
/// Any single API call.
const API_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a deleted pod or claim may take to go away.
const GONE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running sandbox's pod is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

pub struct KubernetesBackend;

/// The names of one sandbox's objects.
#[derive(Clone, Debug)]
struct Names {
    sandbox: String,
    pod: String,
    secret: String,
    claim: String,
    policy: String,
}

impl Names {
    fn of(inst: &Instance) -> Names {
        Names {
            sandbox: inst.name.clone(),
            pod: format!("keystone-{}", inst.name),
            secret: format!("keystone-{}-ssh", inst.name),
            claim: format!("keystone-{}-workspace", inst.name),
            policy: format!("keystone-{}-isolate", inst.name),
        }
    }

    fn labels(&self, id: &str) -> serde_json::Value {
        serde_json::json!({
            "app.kubernetes.io/managed-by": "keystone",
            "keystone.dev/sandbox": self.sandbox,
            "keystone.dev/id": id,
        })
    }
}

fn settings(inst: &Instance) -> Result<&KubeSettings, BackendError> {
    inst.settings.kubernetes.as_ref().ok_or_else(|| {
        BackendError::Failed(format!(
            "sandbox {} has no Kubernetes settings recorded; start it again with --fresh",
            inst.name
        ))
    })
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, BackendError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(BackendError::io("start the async runtime"))
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn prepare(&self, inst: &Instance, progress: &mut dyn FnMut(&str)) -> Result<(), BackendError> {
        let k = settings(inst)?.clone();
        if inst.settings.network == keystone_registry::NetworkMode::Bridge {
            return Err(BackendError::Failed(
                "--network bridge attaches a local sandbox to a host bridge; a pod is on the cluster's network: use --network nat (the pod network) or none".into(),
            ));
        }
        let rt = runtime(1)?;
        rt.block_on(async {
            progress("connecting to the Kubernetes API server");
            let client = cluster::connect(&k).await?;
            cluster::ensure_namespace(&client, &k.namespace).await
        })
    }

    fn run(
        &self,
        inst: &Instance,
        on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
    ) -> Result<Ended, BackendError> {
        // Before any runtime thread exists, so they all inherit the mask.
        let mut signals = Signals::install()?;
        let k = settings(inst)?.clone();
        let rt = runtime(2)?;
        let client = rt.block_on(cluster::connect(&k))?;
        let upstream = supervision::Upstream::PortForward(
            Box::new(Api::namespaced(client.clone(), &k.namespace)),
            Names::of(inst).pod,
        );
        supervision::run(
            &rt,
            &client,
            inst,
            &k,
            upstream,
            &mut |limit| signals.wait(limit),
            on_ready,
        )
    }

    fn reap(&self, inst: &Instance) {
        // The supervisor died: the pod is an orphan. Best effort, bounded.
        match std::fs::remove_file(&inst.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("could not remove {}: {e}", inst.socket.display()),
        }
        let names = Names::of(inst);
        let left = match (settings(inst), runtime(1)) {
            (Ok(k), Ok(rt)) => rt.block_on(async {
                match cluster::connect(k).await {
                    Ok(client) => {
                        cluster::remove_pod_objects(&client, &k.namespace, &names, 0).await
                    }
                    Err(e) => vec![e],
                }
            }),
            (Err(e), _) | (_, Err(e)) => vec![e],
        };
        for e in left {
            tracing::warn!("could not remove the pod of {}: {e}", inst.name);
        }
    }

    fn discard_disk(&self, inst: &Instance) -> Result<(), BackendError> {
        let Some(k) = inst.settings.kubernetes.as_ref() else {
            return Ok(());
        };
        let names = Names::of(inst);
        let rt = runtime(1)?;
        rt.block_on(async {
            let client = cluster::connect(k).await?;
            cluster::remove_claim(&client, &k.namespace, &names).await
        })
    }

    fn usage(&self, _inst: &Instance, _runtime: &BTreeMap<String, serde_json::Value>) -> Usage {
        // The metrics API is an add-on many clusters lack; no guess.
        Usage::default()
    }
}
