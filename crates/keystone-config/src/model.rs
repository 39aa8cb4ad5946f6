//! The configuration value itself: plain data with the SPEC's defaults.
//!
//! Nothing here validates; `load` does that while it reads each layer, so an
//! error can name the file line, variable or flag that carried the bad value.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A string that names no variant of a configuration enum.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} \"{value}\"; expected one of: {}", expected.join(", "))]
pub struct ParseEnumError {
    /// What was being parsed, e.g. "network mode".
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// Every accepted spelling.
    pub expected: &'static [&'static str],
}

/// Declares a configuration enum whose TOML, serde, `Display` and `FromStr`
/// spellings are one and the same list, so they cannot drift apart.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every accepted spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];
            /// What this enum is called in messages.
            pub const WHAT: &'static str = $what;

            /// The spelling used in TOML, environment variables and flags.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseEnumError {
                        what: $what,
                        value: s.to_string(),
                        expected: Self::NAMES,
                    }),
                }
            }
        }
    };
}

config_enum! {
    /// Guest networking.
    NetworkMode, "network mode" {
        /// Outbound access through the host's NAT.
        Nat = "nat",
        /// No network at all.
        None = "none",
        /// Attached to a host bridge (`backend.microvm.bridge`).
        Bridge = "bridge",
    }
}

config_enum! {
    /// What the guest may reach with `network = "nat"` (`[egress]`).
    EgressMode, "egress mode" {
        /// Only the hosts the policy allows, through keystone's egress
        /// point; no route to anything else, on any protocol.
        Allowlist = "allowlist",
        /// Everything the host reaches (the host's loopback excepted).
        Open = "open",
        /// No network at all: the same as `network = "none"`.
        None = "none",
    }
}

config_enum! {
    /// When sandbox commits come back to the host.
    SyncMode, "sync mode" {
        /// Only on `keystone agent sync`.
        Manual = "manual",
        /// After every commit in the sandbox.
        AutoCommit = "auto-commit",
        /// After `sync_idle_seconds` without file activity.
        AutoIdle = "auto-idle",
    }
}

config_enum! {
    /// Which backend runs the sandbox.
    BackendKind, "backend" {
        Microvm = "microvm",
        Container = "container",
        Kubernetes = "kubernetes",
    }
}

config_enum! {
    /// The virtual machine monitor of the microvm backend.
    Hypervisor, "hypervisor" {
        Qemu = "qemu",
        Firecracker = "firecracker",
        CloudHypervisor = "cloud-hypervisor",
    }
}

config_enum! {
    /// The file-sharing protocol of the opt-in live share.
    ShareProto, "share protocol" {
        Virtiofs = "virtiofs",
        P9 = "9p",
    }
}

config_enum! {
    /// How the project reaches the microvm's `/workspace`.
    WorkspaceMode, "workspace mode" {
        /// A git clone inside the guest, synced by host-initiated git.
        Clone = "clone",
        /// The host tree shared live (`share_proto`).
        Share = "share",
    }
}

config_enum! {
    /// Kubernetes image pull policy.
    PullPolicy, "pull policy" {
        Always = "always",
        IfNotPresent = "if-not-present",
        Never = "never",
    }
}

config_enum! {
    /// How much userland the guest image carries.
    Profile, "guest profile" {
        Minimal = "minimal",
        Full = "full",
    }
}

config_enum! {
    /// The terminal multiplexer that holds the sessions.
    Multiplexer, "multiplexer" {
        Tmux = "tmux",
        Zellij = "zellij",
    }
}

config_enum! {
    /// Whether the guest trusts the host's extra CA certificates
    /// (`guest.trust_host_cas`): the ones the host's bundle holds that the
    /// guest's stock Debian bundle lacks, such as a TLS-inspecting corporate
    /// proxy's. They are public certificates, so a trusted project file may
    /// set this key: it can only mirror trust the user's host already has
    /// (or drop it), never name a certificate of its own.
    TrustHostCas, "trust_host_cas mode" {
        /// Add them when there are any, and say so at start.
        Auto = "auto",
        /// Add them (the same set as `auto`).
        Always = "always",
        /// Add none: the guest trusts the Debian bundle (and keystone's CA).
        Never = "never",
    }
}

config_enum! {
    /// The agents the guest can carry (`[guest.agents.<name>]`, `--agent`).
    AgentKind, "agent" {
        Claude = "claude",
        Gemini = "gemini",
        Codex = "codex",
    }
}

/// The effective configuration; its layout is the TOML file's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub defaults: Defaults,
    pub backend: BackendConfig,
    pub proxy: ProxyConfig,
    pub guest: GuestConfig,
    pub session: SessionConfig,
    pub egress: EgressConfig,
    pub credentials: Credentials,
}

/// `[defaults]`: what `keystone agent start` uses unless told otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// Guest memory in MB (>= 1024).
    pub memory: u32,
    /// Guest vCPUs (1..=256).
    pub vcpus: u32,
    /// The container's writable disk in GB (the microVM's is its image's).
    pub disk: u32,
    /// Pass nested virtualization through when the host allows it.
    pub nested_virt: bool,
    pub network: NetworkMode,
    pub sync_mode: SyncMode,
    /// Quiet period before an `auto-idle` sync (>= 1).
    pub sync_idle_seconds: u64,
    /// Globs, relative to the project root, copied host -> sandbox.
    pub env_files: Vec<String>,
    /// Keep the sandbox disk across stops.
    pub persist: bool,
    /// Paths inside the workspace copied back by `sync --artifacts`.
    pub artifacts: Vec<String>,
    /// Refuse to start when the host tree is dirty.
    pub strict: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            memory: 8192,
            vcpus: 4,
            disk: 16,
            nested_virt: true,
            network: NetworkMode::Nat,
            sync_mode: SyncMode::Manual,
            sync_idle_seconds: 30,
            env_files: vec![".env*".to_string()],
            persist: true,
            artifacts: Vec::new(),
            strict: false,
        }
    }
}

/// `[backend]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// `backend.type`.
    #[serde(rename = "type")]
    pub kind: BackendKind,
    pub microvm: MicrovmConfig,
    pub kubernetes: KubernetesConfig,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Microvm,
            microvm: MicrovmConfig::default(),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

/// `[backend.microvm]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MicrovmConfig {
    pub hypervisor: Hypervisor,
    pub share_proto: ShareProto,
    pub workspace: WorkspaceMode,
    /// Host bridge for `network = "bridge"`; empty means none configured.
    pub bridge: String,
    /// Absolute path of a user-supplied kernel; empty means the image's.
    pub kernel: String,
    /// Absolute path of a user-supplied initrd; empty means the image's.
    pub initrd: String,
}

impl Default for MicrovmConfig {
    fn default() -> Self {
        MicrovmConfig {
            hypervisor: Hypervisor::Qemu,
            share_proto: ShareProto::Virtiofs,
            workspace: WorkspaceMode::Clone,
            bridge: String::new(),
            kernel: String::new(),
            initrd: String::new(),
        }
    }
}

/// `[backend.kubernetes]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// kubeconfig context; empty means the current one.
    pub context: String,
    pub namespace: String,
    /// Empty means the cluster's default storage class.
    pub storage_class: String,
    /// Guest image reference; empty means the published default.
    pub image: String,
    pub pull_policy: PullPolicy,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            context: String::new(),
            namespace: "agent-sandboxes".to_string(),
            storage_class: "standard".to_string(),
            image: String::new(),
            pull_policy: PullPolicy::IfNotPresent,
        }
    }
}

/// `[proxy]`: the host-side dev-server proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub enable: bool,
    /// Sandboxes answer at `<sandbox>.<domain>`.
    pub domain: String,
    pub port: u16,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enable: true,
            domain: "sandbox.localhost".to_string(),
            port: 8080,
        }
    }
}

/// `[guest]`: what the guest image contains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    pub profile: Profile,
    /// Debian suite the image is built from.
    pub suite: String,
    /// Debian mirror URL (http:// or https://).
    pub mirror: String,
    /// Extra Debian packages.
    pub packages: Vec<String>,
    /// Host environment variables passed to the agents.
    pub forward_env: Vec<String>,
    /// Whether the host's extra CA certificates reach the guest's trust
    /// stores.
    pub trust_host_cas: TrustHostCas,
    pub agents: AgentsConfig,
}

/// Variables forwarded to the agents unless the configuration says otherwise.
pub const DEFAULT_FORWARD_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
];

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            profile: Profile::Full,
            suite: "trixie".to_string(),
            mirror: "http://deb.debian.org/debian".to_string(),
            packages: Vec::new(),
            forward_env: DEFAULT_FORWARD_ENV.iter().map(|s| s.to_string()).collect(),
            trust_host_cas: TrustHostCas::Auto,
            agents: AgentsConfig::default(),
        }
    }
}

/// `[guest.agents]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    pub claude: AgentConfig,
    pub gemini: AgentConfig,
    pub codex: AgentConfig,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            claude: AgentConfig {
                enable: true,
                auto_accept: true,
            },
            gemini: AgentConfig::default(),
            codex: AgentConfig::default(),
        }
    }
}

impl AgentsConfig {
    /// The settings of one agent.
    pub fn get(&self, kind: AgentKind) -> &AgentConfig {
        match kind {
            AgentKind::Claude => &self.claude,
            AgentKind::Gemini => &self.gemini,
            AgentKind::Codex => &self.codex,
        }
    }

    /// The enabled agents, in `AgentKind::ALL` order.
    pub fn enabled(&self) -> Vec<AgentKind> {
        AgentKind::ALL
            .iter()
            .copied()
            .filter(|kind| self.get(*kind).enable)
            .collect()
    }
}

/// `[guest.agents.<name>]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Install and configure this agent in the guest.
    pub enable: bool,
    /// Run it without permission prompts.
    pub auto_accept: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            enable: false,
            auto_accept: true,
        }
    }
}

/// `[egress]`: what the guest may reach (see `keystone-egress`).
///
/// The default is the allowlist with the presets every enabled agent,
/// `apt`, `npm`, `pip`, `cargo` and git hosting need: a prompt-injected
/// agent can then send what it read only to those hosts' own services
/// (out of scope: see docs/SECURITY.md), never to a host of its choosing,
/// and nothing a user does every day breaks. Every key is host-only: a
/// project file, which the sandbox can rewrite, may never widen it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    pub mode: EgressMode,
    /// Named rule sets; `agents` stands for the enabled agents' own.
    pub presets: Vec<String>,
    /// Rules: `host`, `*.domain`, `host:port`, `host:*`, `CIDR[:port]`.
    pub allow: Vec<String>,
    /// Same syntax; a deny rule wins over every allow rule.
    pub deny: Vec<String>,
    /// Host loopback ports (`127.0.0.1:11434`) the guest may reach as
    /// `host.keystone.internal:PORT`; nothing else of the host's.
    pub host_services: Vec<String>,
    /// The DNS server keystone resolves allowed names with on the host;
    /// empty means the host's own resolver.
    pub resolver: String,
}

/// The presets of the default policy.
pub const DEFAULT_EGRESS_PRESETS: &[&str] = &["agents", "registries", "git"];

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            mode: EgressMode::Allowlist,
            presets: DEFAULT_EGRESS_PRESETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow: Vec::new(),
            deny: Vec::new(),
            host_services: Vec::new(),
            resolver: String::new(),
        }
    }
}

/// `[credentials]`: how the host-side egress proxy treats the forwarded
/// credentials, which never enter the sandbox (the guest gets
/// placeholders; the proxy puts the real value into requests to the
/// credential's hosts). Every item is `VAR=VALUE`, `VAR` an environment
/// variable name (split it with [`crate::split_assignment`]). Every key is
/// host-only: they choose where credentials are sent and run host
/// commands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Credentials {
    /// `VAR=HOST`, HOST a DNS name or `*.domain`, with an optional `:PORT`:
    /// the hosts VAR's value may be sent to. Listing any host for VAR
    /// replaces VAR's built-in default hosts; several items for one VAR
    /// add up.
    pub hosts: Vec<String>,
    /// `VAR=Header-Name`: VAR's value is injected into that header only;
    /// several items for one VAR allow each of their headers.
    pub headers: Vec<String>,
    /// `VAR=shell command`, run on the host at start (by `sh -c`); its
    /// standard output, trimmed, is VAR's value (`GH_TOKEN=gh auth token`).
    /// At most one item per VAR.
    pub commands: Vec<String>,
}

/// `[session]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub multiplexer: Multiplexer,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            multiplexer: Multiplexer::Tmux,
        }
    }
}
