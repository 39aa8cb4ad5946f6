//! The command line, in one place (clap derive types only; no logic).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// SPEC.md's exit codes. A command line that does not parse (an unknown
/// option, a missing argument: clap's message) exits 2 as well: the
/// contract has no code of its own for it, and 2 is what clap and most
/// tools use; the message always says which it was.
pub const EXIT_CODES: &str = "Exit codes: 0 ok; 1 not found; 2 invalid state, or a command line \
that does not parse; 3 operation failed; 4 requirements missing; 5 cancelled. \
`exec` passes the command's own status through.";

#[derive(Parser, Debug)]
#[command(
    name = "keystone",
    version,
    about = "Keystone: isolated sandboxes for AI coding agents",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Subcommand, Debug)]
pub enum Top {
    /// Run AI coding agents in sandboxes.
    #[command(subcommand)]
    Agent(Agent),
    /// Internal: bridge stdio to a sandbox's SSH socket (ssh ProxyCommand).
    #[command(name = "__connect", hide = true)]
    Connect { socket: PathBuf },
    /// Internal: the supervisor process of one sandbox.
    #[command(name = "__supervise", hide = true)]
    Supervise { name: String },
    /// Internal: automatic sync for one running sandbox (child of its supervisor).
    #[command(name = "__autosync", hide = true)]
    Autosync { name: String },
    /// Internal: the user's dev-server proxy (started by `start`).
    #[command(name = "__proxy", hide = true)]
    ProxyDaemon {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        domain: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    Nat,
    None,
    Bridge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EgressArg {
    Allowlist,
    Open,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SyncModeArg {
    Manual,
    AutoCommit,
    AutoIdle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Microvm,
    Container,
    Kubernetes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AgentArg {
    Claude,
    Gemini,
    Codex,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    Minimal,
    Full,
}

#[derive(Subcommand, Debug)]
pub enum Agent {
    /// Create or restart the sandbox of a git project and attach to it.
    Start(StartArgs),
    /// Stop a sandbox (gracefully unless --force).
    Stop(StopArgs),
    /// Attach to a sandbox's terminal session; returns on detach.
    Attach(AttachArgs),
    /// Bring the sandbox's commits to the host (and host commits in).
    Sync(SyncArgs),
    /// Manage worktrees (one branch and session each).
    #[command(subcommand)]
    Worktree(Worktree),
    /// Show one sandbox (or all with --all).
    Status(StatusArgs),
    /// List sandboxes.
    List(ListArgs),
    /// Remove a sandbox and its disk.
    Destroy(DestroyArgs),
    /// Run a command in a sandbox; its exit status passes through.
    Exec(ExecArgs),
    /// Open an interactive shell in a sandbox.
    Ssh(SshArgs),
    /// Print the effective configuration and where each value came from.
    Config(ConfigArgs),
    /// Trust the project file (.keystone/agent.toml) as it is now.
    Trust(TrustArgs),
    /// Build, list and remove guest images.
    #[command(subcommand)]
    Image(Image),
    /// Check this host for what the backends need.
    Doctor(DoctorArgs),
    /// The dev-server proxy.
    #[command(subcommand)]
    Proxy(Proxy),
    /// The credentials a sandbox of this project gets: where each comes
    /// from, the hosts it is injected for, how often it was used.
    Tokens(TokensArgs),
    /// Let a sandbox reach a host (a rule: `host`, `*.domain`, `host:port`,
    /// `CIDR[:port]`), at once if it is running, and on every later start.
    Allow(PolicyChangeArgs),
    /// Stop a sandbox reaching a host (deny wins over every allow rule).
    Deny(PolicyChangeArgs),
    /// The egress policy's decisions.
    #[command(subcommand)]
    Egress(Egress),
}

#[derive(Args, Debug)]
pub struct PolicyChangeArgs {
    /// `[SANDBOX] RULE`: the sandbox (default: the current project's) and the rule.
    #[arg(num_args = 1..=2, required = true, value_name = "[SANDBOX] RULE")]
    pub args: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Egress {
    /// Print the decisions of a sandbox's egress point (newest last).
    Log(EgressLogArgs),
}

#[derive(Args, Debug)]
pub struct EgressLogArgs {
    pub sandbox: Option<String>,
    /// Keep printing decisions as they are made.
    #[arg(short, long)]
    pub follow: bool,
    /// JSON lines, as logged.
    #[arg(long)]
    pub json: bool,
    /// How many of the latest decisions to print first.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub lines: usize,
    /// Only refusals.
    #[arg(long)]
    pub denied: bool,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The project (any path inside a git repository); default: current directory.
    pub project_path: Option<PathBuf>,
    /// Sandbox name (default: derived from the project directory).
    #[arg(long)]
    pub name: Option<String>,
    /// Memory in MB (at least 1024) [default: 8192].
    #[arg(long)]
    pub memory: Option<u32>,
    /// Virtual CPUs [default: 4].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// The container's writable disk in GB [default: 16].
    #[arg(long)]
    pub disk: Option<u32>,
    /// Do not pass hardware virtualization into the sandbox.
    #[arg(long)]
    pub no_nested: bool,
    /// Discard the sandbox's previous state (disk, workspace).
    #[arg(long)]
    pub fresh: bool,
    /// Network mode [default: nat].
    #[arg(long, value_enum)]
    pub network: Option<NetworkArg>,
    /// What the sandbox may reach on a nat network [default: allowlist].
    #[arg(long, value_enum)]
    pub egress: Option<EgressArg>,
    /// Also allow this (repeatable; see `keystone agent allow`).
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    /// How the sandbox's commits reach the host [default: manual].
    #[arg(long, value_enum)]
    pub sync_mode: Option<SyncModeArg>,
    /// Start without attaching to the session.
    #[arg(long)]
    pub no_attach: bool,
    /// Start this agent in the main session.
    #[arg(long, value_enum)]
    pub agent: Option<AgentArg>,
    /// Backend [default: microvm].
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    /// Refuse to start when the host tree has uncommitted changes.
    #[arg(long)]
    pub strict: bool,
    /// Mount the project directory itself at /workspace (microvm).
    #[arg(long)]
    pub share: bool,
    /// Guest image profile [default: full].
    #[arg(long, value_enum)]
    pub profile: Option<ProfileArg>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    pub sandbox: Option<String>,
    /// Kill immediately instead of shutting down gracefully.
    #[arg(long)]
    pub force: bool,
    /// Sync the sandbox's commits to the host before stopping.
    #[arg(long)]
    pub sync: bool,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    pub sandbox: Option<String>,
    /// The worktree whose session to attach to.
    #[arg(long, default_value = "main")]
    pub worktree: String,
    /// Serve the session as a web terminal on 127.0.0.1.
    #[arg(long)]
    pub web: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    pub sandbox: Option<String>,
    /// Also copy the configured build outputs to the host (rsync).
    #[arg(long)]
    pub artifacts: bool,
    /// Show what would move; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The branch to sync (default: the sandbox's current branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Worktree {
    /// Add a worktree at /workspace/.worktrees/<branch>.
    Add {
        branch: String,
        /// Create the branch.
        #[arg(long)]
        create: bool,
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// List worktrees: branch, path, session, current.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Remove a worktree.
    Remove {
        branch: String,
        /// Drop uncommitted or unsynced work.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        sandbox: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub sandbox: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Every sandbox.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    /// Only sandboxes in this state.
    #[arg(long)]
    pub state: Option<String>,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    pub sandbox: String,
    /// No confirmation, and drop unsynced commits.
    #[arg(long)]
    pub force: bool,
    /// Keep the sandbox's disk.
    #[arg(long)]
    pub keep_disk: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub sandbox: Option<String>,
    /// The worktree to run in.
    #[arg(long, default_value = "main")]
    pub worktree: String,
    /// The guest user.
    #[arg(long, default_value = "agent")]
    pub user: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SshArgs {
    pub sandbox: Option<String>,
    /// Instead of a shell, serve the sandbox's SSH on 127.0.0.1:PORT for other clients.
    #[arg(long)]
    pub port: Option<u16>,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Project whose project file to read (default: current directory).
    pub project_path: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrustArgs {
    /// The project (any path inside a git repository); default: current directory.
    pub project_path: Option<PathBuf>,
    /// Forget the trust instead: the file is ignored from now on.
    #[arg(long)]
    pub revoke: bool,
    /// Show the file and whether it is trusted; change nothing.
    #[arg(long, conflicts_with = "revoke")]
    pub show: bool,
}

#[derive(Subcommand, Debug)]
pub enum Image {
    /// Build the guest image (cached by a hash of its recipe).
    Build {
        #[arg(long, value_enum)]
        profile: Option<ProfileArg>,
        /// Rebuild even if a cached image matches, with the agents' latest
        /// npm versions (recorded, so later starts use them offline).
        #[arg(long)]
        update: bool,
        /// Also export the image: `oci` writes an OCI image archive (for
        /// the Kubernetes backend; import it with `ctr images import` or
        /// push it with `image push`).
        #[arg(long, value_enum)]
        format: Option<ImageFormatArg>,
        /// The reference the OCI archive names the image by
        /// [default: localhost/keystone-guest:<image id>].
        #[arg(long, requires = "format")]
        reference: Option<String>,
    },
    /// Push the guest image to a registry (OCI, with skopeo), e.g.
    /// `image push registry.example.com/team/keystone-guest:v1`.
    Push {
        /// Destination reference (registry/repository:tag).
        reference: String,
        #[arg(long, value_enum)]
        profile: Option<ProfileArg>,
        /// Plain HTTP or an unverified certificate (a local test registry).
        #[arg(long)]
        insecure: bool,
    },
    /// List built images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image.
    Rm { id: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormatArg {
    /// An OCI image archive (a tar of an OCI image layout).
    Oci,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Proxy {
    /// Show the proxy, its routes and whether each dev server answers.
    Status(ProxyStatusArgs),
}

#[derive(Args, Debug)]
pub struct ProxyStatusArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokensArgs {
    /// The project whose env files count (default: current directory).
    pub project_path: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Read the values again and hand them to the running sandbox's
    /// egress point (a rotated key takes effect without a restart).
    #[arg(long)]
    pub refresh: bool,
}
