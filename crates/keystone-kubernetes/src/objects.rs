//! Construction: the manifests of one sandbox's objects, built from its
//! settings without any I/O (so they are checked by unit tests), as
//! kube-rs builds its requests apart from sending them.

use super::Names;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_backend::{BackendError, Instance};
use keystone_registry::KubeSettings;
use std::fs;

/// The claim's requested size (what a provisioner sizes the volume by).
const WORKSPACE_SIZE: &str = "10Gi";
pub(super) const SSH_PORT: u16 = 22;
const SECRET_MOUNT: &str = "/run/keystone-secrets";
/// The relay program's key in the Secret (with the egress allowlist).
const RELAY_KEY: &str = "egress-relay.py";

/// The container's command: keys into place, the workspace owned by the
/// agent (a fresh volume is root's), the egress relay when the Secret
/// carries it (kept running: it is the pod's only way out), then sshd
/// under tini, which reaps orphans as PID 1.
const START: &str = r#"set -e
install -d -m 0755 /etc/keystone /run/sshd
install -m 0600 /run/keystone-secrets/ssh_host_ed25519_key /etc/keystone/ssh_host_ed25519_key
install -m 0644 /run/keystone-secrets/authorized_keys /etc/keystone/authorized_keys
[ "$(stat -c %u /workspace)" = 1000 ] || chown 1000:1000 /workspace
if [ -f /run/keystone-secrets/egress-relay.py ]; then
  (while :; do /usr/bin/python3 /run/keystone-secrets/egress-relay.py; sleep 1; done) </dev/null &
fi
exec /usr/bin/tini -g -- /usr/sbin/sshd -D -e
"#;

fn object<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<K, BackendError> {
    serde_json::from_value(v).map_err(|e| BackendError::Failed(format!("internal: {e}")))
}

pub(super) fn secret_object(inst: &Instance, names: &Names) -> Result<Secret, BackendError> {
    let read = |name: &str| -> Result<String, BackendError> {
        let p = inst.guest_dir.join(name);
        fs::read_to_string(&p).map_err(BackendError::io(p.display().to_string()))
    };
    let mut data = serde_json::json!({
        "ssh_host_ed25519_key": read("ssh_host_ed25519_key")?,
        "authorized_keys": read("authorized_keys")?,
    });
    if inst.settings.egress_allowlist() {
        data[RELAY_KEY] = serde_json::json!(keystone_egress::relay::SCRIPT);
    }
    object(serde_json::json!({
        "metadata": {"name": names.secret, "labels": names.labels(&inst.id)},
        "type": "Opaque",
        "stringData": data,
    }))
}

pub(super) fn claim_object(
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

pub(super) fn pod_object(
    inst: &Instance,
    names: &Names,
    k: &KubeSettings,
) -> Result<Pod, BackendError> {
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
    let mut pod = serde_json::json!({
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
    });
    if inst.settings.egress_allowlist() {
        let spec = &mut pod["spec"];
        spec["initContainers"] = serde_json::json!([fence_container(k)]);
        // The guest's resolver is keystone's (the fence redirects it to
        // the relay); the cluster's DNS is not reachable anyway.
        spec["dnsPolicy"] = serde_json::json!("None");
        spec["dnsConfig"] = serde_json::json!({
            "nameservers": [keystone_egress::GATEWAY.to_string()],
            "options": [{"name": "ndots", "value": "1"}],
        });
    }
    object(pod)
}

/// The init container that fences the pod's network namespace before the
/// sandbox's container starts (keystone_egress::relay's module docs). It
/// alone holds NET_ADMIN, runs only `nft`, and has exited before the
/// guest exists; a failure fails the pod with its output.
fn fence_container(k: &KubeSettings) -> serde_json::Value {
    serde_json::json!({
        "name": "egress-fence",
        "image": k.image,
        "imagePullPolicy": k.pull_policy,
        "command": ["/bin/sh", "-c", keystone_egress::relay::fence_script()],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        // requests = limits, as the sandbox's own: the pod stays in the
        // Guaranteed class.
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "runAsUser": 0,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
        },
    })
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
pub(super) fn policy_object(inst: &Instance, names: &Names) -> Result<NetworkPolicy, BackendError> {
    // With the allowlist the pod reaches nothing itself (its traffic
    // leaves through the relay, from this host): deny all, as a second
    // layer where the plugin enforces it.
    let network = if inst.settings.egress_allowlist() {
        "none"
    } else {
        inst.settings.network.as_str()
    };
    let egress = egress_rules(network);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
