//! The terminal multiplexer that holds a sandbox's sessions (tmux by
//! default, Zellij when `session.multiplexer = "zellij"`): the guest shell
//! snippets every command uses to create, attach to, list and end the
//! session of a worktree, so attach, `attach --web`, `worktree` and `start`
//! behave the same on both.
//!
//! The choice is recorded in the sandbox's settings when it starts (the
//! image carries Zellij only when it was chosen), so a later change of the
//! configuration never points a running sandbox at a program it lacks.

pub use keystone_registry::Multiplexer;
use keystone_registry::Sandbox;

/// The sandbox's multiplexer, as recorded when it started.
pub fn of(sb: &Sandbox) -> Multiplexer {
    sb.settings.multiplexer
}

fn q(s: &str) -> String {
    shell_words::quote(s).into_owned()
}

/// The guest shell snippets of a multiplexer (the configuration's enum,
/// recorded in the sandbox's settings).
pub trait Scripts: Copy {
    /// The program's name, as the configuration spells it.
    fn name(self) -> &'static str;
    fn detach_keys(self) -> &'static str;
    fn attach_script(self, session: &str, dir: &str) -> String;
    fn list_script(self) -> &'static str;
    fn kill_script(self, session: &str) -> String;
    fn run_in_script(self, session: &str, dir: &str, command: &str) -> String;
}

impl Scripts for Multiplexer {
    fn name(self) -> &'static str {
        self.as_str()
    }

    /// The keys that detach a client, for messages.
    fn detach_keys(self) -> &'static str {
        match self {
            Multiplexer::Tmux => "Ctrl-b d",
            Multiplexer::Zellij => "Ctrl-o d",
        }
    }

    /// Replaces the guest shell with a client attached to `session`,
    /// creating the session in `dir` first when it does not exist. Several
    /// clients (terminals, browsers) attach to the same session.
    fn attach_script(self, session: &str, dir: &str) -> String {
        match self {
            // -u: the client speaks UTF-8 whatever the guest's locale says.
            Multiplexer::Tmux => format!(
                "exec tmux -u new-session -A -s {} -c {}",
                q(session),
                q(dir)
            ),
            // Zellij starts a new session's panes in its own working
            // directory.
            Multiplexer::Zellij => format!(
                "cd {} && exec zellij attach --create {}",
                q(dir),
                q(session)
            ),
        }
    }

    /// Prints one line `<session> <attached clients>` per running session.
    fn list_script(self) -> &'static str {
        match self {
            Multiplexer::Tmux => {
                "tmux list-sessions -F '#{session_name} #{session_attached}' 2>/dev/null || true"
            }
            // Exited (resurrectable) sessions are not running ones.
            Multiplexer::Zellij => {
                "zellij list-sessions --no-formatting --short 2>/dev/null | while read -r s; do \
                 zellij list-sessions --no-formatting 2>/dev/null | grep -q \"^$s .*EXITED\" && continue; \
                 n=$(zellij --session \"$s\" action list-clients 2>/dev/null | tail -n +2 | wc -l); echo \"$s $n\"; done; true"
            }
        }
    }

    /// Ends `session` if it runs; never fails.
    fn kill_script(self, session: &str) -> String {
        match self {
            Multiplexer::Tmux => format!("tmux kill-session -t {} 2>/dev/null || true", q(session)),
            Multiplexer::Zellij => format!(
                "zellij kill-session {s} >/dev/null 2>&1; zellij delete-session --force {s} >/dev/null 2>&1; true",
                s = q(session)
            ),
        }
    }

    /// Runs `command` in `session` (a new window/pane when it exists, else
    /// a new detached session in `dir`).
    fn run_in_script(self, session: &str, dir: &str, command: &str) -> String {
        match self {
            Multiplexer::Tmux => format!(
                "s={s}; c={c}; if tmux has-session -t \"=$s\" 2>/dev/null; then tmux new-window -t \"=$s:\" -c {d} \"$c\"; \
else tmux new-session -d -s \"$s\" -x 160 -y 48 -c {d} \"$c\"; fi",
                s = q(session),
                c = q(command),
                d = q(dir),
            ),
            Multiplexer::Zellij => format!(
                "cd {d} && zellij attach --create-background {s} && zellij --session {s} run --cwd {d} -- bash -c {c}",
                s = q(session),
                c = q(command),
                d = q(dir),
            ),
        }
    }
}

/// Where worktrees live in the guest (`main` is `/workspace` itself).
pub const WORKTREES: &str = "/workspace/.worktrees";

/// The guest directory of a worktree.
pub fn dir(worktree: &str) -> String {
    if worktree == "main" {
        "/workspace".into()
    } else {
        format!("{WORKTREES}/{worktree}")
    }
}

/// The ssh command that attaches a client to the worktree's session (and
/// creates the session first if need be), on a terminal allocated in the
/// guest. The terminal attach and every web terminal client run this same
/// command, so they all share one session.
pub fn command(
    channel: &keystone_channel::Channel,
    sb: &Sandbox,
    worktree: &str,
) -> Result<std::process::Command, keystone_channel::ChannelError> {
    let script = of(sb).attach_script(&name(sb, worktree), &dir(worktree));
    channel.command(
        &script,
        &keystone_channel::ExecOptions {
            tty: true,
            ..Default::default()
        },
    )
}

/// The session of a worktree: `<sandbox>-<branch>`. tmux session names may
/// not contain '.' or ':', and Zellij's become socket file names, so both
/// and '/' become '-'.
pub fn name(sb: &Sandbox, worktree: &str) -> String {
    format!("{}-{}", sb.name, worktree.replace(['.', ':', '/'], "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_valid_sh() {
        for m in [Multiplexer::Tmux, Multiplexer::Zellij] {
            for script in [
                m.attach_script("sb-feat", "/workspace/.worktrees/feat"),
                m.list_script().to_string(),
                m.kill_script("sb-feat"),
                m.run_in_script("sb-main", "/workspace", "claude; exec bash"),
            ] {
                let ok = std::process::Command::new("sh")
                    .args(["-n", "-c", &script])
                    .status()
                    .expect("sh")
                    .success();
                assert!(ok, "{script}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Multiplexer::Zellij.name(), "zellij");
    }
}
