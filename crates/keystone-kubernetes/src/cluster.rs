//! The API calls: a client for the configured context, and create, replace
//! and delete-and-wait, each bounded in time. Everything here takes a
//! [`Client`], so the unit tests drive it against a scripted API server.

use super::{runtime, Names, API_TIMEOUT, GONE_TIMEOUT};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_backend::BackendError;
use keystone_registry::KubeSettings;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use std::future::Future;
use std::time::{Duration, Instant};

/// Bound an API call; a timeout reads as the cluster being unreachable.
pub(super) async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(cluster_error(what.to_string(), source)),
        Err(_) => Err(BackendError::Failed(format!(
            "{what}: no answer from the API server within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// A failed call as the backend error that keeps the client's error.
pub(super) fn cluster_error(context: String, source: kube::Error) -> BackendError {
    BackendError::Cluster {
        context,
        detail: api_message(&source),
        source: Box::new(source),
    }
}

/// What a kube error says: the API server's message and reason, or the
/// client's own error.
pub(crate) fn api_message(e: &kube::Error) -> String {
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
pub(super) async fn connect(k: &KubeSettings) -> Result<Client, BackendError> {
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

pub(super) async fn ensure_namespace(client: &Client, ns: &str) -> Result<(), BackendError> {
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
        Ok(Err(source)) => Err(cluster_error(
            format!("cannot create namespace {ns}"),
            source,
        )),
        Err(_) => Err(BackendError::Failed(format!(
            "creating namespace {ns}: no answer within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether the sandbox's workspace claim exists.
pub(super) async fn claim_exists(
    client: &Client,
    ns: &str,
    names: &Names,
) -> Result<bool, BackendError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    Ok(
        bounded("read the workspace claim", claims.get_opt(&names.claim))
            .await?
            .is_some(),
    )
}

/// Create `obj`.
pub(super) async fn create<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), BackendError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    bounded(
        &format!("cannot create {name}"),
        api.create(&PostParams::default(), obj),
    )
    .await
    .map(drop)
}

/// Create `obj`, replacing one of the same name.
pub(super) async fn put<K>(api: &Api<K>, name: &str, obj: &K) -> Result<(), BackendError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    match tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), obj)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if is_conflict(&e) => {
            delete_and_wait(api, name, 0).await?;
            create(api, name, obj).await
        }
        Ok(Err(source)) => Err(cluster_error(format!("cannot create {name}"), source)),
        Err(_) => Err(BackendError::Failed(format!(
            "creating {name}: no answer within {}s",
            API_TIMEOUT.as_secs()
        ))),
    }
}

/// Delete an object and wait until the API no longer has it; one that is
/// already gone is no error. The message names the object's kind and name.
pub(super) async fn delete_and_wait<K>(
    api: &Api<K>,
    name: &str,
    grace: u32,
) -> Result<(), BackendError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).to_lowercase();
    let dp = DeleteParams {
        grace_period_seconds: Some(grace),
        ..DeleteParams::background()
    };
    match tokio::time::timeout(API_TIMEOUT, api.delete(name, &dp)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if is_not_found(&e) => return Ok(()),
        Ok(Err(e)) => {
            return Err(BackendError::Failed(format!(
                "could not delete {kind} {name}: {}",
                api_message(&e)
            )))
        }
        Err(_) => {
            return Err(BackendError::Failed(format!(
                "could not delete {kind} {name}: no answer within {}s",
                API_TIMEOUT.as_secs()
            )))
        }
    }
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        if bounded(&format!("read {kind} {name}"), api.get_opt(name))
            .await?
            .is_none()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BackendError::Failed(format!(
                "{kind} {name} was deleted but still exists after {}s (a finalizer, or a node that does not answer?)",
                GONE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Delete the pod, its Secret and NetworkPolicy (never the claim), all
/// three attempted whatever fails; the failures, one per object.
pub(super) async fn remove_pod_objects(
    client: &Client,
    ns: &str,
    names: &Names,
    grace: u32,
) -> Vec<BackendError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    [
        delete_and_wait(&pods, &names.pod, grace).await,
        delete_and_wait(&secrets, &names.secret, 0).await,
        delete_and_wait(&policies, &names.policy, 0).await,
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect()
}

/// Delete the workspace claim (`--fresh`, `destroy`).
pub(super) async fn remove_claim(
    client: &Client,
    ns: &str,
    names: &Names,
) -> Result<(), BackendError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    delete_and_wait(&claims, &names.claim, 0).await
}
