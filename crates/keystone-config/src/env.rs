//! Every environment variable the configuration reads, in one table.
//!
//! Variables that start with [`PREFIX`] but are not listed here are ignored
//! rather than rejected: other tools may share the prefix.

use std::ffi::OsString;
use std::path::PathBuf;

/// The prefix all of this crate's variables share.
pub const PREFIX: &str = "KEYSTONE_AGENT_";

/// Overrides the user configuration file's path (see [`crate::user_config_path`]).
pub const CONFIG: &str = "KEYSTONE_AGENT_CONFIG";

/// Configuration key ↔ environment variable. List-valued keys take
/// comma-separated values; booleans take `true`/`false`/`1`/`0`.
pub const VARS: &[(&str, &str)] = &[
    ("defaults.memory", "KEYSTONE_AGENT_MEMORY"),
    ("defaults.disk", "KEYSTONE_AGENT_DISK"),
    ("defaults.vcpus", "KEYSTONE_AGENT_VCPUS"),
    ("defaults.nested_virt", "KEYSTONE_AGENT_NESTED_VIRT"),
    ("defaults.network", "KEYSTONE_AGENT_NETWORK"),
    ("defaults.sync_mode", "KEYSTONE_AGENT_SYNC_MODE"),
    (
        "defaults.sync_idle_seconds",
        "KEYSTONE_AGENT_SYNC_IDLE_SECONDS",
    ),
    ("defaults.env_files", "KEYSTONE_AGENT_ENV_FILES"),
    ("defaults.persist", "KEYSTONE_AGENT_PERSIST"),
    ("defaults.artifacts", "KEYSTONE_AGENT_ARTIFACTS"),
    ("defaults.strict", "KEYSTONE_AGENT_STRICT"),
    ("backend.type", "KEYSTONE_AGENT_BACKEND"),
    ("backend.microvm.hypervisor", "KEYSTONE_AGENT_HYPERVISOR"),
    ("backend.microvm.share_proto", "KEYSTONE_AGENT_SHARE_PROTO"),
    ("backend.microvm.workspace", "KEYSTONE_AGENT_WORKSPACE_MODE"),
    ("backend.microvm.bridge", "KEYSTONE_AGENT_BRIDGE"),
    ("backend.microvm.kernel", "KEYSTONE_AGENT_KERNEL"),
    ("backend.microvm.initrd", "KEYSTONE_AGENT_INITRD"),
    ("backend.kubernetes.context", "KEYSTONE_AGENT_KUBE_CONTEXT"),
    (
        "backend.kubernetes.namespace",
        "KEYSTONE_AGENT_KUBE_NAMESPACE",
    ),
    (
        "backend.kubernetes.storage_class",
        "KEYSTONE_AGENT_KUBE_STORAGE_CLASS",
    ),
    ("backend.kubernetes.image", "KEYSTONE_AGENT_KUBE_IMAGE"),
    (
        "backend.kubernetes.pull_policy",
        "KEYSTONE_AGENT_KUBE_PULL_POLICY",
    ),
    ("proxy.enable", "KEYSTONE_AGENT_PROXY_ENABLE"),
    ("proxy.domain", "KEYSTONE_AGENT_PROXY_DOMAIN"),
    ("proxy.port", "KEYSTONE_AGENT_PROXY_PORT"),
    ("guest.profile", "KEYSTONE_AGENT_PROFILE"),
    ("guest.suite", "KEYSTONE_AGENT_SUITE"),
    ("guest.mirror", "KEYSTONE_AGENT_MIRROR"),
    ("guest.packages", "KEYSTONE_AGENT_PACKAGES"),
    ("guest.forward_env", "KEYSTONE_AGENT_FORWARD_ENV"),
    ("guest.trust_host_cas", "KEYSTONE_AGENT_TRUST_HOST_CAS"),
    ("guest.agents.claude.enable", "KEYSTONE_AGENT_CLAUDE_ENABLE"),
    (
        "guest.agents.claude.auto_accept",
        "KEYSTONE_AGENT_CLAUDE_AUTO_ACCEPT",
    ),
    ("guest.agents.gemini.enable", "KEYSTONE_AGENT_GEMINI_ENABLE"),
    (
        "guest.agents.gemini.auto_accept",
        "KEYSTONE_AGENT_GEMINI_AUTO_ACCEPT",
    ),
    ("guest.agents.codex.enable", "KEYSTONE_AGENT_CODEX_ENABLE"),
    (
        "guest.agents.codex.auto_accept",
        "KEYSTONE_AGENT_CODEX_AUTO_ACCEPT",
    ),
    ("session.multiplexer", "KEYSTONE_AGENT_MULTIPLEXER"),
    ("egress.mode", "KEYSTONE_AGENT_EGRESS"),
    ("egress.presets", "KEYSTONE_AGENT_EGRESS_PRESETS"),
    ("egress.allow", "KEYSTONE_AGENT_EGRESS_ALLOW"),
    ("egress.deny", "KEYSTONE_AGENT_EGRESS_DENY"),
    (
        "egress.host_services",
        "KEYSTONE_AGENT_EGRESS_HOST_SERVICES",
    ),
    ("egress.resolver", "KEYSTONE_AGENT_EGRESS_RESOLVER"),
    ("credentials.hosts", "KEYSTONE_AGENT_CREDENTIAL_HOSTS"),
    ("credentials.headers", "KEYSTONE_AGENT_CREDENTIAL_HEADERS"),
];

/// Keys no variable sets, and why.
pub const WITHOUT_VAR: &[(&str, &str)] = &[(
    "credentials.commands",
    "a list variable is comma-separated, and a shell command may contain commas",
)];

/// The variable that sets `key`, if any.
pub fn var_for(key: &str) -> Option<&'static str> {
    VARS.iter().find(|(k, _)| *k == key).map(|(_, var)| *var)
}

/// The configuration key a variable sets, if it is one of ours.
pub fn key_for(var: &str) -> Option<&'static str> {
    VARS.iter().find(|(_, v)| *v == var).map(|(key, _)| *key)
}

/// The process environment restricted to this crate's variables, for
/// [`crate::Inputs::env`]. Non-UTF-8 values cannot be ours and are skipped,
/// where `std::env::vars()` would panic on them.
pub fn from_process() -> std::collections::BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect()
}

/// [`crate::user_config_path`] with the environment passed in, so it can be
/// tested without touching the process environment.
pub(crate) fn user_config_path_with(get: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| get(name).filter(|v| !v.is_empty());
    if let Some(path) = set(CONFIG) {
        return Some(PathBuf::from(path));
    }
    // The XDG base-directory spec says a relative XDG_CONFIG_HOME is invalid
    // and must be ignored.
    if let Some(dir) = set("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return Some(dir.join("keystone").join("agent.toml"));
    }
    set("HOME").map(|home| {
        PathBuf::from(home)
            .join(".config")
            .join("keystone")
            .join("agent.toml")
    })
}
