//! Supervision: one sandbox's life in the supervisor, from the first object
//! created to the last one deleted. Everything a start creates is held by
//! a [`Created`] guard until the sandbox is up, so no early return leaves
//! anything in the cluster; each such return has a fault point
//! (`keystone_backend::fault`) for the leak tests.

use super::cluster::{self, api_message, bounded, put};
use super::guard::Created;
use super::objects::{claim_object, pod_object, policy_object, secret_object, SSH_PORT};
use super::readiness::{verdict, PodVerdict};
use super::{Names, READY_TIMEOUT, UNSCHEDULABLE_GRACE, WATCH_INTERVAL};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_backend::signals::{StopRequest, Wake};
use keystone_backend::{fault, BackendError, Ended, Instance, Running};
use keystone_registry::KubeSettings;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where a connection to the sandbox's socket is taken.
#[derive(Clone)]
pub(super) enum Upstream {
    /// The pod's sshd, through the API server's port-forward.
    PortForward(Box<Api<Pod>>, String),
    /// The unit tests' stand-in: a mocked API server cannot upgrade a
    /// connection to a port-forward, so each connection is answered with
    /// these bytes (an SSH greeting) instead.
    #[cfg(test)]
    Greeting(&'static [u8]),
}

/// Waits at most the given time for a stop request (the supervisor's
/// signals; a script in the tests).
pub(super) type Wait<'a> = dyn FnMut(Duration) -> Wake + 'a;

/// The sandbox's whole life: start it, call `on_ready`, watch it until it
/// is stopped or ends. `rt` runs the API calls; this function blocks on it
/// and must not itself run inside it.
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    inst: &Instance,
    k: &KubeSettings,
    upstream: Upstream,
    wait: &mut Wait<'_>,
    on_ready: &mut dyn FnMut(&Running) -> Result<(), String>,
) -> Result<Ended, BackendError> {
    let names = Names::of(inst);
    let started = Instant::now();
    let mut made = Created::new(rt.handle().clone(), client.clone(), &k.namespace, &names);
    // Every `?` of the start is inside `start`: its error comes back here,
    // where the guard undoes what the start made.
    let pod = match start(
        rt, client, inst, k, &names, &mut made, upstream, wait, started,
    ) {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            made.remove(0)?;
            return Ok(Ended::Stopped);
        }
        Err(e) => return Err(made.fail(e)),
    };
    let running = record(inst, k, &names, &pod, started);
    if let Err(e) = on_ready(&running) {
        return Err(made.fail(BackendError::Failed(e)));
    }
    made.keep_claim();
    watch(rt, client, &k.namespace, &names, made, wait)
}

/// Create the objects, wait for the pod to run, serve the socket, wait for
/// sshd to answer through it. `None`: asked to stop meanwhile.
#[allow(clippy::too_many_arguments)]
fn start(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    inst: &Instance,
    k: &KubeSettings,
    names: &Names,
    made: &mut Created,
    upstream: Upstream,
    wait: &mut Wait<'_>,
    started: Instant,
) -> Result<Option<Pod>, BackendError> {
    let ns = k.namespace.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    rt.block_on(async {
        // The workspace, when it does not exist yet (a first start, or
        // after --fresh): only such a claim goes if the start fails.
        if inst.settings.persist && !cluster::claim_exists(client, ns, names).await? {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
            let claim = claim_object(inst, names, k)?;
            made.claim();
            cluster::create(&claims, &names.claim, &claim).await?;
            fault::point("kubernetes-claim-created")?;
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret = secret_object(inst, names)?;
        made.secret();
        put(&secrets, &names.secret, &secret).await?;
        fault::point("kubernetes-secret-created")?;
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        let policy = policy_object(inst, names)?;
        made.policy();
        put(&policies, &names.policy, &policy).await?;
        fault::point("kubernetes-policy-created")?;
        let pod = pod_object(inst, names, k)?;
        made.pod();
        put(&pods, &names.pod, &pod).await?;
        fault::point("kubernetes-pod-created")
    })?;

    let Some(pod) = until_running(rt, &pods, ns, names, wait, started)? else {
        return Ok(None);
    };
    fault::point("kubernetes-pod-running")?;

    match std::fs::remove_file(&inst.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(BackendError::Io {
                context: format!("remove the stale socket {}", inst.socket.display()),
                source: e,
            })
        }
    }
    let std_listener = std::os::unix::net::UnixListener::bind(&inst.socket)
        .map_err(BackendError::io(format!("bind {}", inst.socket.display())))?;
    made.socket(inst.socket.clone());
    fault::point("kubernetes-socket-bound")?;
    std_listener
        .set_nonblocking(true)
        .map_err(BackendError::io("socket"))?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::from_std(std_listener).map_err(BackendError::io("socket"))?
    };
    made.server(rt.spawn(serve(listener, upstream.clone())));
    if inst.settings.egress_allowlist() {
        let files = egress_files(inst);
        let task = {
            let _guard = rt.enter();
            start_egress(&files, &inst.name, upstream).map_err(|e| {
                BackendError::Failed(format!("the egress point of {}: {e}", inst.name))
            })?
        };
        made.egress(task, files.control);
        fault::point("kubernetes-egress-started")?;
    }

    // sshd answers through the port-forward: the channel works.
    loop {
        // Each probe is a port-forward through the API server: slow to set
        // up, so given time.
        if keystone_backend::plumbing::sshd_answers(&inst.socket, Duration::from_secs(5)) {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(BackendError::Failed(format!(
                "the sandbox's sshd did not answer through the API server's port-forward within {}s; see `kubectl -n {ns} logs {}`",
                READY_TIMEOUT.as_secs(),
                names.pod
            )));
        }
        if let Wake::Stop(_) = wait(Duration::from_millis(100)) {
            return Ok(None);
        }
    }
    fault::point("kubernetes-sshd-answered")?;
    Ok(Some(pod))
}

/// Until the container runs: the cluster's reasons, bounded. `None`: asked
/// to stop meanwhile.
fn until_running(
    rt: &tokio::runtime::Runtime,
    pods: &Api<Pod>,
    ns: &str,
    names: &Names,
    wait: &mut Wait<'_>,
    started: Instant,
) -> Result<Option<Pod>, BackendError> {
    let mut last_reason: Option<String> = None;
    let mut unschedulable_since: Option<Instant> = None;
    loop {
        match rt.block_on(bounded("read the pod", pods.get_opt(&names.pod))) {
            Ok(Some(pod)) => match verdict(&pod) {
                PodVerdict::Running => return Ok(Some(pod)),
                PodVerdict::Failed(why) => {
                    return Err(BackendError::Failed(format!(
                        "pod {ns}/{} cannot run: {why}",
                        names.pod
                    )));
                }
                PodVerdict::Unschedulable(why) => {
                    let since = *unschedulable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNSCHEDULABLE_GRACE {
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
                return Err(BackendError::Failed(format!(
                    "pod {ns}/{} was deleted while it started",
                    names.pod
                )));
            }
            Err(e) => last_reason = Some(e.to_string()),
        }
        if started.elapsed() > READY_TIMEOUT {
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
        if let Wake::Stop(_) = wait(Duration::from_millis(100)) {
            return Ok(None);
        }
    }
}

/// What the registry records about the running sandbox, and the notes for
/// the user.
fn record(
    inst: &Instance,
    k: &KubeSettings,
    names: &Names,
    pod: &Pod,
    started: Instant,
) -> Running {
    let ns = &k.namespace;
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
    Running { runtime, notes }
}

/// The running sandbox: until a stop request, or the pod's end.
fn watch(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    ns: &str,
    names: &Names,
    made: Created,
    wait: &mut Wait<'_>,
) -> Result<Ended, BackendError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut last_check = Instant::now();
    loop {
        match wait(Duration::from_millis(500)) {
            Wake::Stop(kind) => {
                let grace = if kind == StopRequest::Force { 0 } else { 5 };
                made.remove(grace)?;
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
                return Ok(ended(
                    made,
                    format!("pod {ns}/{} was deleted outside keystone", names.pod),
                ));
            }
            Ok(Some(p)) => {
                if let PodVerdict::Failed(why) = verdict(&p) {
                    return Ok(ended(made, format!("pod {ns}/{}: {why}", names.pod)));
                }
                if p.metadata.deletion_timestamp.is_some() {
                    return Ok(ended(
                        made,
                        format!("pod {ns}/{} was deleted outside keystone", names.pod),
                    ));
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// The sandbox ended by itself: remove what is left, and say so beside
/// the reason if that fails.
fn ended(made: Created, why: String) -> Ended {
    match made.remove(0) {
        Ok(()) => Ended::Exited(why),
        Err(e) => Ended::Exited(format!("{why}; {e}")),
    }
}

/// Where the sandbox's egress files are (the same as the local backends').
fn egress_files(inst: &Instance) -> keystone_egress::relay::Files {
    let p = keystone_backend::egress::paths(&inst.dir);
    keystone_egress::relay::Files {
        policy: p.policy,
        pool: p.pool,
        log: p.log,
        control: p.control,
    }
}

/// How many pulls wait in the pod: each guest connection takes one, and
/// a new one is opened at once (a port-forward through the API server,
/// tens of milliseconds), so this many connections can start at the same
/// instant without waiting.
const IDLE_PULLS: usize = 8;

/// The relayed egress point (keystone_egress::relay), its pulls opened
/// through the same channel as SSH. Must run inside the runtime.
fn start_egress(
    files: &keystone_egress::relay::Files,
    sandbox: &str,
    upstream: Upstream,
) -> Result<tokio::task::JoinHandle<()>, String> {
    use keystone_egress::relay::{self, PULL_PORT};
    match upstream {
        Upstream::PortForward(pods, pod) => relay::spawn(
            files,
            sandbox,
            move || {
                let (pods, pod) = (pods.clone(), pod.clone());
                async move { pull_stream(&pods, &pod, PULL_PORT).await }
            },
            IDLE_PULLS,
        ),
        #[cfg(test)]
        Upstream::Greeting(_) => relay::spawn(
            files,
            sandbox,
            || async {
                Err::<tokio::io::DuplexStream, _>(std::io::Error::other("no pod in the unit tests"))
            },
            1,
        ),
    }
}

/// A port-forward stream to `port` in the pod that ends the forward when
/// dropped.
struct ForwardStream {
    pf: kube::api::Portforwarder,
    stream: tokio::io::DuplexStream,
}

impl Drop for ForwardStream {
    fn drop(&mut self) {
        self.pf.abort();
    }
}

impl tokio::io::AsyncRead for ForwardStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ForwardStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn pull_stream(pods: &Api<Pod>, pod: &str, port: u16) -> std::io::Result<ForwardStream> {
    let mut pf = pods
        .portforward(pod, &[port])
        .await
        .map_err(|e| std::io::Error::other(api_message(&e)))?;
    let stream = pf
        .take_stream(port)
        .ok_or_else(|| std::io::Error::other("the port-forward has no stream"))?;
    Ok(ForwardStream { pf, stream })
}

/// Serve the sandbox's Unix socket: each connection gets its own
/// port-forward to the pod's sshd.
async fn serve(listener: tokio::net::UnixListener, upstream: Upstream) {
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept on the sandbox's socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(forward(conn, upstream.clone()));
    }
}

async fn forward(mut conn: tokio::net::UnixStream, upstream: Upstream) {
    match upstream {
        Upstream::PortForward(pods, pod) => {
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
        }
        #[cfg(test)]
        Upstream::Greeting(bytes) => {
            use tokio::io::AsyncWriteExt;
            if let Err(e) = conn.write_all(bytes).await {
                tracing::debug!("greeting: {e}");
            }
        }
    }
}
