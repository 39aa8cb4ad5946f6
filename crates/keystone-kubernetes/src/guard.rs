//! The teardown guard: what one start has put into the cluster (and on the
//! host), removed again when the start fails, at whichever step, and by
//! `Drop` if it is ever left without being told (a panic, a forgotten
//! path). A failure to remove something is kept beside the error that
//! caused the teardown, as youki's `CreateContainerError` keeps it.

use super::cluster::delete_and_wait;
use super::Names;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_backend::BackendError;
use kube::{Api, Client};
use std::path::PathBuf;

/// One start's objects. Each is marked before its create call is sent: a
/// create that timed out may still have happened, and deleting what is
/// not there is no error.
pub(super) struct Created {
    handle: tokio::runtime::Handle,
    client: Client,
    ns: String,
    names: Names,
    /// Only a claim this start created: an existing workspace is the
    /// sandbox's disk and outlives a failed start.
    claim: bool,
    secret: bool,
    policy: bool,
    pod: bool,
    socket: Option<PathBuf>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// The relayed egress point and its control socket.
    egress: Option<(tokio::task::JoinHandle<()>, PathBuf)>,
}

impl Created {
    /// Nothing yet. `handle` must belong to a runtime that outlives the
    /// guard; the guard is used from outside it (it blocks on it).
    pub(super) fn new(
        handle: tokio::runtime::Handle,
        client: Client,
        ns: &str,
        names: &Names,
    ) -> Created {
        Created {
            handle,
            client,
            ns: ns.to_string(),
            names: names.clone(),
            claim: false,
            secret: false,
            policy: false,
            pod: false,
            socket: None,
            server: None,
            egress: None,
        }
    }

    pub(super) fn claim(&mut self) {
        self.claim = true;
    }
    pub(super) fn secret(&mut self) {
        self.secret = true;
    }
    pub(super) fn policy(&mut self) {
        self.policy = true;
    }
    pub(super) fn pod(&mut self) {
        self.pod = true;
    }
    /// The sandbox's socket, bound by this start.
    pub(super) fn socket(&mut self, path: PathBuf) {
        self.socket = Some(path);
    }
    /// The task serving the socket.
    pub(super) fn server(&mut self, task: tokio::task::JoinHandle<()>) {
        self.server = Some(task);
    }
    /// The relayed egress point's task and its control socket.
    pub(super) fn egress(&mut self, task: tokio::task::JoinHandle<()>, control: PathBuf) {
        self.egress = Some((task, control));
    }

    /// The start succeeded: a claim it created is now the sandbox's disk,
    /// kept by `stop` like any other.
    pub(super) fn keep_claim(&mut self) {
        self.claim = false;
    }

    /// Undo the start because of `cause`: `cause` itself, or `cause` with
    /// what could not be removed beside it.
    pub(super) fn fail(mut self, cause: BackendError) -> BackendError {
        let left = self.remove_all(0);
        self.disarm();
        with_cleanup(cause, &left)
    }

    /// Remove everything (a stop, or the pod's end): the failures, if any,
    /// as one error naming each.
    pub(super) fn remove(mut self, grace: u32) -> Result<(), BackendError> {
        let left = self.remove_all(grace);
        self.disarm();
        if left.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Failed(format!(
                "cleanup failed: {}",
                left.join("; ")
            )))
        }
    }

    /// Remove what is marked, in dependency order (the pod before the
    /// claim it holds), each attempted whatever the others did; unmarks
    /// what is gone.
    fn remove_all(&mut self, grace: u32) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if let Some((task, control)) = self.egress.take() {
            task.abort();
            remove_socket(&control, "the egress control socket", &mut left);
        }
        if let Some(socket) = self.socket.take() {
            remove_socket(&socket, "the socket", &mut left);
        }
        let (client, ns, names) = (&self.client, self.ns.as_str(), &self.names);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let handle = &self.handle;
        if self.pod {
            let r = handle.block_on(delete_and_wait(&pods, &names.pod, grace));
            settle(&mut self.pod, r, &mut left);
        }
        if self.secret {
            let r = handle.block_on(delete_and_wait(&secrets, &names.secret, 0));
            settle(&mut self.secret, r, &mut left);
        }
        if self.policy {
            let r = handle.block_on(delete_and_wait(&policies, &names.policy, 0));
            settle(&mut self.policy, r, &mut left);
        }
        if self.claim {
            let r = handle.block_on(delete_and_wait(&claims, &names.claim, 0));
            settle(&mut self.claim, r, &mut left);
        }
        left
    }

    /// What failed to go has been reported (in the error returned); the
    /// backstop must not try it again.
    fn disarm(&mut self) {
        (self.claim, self.secret, self.policy, self.pod) = (false, false, false, false);
    }

    fn is_empty(&self) -> bool {
        !(self.claim
            || self.secret
            || self.policy
            || self.pod
            || self.socket.is_some()
            || self.server.is_some()
            || self.egress.is_some())
    }
}

impl Drop for Created {
    /// The backstop: only a path that neither failed through [`Created::fail`]
    /// nor stopped through [`Created::remove`] gets here with anything left.
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        tracing::warn!(
            "sandbox {}: removing what an unfinished start left",
            self.names.sandbox
        );
        let left = self.remove_all(0);
        if !left.is_empty() {
            tracing::error!(
                "sandbox {}: cleanup failed: {}",
                self.names.sandbox,
                left.join("; ")
            );
        }
    }
}

/// Remove a socket file; one already gone is no failure.
fn remove_socket(path: &std::path::Path, what: &str, left: &mut Vec<String>) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => left.push(format!("could not remove {what} {}: {e}", path.display())),
    }
}

/// Unmark what is gone; keep what failed.
fn settle(marked: &mut bool, result: Result<(), BackendError>, left: &mut Vec<String>) {
    match result {
        Ok(()) => *marked = false,
        Err(e) => left.push(e.to_string()),
    }
}

/// `cause`, with what its teardown could not remove beside it (its exit
/// code stays the cause's: a requirement is still the user's to fix).
pub(super) fn with_cleanup(cause: BackendError, left: &[String]) -> BackendError {
    if left.is_empty() {
        return cause;
    }
    cause.with_cleanup(BackendError::Failed(left.join("; ")))
}
