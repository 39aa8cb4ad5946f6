//! `keystone`: a thin main. Parse, dispatch to one handler per
//! subcommand, map errors to the documented exit codes.

mod cli;
mod commands;
mod context;
mod credentials;
mod detached;
mod error;
mod guest_trust;
mod session;
mod ui;
mod webterm;

use clap::Parser;
use cli::{Agent, Cli, Top};
use error::Exit;

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Top::Connect { socket } => match keystone_channel::bridge::stdio_to_unix(&socket) {
            Ok(()) => Ok(0),
            Err(e) => {
                eprintln!("keystone: {e}");
                Ok(255)
            }
        },
        Top::Supervise { name } => commands::supervise::run(&name),
        Top::Autosync { name } => commands::autosync::run(&name),
        Top::ProxyDaemon { port, domain } => commands::proxy::daemon(port, domain),
        Top::Agent(cmd) => dispatch(cmd),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            ui::error(&e.message);
            for cause in e.causes() {
                ui::caused_by(&cause);
            }
            e.code as i32
        }
    };
    std::process::exit(code);
}

fn dispatch(cmd: Agent) -> error::Result<i32> {
    use commands::*;
    match cmd {
        Agent::Start(a) => start::run(a),
        Agent::Stop(a) => stop::run(a),
        Agent::Attach(a) => attach::run(a),
        Agent::Sync(a) => sync::run(a),
        Agent::Worktree(w) => worktree::run(w),
        Agent::Status(a) => status::status(a),
        Agent::List(a) => status::list(a),
        Agent::Destroy(a) => destroy::run(a),
        Agent::Exec(a) => exec::run(a),
        Agent::Ssh(a) => ssh::run(a),
        Agent::Config(a) => config::run(a),
        Agent::Trust(a) => trust::run(a),
        Agent::Image(i) => image::run(i),
        Agent::Doctor(a) => doctor::run(a),
        Agent::Proxy(cli::Proxy::Status(a)) => proxy::status(a),
        Agent::Tokens(a) => commands::tokens::run(a),
        Agent::Allow(a) => egress::allow(a),
        Agent::Deny(a) => egress::deny(a),
        Agent::Egress(cli::Egress::Log(a)) => egress::log(a),
    }
}

/// Logs (tracing) go to stderr and are off unless asked for, so they never
/// mix with what the user reads.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
    let _ = Exit::Success;
}
