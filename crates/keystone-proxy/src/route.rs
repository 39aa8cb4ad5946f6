//! Hostnames to routes: `<sandbox>.<domain>` and `<branch>.<sandbox>.<domain>`.
//!
//! Pure functions, so the rules that keep one sandbox's traffic out of
//! another's are tested without any network.

/// What a request's host names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoute {
    /// The sandbox's name (already a DNS label: `validate_name`).
    pub sandbox: String,
    /// A worktree's hostname label ([`label`]), `None` for the main checkout.
    pub worktree: Option<String>,
}

/// Split `host[:port]` (a `Host` header or a URI authority). IPv6 literals
/// keep their brackets. Returns `None` for a malformed value.
pub fn split_host_port(value: &str) -> Option<(String, Option<u16>)> {
    let value = value.trim();
    if value.is_empty() || value.contains(['/', '@', ' ', '\\']) {
        return None;
    }
    if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{v6}]"), port));
    }
    let (host, port) = match value.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse().ok()?)),
        None => (value, None),
    };
    if host.contains(':') || host.is_empty() {
        return None;
    }
    // Hostnames are case-insensitive; a trailing dot names the same host.
    Some((host.trim_end_matches('.').to_ascii_lowercase(), port))
}

/// The route a hostname (no port) names under `domain`, or `None` when it
/// is not one of ours. Only one or two labels before the domain are valid:
/// anything else (`a.b.c.<domain>`) is unknown rather than guessed at.
pub fn parse_host(host: &str, domain: &str) -> Option<HostRoute> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let prefix = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let labels: Vec<&str> = prefix.split('.').collect();
    if labels.iter().any(|l| !is_label(l)) {
        return None;
    }
    match labels.as_slice() {
        [sandbox] => Some(HostRoute {
            sandbox: sandbox.to_string(),
            worktree: None,
        }),
        [worktree, sandbox] => Some(HostRoute {
            sandbox: sandbox.to_string(),
            worktree: Some(worktree.to_string()),
        }),
        _ => None,
    }
}

fn is_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The hostname label of a branch: lower-case, every character that may
/// not appear in a DNS label (`/`, `_`, `.`) turned into `-`, so
/// `feature/Login_v2` answers at `feature-login-v2.<sandbox>.<domain>`.
pub fn label(branch: &str) -> String {
    let mut out: String = branch
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches('-');
    out.chars().take(63).collect()
}

/// The URL of a sandbox's (or worktree's) server.
pub fn url(sandbox: &str, worktree: Option<&str>, domain: &str, port: u16) -> String {
    let host = match worktree {
        Some(w) => format!("{}.{sandbox}.{domain}", label(w)),
        None => format!("{sandbox}.{domain}"),
    };
    if port == 80 {
        format!("http://{host}/")
    } else {
        format!("http://{host}:{port}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sandbox.localhost";

    #[test]
    fn sandbox_and_worktree_hosts() {
        assert_eq!(
            parse_host("app.sandbox.localhost", D),
            Some(HostRoute {
                sandbox: "app".into(),
                worktree: None
            })
        );
        assert_eq!(
            parse_host("feat-x.app.sandbox.localhost", D),
            Some(HostRoute {
                sandbox: "app".into(),
                worktree: Some("feat-x".into())
            })
        );
    }

    #[test]
    fn foreign_or_malformed_hosts_route_nowhere() {
        for h in [
            "sandbox.localhost",
            "app.sandbox.localhost.evil.example",
            "appsandbox.localhost",
            "a.b.app.sandbox.localhost",
            ".app.sandbox.localhost",
            "app..sandbox.localhost",
            "localhost",
            "127.0.0.1",
            "a_b.sandbox.localhost",
        ] {
            assert_eq!(parse_host(h, D), None, "{h}");
        }
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(
            split_host_port("App.Sandbox.Localhost.:3000"),
            Some(("app.sandbox.localhost".into(), Some(3000)))
        );
        assert_eq!(
            split_host_port("x.localhost"),
            Some(("x.localhost".into(), None))
        );
        assert_eq!(
            split_host_port("[::1]:80"),
            Some(("[::1]".into(), Some(80)))
        );
        for bad in [
            "",
            "a:b",
            "a:99999",
            "u@app.sandbox.localhost",
            "a b",
            "a/b",
            ":80",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn branch_labels() {
        assert_eq!(label("feature/Login_v2"), "feature-login-v2");
        assert_eq!(label("fix--x."), "fix-x");
        assert_eq!(label("main"), "main");
    }

    #[test]
    fn urls() {
        assert_eq!(
            url("app", None, D, 8080),
            "http://app.sandbox.localhost:8080/"
        );
        assert_eq!(
            url("app", Some("feat/x"), D, 80),
            "http://feat-x.app.sandbox.localhost/"
        );
    }
}
