//! Which dev servers listen inside a sandbox, and in which worktree.
//!
//! The proxy runs [`SCRIPT`] in the guest over the sandbox's SSH channel
//! (as root, so every user's processes are visible) about once a second:
//! `ss -ltnp` lists listening TCP sockets with their process; the
//! process's working directory (`/proc/<pid>/cwd`) tells the worktree.
//! Why polling `ss` and not a watcher: it needs nothing installed or
//! running in the guest beyond iproute2 (in every image), works the same on
//! every backend, and one poll costs a few milliseconds.
//!
//! A server belongs to the worktree whose directory is its working
//! directory or an ancestor of it (`/workspace/.worktrees/<branch>/…`);
//! anything else (including `/workspace` itself) is the main checkout's.

use serde::{Deserialize, Serialize};

/// Listed worktrees (`W\t<path>`), then listening sockets
/// (`L\t<local address>\t<pid>\t<command>\t<cwd>`).
pub const SCRIPT: &str = r#"for f in /workspace/.git/worktrees/*/gitdir; do [ -r "$f" ] && printf 'W\t%s\n' "$(dirname "$(cat "$f")")"; done
ss -Hltnp 2>/dev/null | while read -r _ _ _ local _ proc; do
  pid=${proc#*pid=}; pid=${pid%%,*}
  case $pid in ''|*[!0-9]*) pid=0;; esac
  printf 'L\t%s\t%s\t%s\t%s\n' "$local" "$pid" "$(cat /proc/$pid/comm 2>/dev/null)" "$(readlink /proc/$pid/cwd 2>/dev/null)"
done
"#;

/// Ports whose usual occupants do not speak HTTP: MySQL, PostgreSQL,
/// Redis, MongoDB, memcached, AMQP, Kafka, ZooKeeper.
const NOT_HTTP: &[u16] = &[3306, 5432, 6379, 27017, 11211, 5672, 9092, 2181];

/// Where worktrees live in the guest (see `keystone agent worktree`).
pub const WORKTREE_ROOT: &str = "/workspace/.worktrees/";

/// A dev server seen inside a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub port: u16,
    /// The address the proxy connects to inside the guest (loopback unless
    /// the server listens on one specific address only).
    pub connect: String,
    pub pid: u32,
    pub command: String,
    pub cwd: String,
    /// The branch of the worktree it runs in; `main` for the main checkout.
    pub worktree: String,
}

/// One poll's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// Branches with a worktree under [`WORKTREE_ROOT`].
    pub worktrees: Vec<String>,
    /// One entry per port, ordered by port.
    pub servers: Vec<Server>,
}

impl Discovery {
    /// The server a worktree's hostname reaches on the proxy's own port:
    /// the lowest port listening in that worktree, passing over the
    /// well-known ports of databases and brokers (a project's Postgres
    /// beside its dev server) unless nothing else listens.
    pub fn default_server(&self, worktree: &str) -> Option<&Server> {
        let mut in_worktree = self.servers.iter().filter(|s| s.worktree == worktree);
        in_worktree
            .clone()
            .find(|s| !NOT_HTTP.contains(&s.port))
            .or_else(|| in_worktree.next())
    }

    pub fn server_on(&self, port: u16) -> Option<&Server> {
        self.servers.iter().find(|s| s.port == port)
    }

    /// The branch whose hostname label is `label` (`main` included).
    pub fn worktree_for_label(&self, label: &str) -> Option<&str> {
        if label == "main" {
            return Some("main");
        }
        self.worktrees
            .iter()
            .find(|w| crate::route::label(w) == label)
            .map(String::as_str)
    }
}

/// Parse [`SCRIPT`]'s output. Lines that do not parse are skipped: a
/// process may exit between `ss` and `readlink`.
pub fn parse(output: &str) -> Discovery {
    let mut worktree_paths: Vec<String> = Vec::new();
    let mut servers: Vec<Server> = Vec::new();
    for line in output.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["W", path] => worktree_paths.push(path.trim_end_matches('/').to_string()),
            ["L", local, pid, command, cwd] => {
                let Some((addr, port)) = parse_local(local) else {
                    continue;
                };
                // The guest's sshd is the channel itself, not a dev server.
                if port == 22 || *command == "sshd" || command.starts_with("sshd-") {
                    continue;
                }
                let server = Server {
                    port,
                    connect: connect_address(&addr),
                    pid: pid.parse().unwrap_or(0),
                    command: command.to_string(),
                    cwd: cwd.to_string(),
                    worktree: String::new(),
                };
                match servers.iter_mut().find(|s| s.port == port) {
                    // A v4 and a v6 socket on the same port: keep the one
                    // reachable on 127.0.0.1.
                    Some(existing) => {
                        if existing.connect != "127.0.0.1" && server.connect == "127.0.0.1" {
                            *existing = server;
                        }
                    }
                    None => servers.push(server),
                }
            }
            _ => {}
        }
    }
    worktree_paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for s in &mut servers {
        s.worktree = worktree_of(&s.cwd, &worktree_paths);
    }
    servers.sort_by_key(|s| s.port);
    let mut worktrees: Vec<String> = worktree_paths.iter().map(|p| branch_of(p)).collect();
    worktrees.sort();
    Discovery { worktrees, servers }
}

/// `0.0.0.0:8000`, `*:8000`, `[::1]:8000`, `127.0.0.53%lo:53`.
fn parse_local(local: &str) -> Option<(String, u16)> {
    let (addr, port) = local.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr = addr.split('%').next().unwrap_or(addr);
    Some((addr.to_string(), port))
}

fn connect_address(addr: &str) -> String {
    match addr {
        // Wildcards: `*` is a dual-stack v6 socket, `[::]` a v6-only one.
        "0.0.0.0" | "*" => "127.0.0.1".into(),
        "::" | "::1" => "::1".into(),
        a => a.into(),
    }
}

fn worktree_of(cwd: &str, paths_longest_first: &[String]) -> String {
    paths_longest_first
        .iter()
        .find(|p| cwd == p.as_str() || cwd.starts_with(&format!("{p}/")))
        .map(|p| branch_of(p))
        .unwrap_or_else(|| "main".into())
}

fn branch_of(path: &str) -> String {
    match path.strip_prefix(WORKTREE_ROOT) {
        Some(b) => b.to_string(),
        None => path.rsplit('/').next().unwrap_or(path).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "W\t/workspace/.worktrees/feature/x\n\
W\t/workspace/.worktrees/fix\n\
L\t0.0.0.0:22\t50\tsshd\t/\n\
L\t*:8000\t101\tpython3\t/workspace\n\
L\t[::1]:5173\t102\tnode\t/workspace/.worktrees/feature/x/web\n\
L\t127.0.0.1:5173\t102\tnode\t/workspace/.worktrees/feature/x/web\n\
L\t[::]:9000\t103\tpython3\t/workspace/.worktrees/fix\n\
L\t10.0.2.15:7000\t104\tsrv\t/home/agent\n\
L\tgarbage\n";

    #[test]
    fn servers_with_worktrees_and_addresses() {
        let d = parse(OUT);
        assert_eq!(
            d.worktrees,
            vec!["feature/x".to_string(), "fix".to_string()]
        );
        let ports: Vec<(u16, &str, &str)> = d
            .servers
            .iter()
            .map(|s| (s.port, s.connect.as_str(), s.worktree.as_str()))
            .collect();
        assert_eq!(
            ports,
            vec![
                (5173, "127.0.0.1", "feature/x"),
                (7000, "10.0.2.15", "main"),
                (8000, "127.0.0.1", "main"),
                (9000, "::1", "fix"),
            ]
        );
        assert_eq!(d.default_server("main").map(|s| s.port), Some(7000));
        assert_eq!(d.default_server("feature/x").map(|s| s.port), Some(5173));
        assert_eq!(d.worktree_for_label("feature-x"), Some("feature/x"));
        assert_eq!(d.worktree_for_label("nope"), None);
    }

    #[test]
    fn a_database_port_is_not_the_default_server() {
        let d = parse("L\t*:5432\t1\tpostgres\t/\nL\t*:8000\t2\tpython3\t/workspace\n");
        assert_eq!(d.default_server("main").map(|s| s.port), Some(8000));
        let d = parse("L\t*:5432\t1\tpostgres\t/\n");
        assert_eq!(d.default_server("main").map(|s| s.port), Some(5432));
    }

    #[test]
    fn a_worktree_prefix_is_not_a_parent() {
        let d = parse("W\t/workspace/.worktrees/fix\nL\t*:1\t1\tx\t/workspace/.worktrees/fix2\n");
        assert_eq!(d.servers[0].worktree, "main");
    }
}
