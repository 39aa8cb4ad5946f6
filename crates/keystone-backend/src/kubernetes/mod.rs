//! The Kubernetes backend: each sandbox is a Pod running the guest image's
//! sshd, reached through the API server's port-forward, so the cluster
//! never needs a route back to the developer's machine.
//!
//! Objects, all in `[backend.kubernetes] namespace` (created when missing)
//! and labelled `app.kubernetes.io/managed-by=keystone`,
//! `keystone.dev/sandbox=<name>`:
//! - Pod `keystone-<name>`: the guest image, command [`START`] (copies the
//!   per-sandbox SSH keys from the Secret into `/etc/keystone` with the
//!   modes sshd demands, then runs sshd under tini), `restartPolicy:
//!   Never` (sshd gone means the sandbox ended, as on the other backends),
//!   requests = limits from `--memory`/`--vcpus`, no service-account token.
//! - Secret `keystone-<name>-ssh`: the guest's host key and
//!   `authorized_keys`; written at every start, deleted at stop.
//! - PersistentVolumeClaim `keystone-<name>-workspace` for `/workspace`
//!   when `persist`: kept by `stop`, deleted by `--fresh` and `destroy`.
//! - NetworkPolicy `keystone-<name>-isolate`: no ingress (port-forward
//!   does not cross the pod network); no egress with `--network none`,
//!   else none to the cloud metadata addresses. Enforced only by a
//!   network plugin that implements NetworkPolicy.
//! - The pod's security context: the runtime's default seccomp profile,
//!   all capabilities dropped but the baseline set, no host namespaces,
//!   no service-account token, no service links.
//!
//! The supervisor runs [`Backend::run`]: it creates the pod, watches its
//! phase and conditions until the container runs (a pull error, an
//! unschedulable pod, an OOM kill or an eviction is an error carrying the
//! cluster's reason), then serves the sandbox's Unix socket, opening one
//! port-forward (kube-rs, WebSocket) to port 22 per connection. While the
//! sandbox runs it polls the pod, so a pod deleted or killed by someone
//! else ends the sandbox with that reason (`status` shows it). `stop`
//! deletes the pod and its Secret and waits until the pod is gone.
//!
//! kube-rs needs an async runtime: the supervisor's signals are blocked
//! (see `signals`) before the tokio runtime starts its threads, so they
//! keep arriving on the signalfd only. This backend forks no processes.

use crate::signals::{Signals, StopRequest, Wake};
use crate::{Backend, BackendError, Ended, Instance, Running, Usage};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, PodStatus, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_registry::KubeSettings;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

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
/// The claim's requested size (what a provisioner sizes the volume by).
const WORKSPACE_SIZE: &str = "10Gi";
const SSH_PORT: u16 = 22;
const SECRET_MOUNT: &str = "/run/keystone-secrets";

/// The container's command: keys into place, the workspace owned by the
/// agent (a fresh volume is root's), then sshd under tini, which reaps
/// orphans as PID 1.
const START: &str = r#"set -e
install -d -m 0755 /etc/keystone /run/sshd
install -m 0600 /run/keystone-secrets/ssh_host_ed25519_key /etc/keystone/ssh_host_ed25519_key
install -m 0644 /run/keystone-secrets/authorized_keys /etc/keystone/authorized_keys
[ "$(stat -c %u /workspace)" = 1000 ] || chown 1000:1000 /workspace
exec /usr/bin/tini -g -- /usr/sbin/sshd -D -e
"#;

pub struct KubernetesBackend;

/// The names of one sandbox's objects.
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

/// Bound an API call; a timeout reads as the cluster being unreachable.
async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BackendError::Failed(format!("{what}: {}", api_message(&e)))),
        Err(_) => Err(BackendError::Failed(format!(
            "{what}: no answer from the API server within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// A client for the configured context, proven by asking the server's
/// version: a wrong context or an unreachable server is a requirement the
/// user must fix (exit 4), said with what to check.
async fn connect(k: &KubeSettings) -> Result<Client, BackendError> {
    let context_name = if k.context.is_empty() {
        "the current context".to_string()
    } else {
        format!("context {:?}", k.context)
    };
    let check = "check KUBECONFIG (or ~/.kube/config), `[backend.kubernetes] context`, and `kubectl cluster-info`";
    let options = kube::config::KubeConfigOptions {
        context: (!k.context.is_empty()).then(|| k.context.clone()),
        ..Default::default()
    };
    let mut config = if k.context.is_empty() {
        kube::Config::infer().await.map_err(|e| {
            BackendError::Requirement(format!("no usable Kubernetes configuration: {e}; {check}"))
        })?
    } else {
        kube::Config::from_kubeconfig(&options).await.map_err(|e| {
            BackendError::Requirement(format!("cannot use {context_name}: {e}; {check}"))
        })?
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| {
        BackendError::Requirement(format!("cannot use {context_name} ({url}): {e}; {check}"))
    })?;
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(BackendError::Requirement(format!(
            "the Kubernetes API server at {url} ({context_name}) cannot be reached: {}; {check}",
            api_message(&e)
        ))),
        Err(_) => Err(BackendError::Requirement(format!(
            "the Kubernetes API server at {url} ({context_name}) did not answer within 10s; {check}"
        ))),
    }
}

/// For `doctor`: whether the cluster of `context` (empty: the current one)
/// answers, and which Kubernetes it runs.
pub fn probe_cluster(context: &str) -> Result<String, String> {
    let k = KubeSettings {
        context: context.to_string(),
        namespace: String::new(),
        storage_class: String::new(),
        image: String::new(),
        pull_policy: String::new(),
    };
    let rt = runtime(1).map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = connect(&k).await.map_err(|e| e.to_string())?;
        let v = bounded("ask the server's version", client.apiserver_version())
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "Kubernetes {} answers ({})",
            v.git_version,
            if context.is_empty() {
                "current context".to_string()
            } else {
                format!("context {context}")
            }
        ))
    })
}

async fn ensure_namespace(client: &Client, ns: &str) -> Result<(), BackendError> {
    let api: Api<Namespace> = Api::all(client.clone());
    if bounded("read the namespace", api.get_opt(ns))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let obj: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/managed-by": "keystone"}}
    }))
    .map_err(|e| BackendError::Failed(e.to_string()))?;
    match tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), &obj)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if is_conflict(&e) => Ok(()),
        Ok(Err(e)) => Err(BackendError::Failed(format!(
            "cannot create namespace {ns}: {}",
            api_message(&e)
        ))),
        Err(_) => Err(BackendError::Failed(format!(
            "creating namespace {ns}: no answer within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// Create `obj`, replacing one of the same name.
async fn put<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), BackendError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), obj)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if is_conflict(&e) => {
            delete_and_wait(api, name, 0).await?;
            bounded(
                &format!("create {name}"),
                api.create(&PostParams::default(), obj),
            )
            .await?;
            Ok(())
        }
        Ok(Err(e)) => Err(BackendError::Failed(format!(
            "cannot create {name}: {}",
            api_message(&e)
        ))),
        Err(_) => Err(BackendError::Failed(format!(
            "creating {name}: no answer within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// Delete an object and wait until the API no longer has it.
async fn delete_and_wait<K>(api: &Api<K>, name: &str, grace: u32) -> Result<(), BackendError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        grace_period_seconds: Some(grace),
        ..DeleteParams::background()
    };
    match tokio::time::timeout(API_TIMEOUT, api.delete(name, &dp)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if is_not_found(&e) => return Ok(()),
        Ok(Err(e)) => {
            return Err(BackendError::Failed(format!(
                "cannot delete {name}: {}",
                api_message(&e)
            )))
        }
        Err(_) => {
            return Err(BackendError::Failed(format!(
                "deleting {name}: no answer within {}s",
                API_TIMEOUT.as_secs()
            )))
        }
    }
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        if bounded(&format!("read {name}"), api.get_opt(name))
            .await?
            .is_none()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BackendError::Failed(format!(
                "{name} was deleted but still exists after {}s (a finalizer, or a node that does not answer?)",
                GONE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn object<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<K, BackendError> {
    serde_json::from_value(v).map_err(|e| BackendError::Failed(format!("internal: {e}")))
}

fn secret_object(inst: &Instance, names: &Names) -> Result<Secret, BackendError> {
    let read = |name: &str| -> Result<String, BackendError> {
        let p = inst.guest_dir.join(name);
        fs::read_to_string(&p).map_err(BackendError::io(p.display().to_string()))
    };
    object(serde_json::json!({
        "metadata": {"name": names.secret, "labels": names.labels(&inst.id)},
        "type": "Opaque",
        "stringData": {
            "ssh_host_ed25519_key": read("ssh_host_ed25519_key")?,
            "authorized_keys": read("authorized_keys")?,
        }
    }))
}

fn claim_object(
    inst: &Instance,
    names: &Names,
    k: &KubeSettings,
) -> Result<PersistentVolumeClaim, BackendError> {
    let mut spec = serde_json::json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": WORKSPACE_SIZE}},
    });
    if !k.storage_class.is_empty() {
        spec["storageClassName"] = serde_json::json!(k.storage_class);
    }
    object(serde_json::json!({
        "metadata": {"name": names.claim, "labels": names.labels(&inst.id)},
        "spec": spec,
    }))
}

fn pod_object(inst: &Instance, names: &Names, k: &KubeSettings) -> Result<Pod, BackendError> {
    let resources = serde_json::json!({
        "cpu": inst.settings.vcpus.to_string(),
        "memory": format!("{}Mi", inst.settings.memory_mb),
    });
    let mut mounts = vec![serde_json::json!({
        "name": "keys", "mountPath": SECRET_MOUNT, "readOnly": true
    })];
    let mut volumes = vec![serde_json::json!({
        "name": "keys", "secret": {"secretName": names.secret, "defaultMode": 0o400}
    })];
    if inst.settings.persist {
        mounts.push(serde_json::json!({"name": "workspace", "mountPath": "/workspace"}));
        volumes.push(serde_json::json!({
            "name": "workspace", "persistentVolumeClaim": {"claimName": names.claim}
        }));
    }
    object(serde_json::json!({
        "metadata": {"name": names.pod, "labels": names.labels(&inst.id)},
        "spec": {
            "hostname": names.sandbox,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "hostNetwork": false,
            "hostPID": false,
            "hostIPC": false,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "sandbox",
                "image": k.image,
                "imagePullPolicy": k.pull_policy,
                "command": ["/bin/sh", "-c", START],
                "ports": [{"name": "ssh", "containerPort": SSH_PORT}],
                "resources": {"requests": resources, "limits": resources},
                "volumeMounts": mounts,
                "securityContext": container_security(),
            }],
            "volumes": volumes,
        }
    }))
}

/// Capabilities the sandbox container keeps: the container backend's set
/// (Docker's defaults without NET_RAW, which is what the Pod Security
/// Standards' baseline level allows, plus SYS_PTRACE: the dev proxy's
/// discovery runs `ss -p` as root, which must see the agent's servers,
/// and the pod's PID namespace holds only the sandbox's processes; a
/// baseline-enforcing namespace refuses it). sudo must work inside, so
/// privilege escalation stays allowed (no_new_privs would stop sudo); the
/// rest is the restricted level's: no privileged mode, the default proc
/// mount, the runtime's default seccomp profile (on the pod).
const POD_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
];

fn container_security() -> serde_json::Value {
    serde_json::json!({
        "privileged": false,
        "allowPrivilegeEscalation": true,
        "procMount": "Default",
        "capabilities": {"drop": ["ALL"], "add": POD_CAPABILITIES},
    })
}

/// Cloud metadata services: credentials of the node's cloud identity
/// answer there (AWS, GCP, Azure, OpenStack on 169.254.169.254; Alibaba
/// on 100.100.100.200; AWS's IPv6 endpoint). A sandbox never reaches them.
const METADATA_ADDRESSES: &[&str] = &["169.254.169.254/32", "100.100.100.200/32"];
const METADATA_ADDRESSES_V6: &[&str] = &["fd00:ec2::254/128"];

/// `--network none`: nothing in or out. Otherwise (nat): anything out but
/// the metadata services; nothing in (port-forward does not cross the
/// pod network). Enforced only by a network plugin that implements
/// NetworkPolicy (Calico, Cilium, Antrea; not flannel alone).
fn policy_object(inst: &Instance, names: &Names) -> Result<NetworkPolicy, BackendError> {
    let egress = egress_rules(inst.settings.network.as_str());
    object(serde_json::json!({
        "metadata": {"name": names.policy, "labels": names.labels(&inst.id)},
        "spec": {
            "podSelector": {"matchLabels": {"keystone.dev/sandbox": names.sandbox}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        }
    }))
}

fn egress_rules(network: &str) -> serde_json::Value {
    if network == "none" {
        serde_json::json!([])
    } else {
        serde_json::json!([{"to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": METADATA_ADDRESSES}},
            {"ipBlock": {"cidr": "::/0", "except": METADATA_ADDRESSES_V6}},
        ]}])
    }
}

/// What a pod's status says, as far as starting a sandbox goes.
#[derive(Debug, PartialEq, Eq)]
enum PodVerdict {
    /// Still coming up; the reason, when the cluster gives one.
    Waiting(Option<String>),
    /// No node can take it (yet): the scheduler's reason.
    Unschedulable(String),
    Running,
    /// It cannot or will not run: the cluster's reason.
    Failed(String),
}

/// Waiting reasons that will not resolve by themselves.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

fn verdict(pod: &Pod) -> PodVerdict {
    let Some(status) = pod.status.as_ref() else {
        return PodVerdict::Waiting(None);
    };
    verdict_of(status)
}

fn verdict_of(status: &PodStatus) -> PodVerdict {
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let explain = |reason: Option<&String>, message: Option<&String>| -> String {
        match (reason, message) {
            (Some(r), Some(m)) if !m.is_empty() => format!("{r}: {m}"),
            (Some(r), _) => r.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "no reason given".into(),
        }
    };
    if phase == "Failed" || phase == "Succeeded" {
        // Evicted pods carry the reason on the pod itself.
        if status.reason.is_some() || status.message.is_some() {
            return PodVerdict::Failed(explain(status.reason.as_ref(), status.message.as_ref()));
        }
    }
    for c in status.container_statuses.iter().flatten() {
        if let Some(state) = &c.state {
            if let Some(t) = &state.terminated {
                let mut why = explain(t.reason.as_ref(), t.message.as_ref());
                why.push_str(&format!(" (exit code {})", t.exit_code));
                return PodVerdict::Failed(format!("the sandbox container ended: {why}"));
            }
            if let Some(w) = &state.waiting {
                let reason = w.reason.clone().unwrap_or_default();
                if FATAL_WAITING.contains(&reason.as_str()) {
                    return PodVerdict::Failed(explain(w.reason.as_ref(), w.message.as_ref()));
                }
                return PodVerdict::Waiting(Some(explain(w.reason.as_ref(), w.message.as_ref())));
            }
            if state.running.is_some() && phase == "Running" {
                return PodVerdict::Running;
            }
        }
    }
    if phase == "Failed" || phase == "Succeeded" {
        return PodVerdict::Failed(format!("the pod is {phase}"));
    }
    // Not scheduled yet: the scheduler's reason (e.g. Unschedulable:
    // "0/1 nodes are available: 1 Insufficient memory").
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.status == "False" {
            let why = explain(c.reason.as_ref(), c.message.as_ref());
            // An unbound claim is a provisioner at work (cloud disks take
            // tens of seconds), not a node shortage: wait for it.
            let claim_pending = c
                .message
                .as_deref()
                .is_some_and(|m| m.contains("PersistentVolumeClaim"));
            if c.reason.as_deref() == Some("Unschedulable") && !claim_pending {
                return PodVerdict::Unschedulable(why);
            }
            return PodVerdict::Waiting(Some(why));
        }
    }
    PodVerdict::Waiting(None)
}

fn probe(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Serve the sandbox's Unix socket: each connection gets its own
/// port-forward to the pod's sshd.
async fn serve(listener: tokio::net::UnixListener, pods: Api<Pod>, pod: String) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept on the sandbox's socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let pods = pods.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let mut pf = match pods.portforward(&pod, &[SSH_PORT]).await {
                Ok(pf) => pf,
                Err(e) => {
                    tracing::warn!("port-forward to {pod}: {}", api_message(&e));
                    return;
                }
            };
            let Some(mut upstream) = pf.take_stream(SSH_PORT) else {
                return;
            };
            if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await {
                tracing::debug!("port-forward to {pod} ended: {e}");
            }
            drop(upstream);
            pf.abort();
        });
    }
}

/// Delete the pod, its Secret and NetworkPolicy (never the claim).
async fn remove_pod_objects(
    client: &Client,
    ns: &str,
    names: &Names,
    grace: u32,
) -> Result<(), BackendError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let pod = delete_and_wait(&pods, &names.pod, grace).await;
    let secret = delete_and_wait(&secrets, &names.secret, 0).await;
    let policy = delete_and_wait(&policies, &names.policy, 0).await;
    pod.and(secret).and(policy)
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
        let names = Names::of(inst);
        let rt = runtime(1)?;
        rt.block_on(async {
            progress("connecting to the Kubernetes API server");
            let client = connect(&k).await?;
            ensure_namespace(&client, &k.namespace).await?;
            if inst.settings.persist {
                let claims: Api<PersistentVolumeClaim> =
                    Api::namespaced(client.clone(), &k.namespace);
                if bounded("read the workspace claim", claims.get_opt(&names.claim))
                    .await?
                    .is_none()
                {
                    progress("creating the workspace volume claim");
                    let claim = claim_object(inst, &names, &k)?;
                    bounded(
                        &format!("create claim {}", names.claim),
                        claims.create(&PostParams::default(), &claim),
                    )
                    .await?;
                }
            }
            Ok(())
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
        let names = Names::of(inst);
        let rt = runtime(2)?;
        let client = rt.block_on(connect(&k))?;
        let ns = k.namespace.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let cleanup = |rt: &tokio::runtime::Runtime| {
            if let Err(e) = rt.block_on(remove_pod_objects(&client, &ns, &names, 0)) {
                tracing::warn!("cleaning up after a failed start: {e}");
            }
        };

        rt.block_on(async {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            put(&secrets, &names.secret, &secret_object(inst, &names)?).await?;
            let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
            put(&policies, &names.policy, &policy_object(inst, &names)?).await?;
            put(&pods, &names.pod, &pod_object(inst, &names, &k)?).await
        })
        .inspect_err(|_| cleanup(&rt))?;

        // Until the container runs: the cluster's reasons, bounded.
        let started = Instant::now();
        let mut last_reason: Option<String> = None;
        let mut unschedulable_since: Option<Instant> = None;
        let pod = loop {
            match rt.block_on(bounded("read the pod", pods.get_opt(&names.pod))) {
                Ok(Some(pod)) => match verdict(&pod) {
                    PodVerdict::Running => break pod,
                    PodVerdict::Failed(why) => {
                        cleanup(&rt);
                        return Err(BackendError::Failed(format!(
                            "pod {ns}/{} cannot run: {why}",
                            names.pod
                        )));
                    }
                    PodVerdict::Unschedulable(why) => {
                        let since = *unschedulable_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > UNSCHEDULABLE_GRACE {
                            cleanup(&rt);
                            return Err(BackendError::Failed(format!(
                                "pod {ns}/{} cannot be scheduled: {why}",
                                names.pod
                            )));
                        }
                        last_reason = Some(why);
                    }
                    PodVerdict::Waiting(why) => {
                        unschedulable_since = None;
                        last_reason = why.or(last_reason);
                    }
                },
                Ok(None) => {
                    cleanup(&rt);
                    return Err(BackendError::Failed(format!(
                        "pod {ns}/{} was deleted while it started",
                        names.pod
                    )));
                }
                Err(e) => last_reason = Some(e.to_string()),
            }
            if started.elapsed() > READY_TIMEOUT {
                cleanup(&rt);
                return Err(BackendError::Failed(format!(
                    "pod {ns}/{} did not start within {}s (last: {}); see `kubectl -n {ns} describe pod {}`",
                    names.pod,
                    READY_TIMEOUT.as_secs(),
                    last_reason.as_deref().unwrap_or("Pending"),
                    names.pod
                )));
            }
            // Polled, not watched: a start is a few seconds, and a 100 ms
            // poll costs the API server less than a watch per sandbox.
            if let Wake::Stop(_) = signals.wait(Duration::from_millis(100)) {
                cleanup(&rt);
                return Ok(Ended::Stopped);
            }
        };

        let _ = fs::remove_file(&inst.socket);
        let std_listener = std::os::unix::net::UnixListener::bind(&inst.socket)
            .map_err(BackendError::io(format!("bind {}", inst.socket.display())))
            .inspect_err(|_| cleanup(&rt))?;
        std_listener
            .set_nonblocking(true)
            .map_err(BackendError::io("socket"))?;
        let server = {
            let _guard = rt.enter();
            let listener = tokio::net::UnixListener::from_std(std_listener)
                .map_err(BackendError::io("socket"))?;
            rt.spawn(serve(listener, pods.clone(), names.pod.clone()))
        };
        let teardown = |rt: &tokio::runtime::Runtime, grace: u32| -> Result<(), BackendError> {
            server.abort();
            let _ = fs::remove_file(&inst.socket);
            rt.block_on(remove_pod_objects(&client, &ns, &names, grace))
        };

        // sshd answers through the port-forward: the channel works.
        loop {
            if probe(&inst.socket) {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = teardown(&rt, 0);
                return Err(BackendError::Failed(format!(
                    "the sandbox's sshd did not answer through the API server's port-forward within {}s; see `kubectl -n {ns} logs {}`",
                    READY_TIMEOUT.as_secs(),
                    names.pod
                )));
            }
            if let Wake::Stop(_) = signals.wait(Duration::from_millis(100)) {
                teardown(&rt, 0)?;
                return Ok(Ended::Stopped);
            }
        }

        let mut runtime = BTreeMap::new();
        runtime.insert("namespace".into(), serde_json::json!(ns));
        runtime.insert("pod".into(), serde_json::json!(names.pod));
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            runtime.insert("node".into(), serde_json::json!(node));
        }
        runtime.insert("image".into(), serde_json::json!(k.image));
        runtime.insert(
            "start_seconds".into(),
            serde_json::json!(started.elapsed().as_secs_f64()),
        );
        let mut notes = vec![format!("pod: {ns}/{}", names.pod)];
        if inst.settings.network == keystone_registry::NetworkMode::None {
            notes.push(format!(
                "network none: NetworkPolicy {} denies all traffic (enforced only if the cluster's network plugin implements NetworkPolicy)",
                names.policy
            ));
        }
        if let Err(e) = on_ready(&Running { runtime, notes }) {
            let _ = teardown(&rt, 0);
            return Err(BackendError::Failed(e));
        }

        let mut last_check = Instant::now();
        loop {
            match signals.wait(Duration::from_millis(500)) {
                Wake::Stop(kind) => {
                    let grace = if kind == StopRequest::Force { 0 } else { 5 };
                    teardown(&rt, grace)?;
                    return Ok(Ended::Stopped);
                }
                Wake::Child | Wake::Timeout => {}
            }
            if last_check.elapsed() < WATCH_INTERVAL {
                continue;
            }
            last_check = Instant::now();
            // A transient API error is not the pod's end; only what the
            // API says about the pod is.
            match rt.block_on(bounded("read the pod", pods.get_opt(&names.pod))) {
                Ok(None) => {
                    let _ = teardown(&rt, 0);
                    return Ok(Ended::Exited(format!(
                        "pod {ns}/{} was deleted outside keystone",
                        names.pod
                    )));
                }
                Ok(Some(p)) => {
                    if let PodVerdict::Failed(why) = verdict(&p) {
                        let _ = teardown(&rt, 0);
                        return Ok(Ended::Exited(format!("pod {ns}/{}: {why}", names.pod)));
                    }
                    if p.metadata.deletion_timestamp.is_some() {
                        let _ = teardown(&rt, 0);
                        return Ok(Ended::Exited(format!(
                            "pod {ns}/{} was deleted outside keystone",
                            names.pod
                        )));
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    fn reap(&self, inst: &Instance) {
        // The supervisor died: the pod is an orphan. Best effort, bounded.
        let _ = fs::remove_file(&inst.socket);
        let Ok(k) = settings(inst) else { return };
        let names = Names::of(inst);
        let Ok(rt) = runtime(1) else { return };
        let result = rt.block_on(async {
            let client = connect(k).await?;
            remove_pod_objects(&client, &k.namespace, &names, 0).await
        });
        if let Err(e) = result {
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
            let client = connect(k).await?;
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client, &k.namespace);
            delete_and_wait(&claims, &names.claim, 0).await
        })
    }

    fn usage(&self, _inst: &Instance, _runtime: &BTreeMap<String, serde_json::Value>) -> Usage {
        // The metrics API is an add-on many clusters lack; no guess.
        Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> PodStatus {
        serde_json::from_value(v).expect("status")
    }

    #[test]
    fn egress_never_reaches_the_metadata_service() {
        assert_eq!(egress_rules("none"), serde_json::json!([]));
        let nat = egress_rules("nat").to_string();
        assert!(
            nat.contains(r#""except":["169.254.169.254/32","100.100.100.200/32"]"#),
            "{nat}"
        );
        assert!(nat.contains("fd00:ec2::254/128"), "{nat}");
        // The policy parses as a Kubernetes NetworkPolicy.
        let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress_rules("nat")}
        }))
        .expect("a NetworkPolicy");
        assert_eq!(p.spec.and_then(|s| s.egress).map(|e| e.len()), Some(1));
    }

    #[test]
    fn the_pod_drops_capabilities_and_keeps_sudo() {
        let c = container_security();
        assert_eq!(c["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let added: Vec<&str> = c["capabilities"]["add"]
            .as_array()
            .expect("add")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for cap in ["SYS_ADMIN", "NET_RAW", "NET_ADMIN", "SYS_MODULE"] {
            assert!(!added.contains(&cap), "{cap}");
        }
        assert!(
            added.contains(&"SETUID") && added.contains(&"SETGID"),
            "sudo needs them"
        );
        assert_eq!(
            c["allowPrivilegeEscalation"], true,
            "no_new_privs would stop sudo"
        );
        assert_eq!(c["privileged"], false);
    }

    #[test]
    fn pull_errors_fail_with_the_clusters_reason() {
        let s = status(serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull",
                "message": "Container image \"x\" is not present with pull policy of Never"}}}]
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Failed(
                "ErrImageNeverPull: Container image \"x\" is not present with pull policy of Never"
                    .into()
            )
        );
    }

    #[test]
    fn oom_kill_and_eviction_are_failures() {
        let s = status(serde_json::json!({
            "phase": "Failed",
            "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Failed("the sandbox container ended: OOMKilled (exit code 137)".into())
        );
        let s = status(serde_json::json!({
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Failed("Evicted: The node was low on resource: memory.".into())
        );
    }

    #[test]
    fn unschedulable_carries_the_schedulers_reason() {
        let s = status(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient memory."}]
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Unschedulable(
                "Unschedulable: 0/1 nodes are available: 1 Insufficient memory.".into()
            )
        );
        let s = status(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims."}]
        }));
        assert!(matches!(verdict_of(&s), PodVerdict::Waiting(Some(_))));
        let s = status(serde_json::json!({
            "phase": "Running",
            "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": true,
                "restartCount": 0, "state": {"running": {}}}]
        }));
        assert_eq!(verdict_of(&s), PodVerdict::Running);
    }
}
