//! Readiness: what a pod's status means for a sandbox that is starting
//! (or running), and whether sshd answers on the sandbox's socket.

use k8s_openapi::api::core::v1::{Pod, PodStatus};

/// What a pod's status says, as far as starting a sandbox goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PodVerdict {
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

pub(super) fn verdict(pod: &Pod) -> PodVerdict {
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
    // An init container (the egress fence) that failed: the pod never
    // runs (restartPolicy Never); its message is the reason.
    for c in status.init_container_statuses.iter().flatten() {
        let Some(state) = &c.state else { continue };
        if let Some(t) = state.terminated.as_ref().filter(|t| t.exit_code != 0) {
            let mut why = explain(t.reason.as_ref(), t.message.as_ref());
            why.push_str(&format!(" (exit code {})", t.exit_code));
            return PodVerdict::Failed(format!("init container {} failed: {why}", c.name));
        }
        if let Some(w) = &state.waiting {
            if FATAL_WAITING.contains(&w.reason.as_deref().unwrap_or_default()) {
                return PodVerdict::Failed(format!(
                    "init container {}: {}",
                    c.name,
                    explain(w.reason.as_ref(), w.message.as_ref())
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    fn status(v: serde_json::Value) -> PodStatus {
        serde_json::from_value(v).expect("status")
    }

    #[test]
    fn a_failed_init_container_fails_with_its_message() {
        let s = status(serde_json::json!({
            "phase": "Failed",
            "initContainerStatuses": [{"name": "egress-fence", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "Error: Could not process rule: Operation not permitted"}}}],
            "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Failed(
                "init container egress-fence failed: Error: Error: Could not process rule: Operation not permitted (exit code 1)".into()
            )
        );
        // One that finished well is no verdict of its own.
        let s = status(serde_json::json!({
            "phase": "Pending",
            "initContainerStatuses": [{"name": "egress-fence", "image": "x", "imageID": "", "ready": true,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
            "containerStatuses": [{"name": "sandbox", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]
        }));
        assert_eq!(
            verdict_of(&s),
            PodVerdict::Waiting(Some("ContainerCreating".into()))
        );
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
