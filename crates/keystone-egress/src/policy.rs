//! What may leave: the policy file ([`Spec`]), its rule syntax
//! ([`parse_rule`]), the named [`presets`], and the compiled [`Policy`]
//! that every path (DNS, CONNECT, SNI, Host, capture) asks through one
//! [`Policy::decide`], so no two paths can disagree about a host.
//!
//! Rule syntax (one string per rule, the same for `allow` and `deny`):
//!
//! | rule                  | matches                                         |
//! |-----------------------|-------------------------------------------------|
//! | `example.com`         | exactly that name, ports 80 and 443             |
//! | `*.example.com`       | any name strictly below it (not the apex), 80/443 |
//! | `NAME:PORT`           | that name (or wildcard) on exactly that port    |
//! | `NAME:*`              | that name on any port (explicit proxy only: a port is only captured if some rule names it) |
//! | `203.0.113.0/24`, `203.0.113.7`, `2001:db8::/32` | IP-literal targets in the range, 80/443 |
//! | `CIDR:PORT`, `CIDR:*` | the same on a port; IPv6 in brackets: `[2001:db8::/32]:22` |
//!
//! Deny always wins. A deny rule written without a port denies every port:
//! a deny is meant to subtract a host, and `deny = ["evil.com"]` quietly
//! leaving `evil.com:22` open would surprise. A CIDR rule covering loopback
//! is refused: services on the host are reached through `host_services`.

use crate::HOST_SERVICE_NAME;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The host-side policy file (JSON). Only the CLI writes it; the guest
/// cannot reach it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Spec {
    /// Names from [`presets`].
    pub presets: Vec<String>,
    /// Rule strings (see the module docs).
    pub allow: Vec<String>,
    /// Same syntax; deny always wins.
    pub deny: Vec<String>,
    /// Host loopback ports exposed to the guest as
    /// [`HOST_SERVICE_NAME`]`:port`, e.g. `"127.0.0.1:11434"`.
    pub host_services: Vec<String>,
    /// Upstream DNS server (`"IP"` or `"IP:port"`) used host-side; `None`
    /// is the host's own resolver (getaddrinfo).
    pub resolver: Option<String>,
}

/// Which ports a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Written without a port: 80 and 443 (for a deny rule: every port).
    Default,
    One(u16),
    Any,
}

/// An IP network: an address with its host bits clear, and a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`, refusing host bits set (`203.0.113.5/24`).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let c = Cidr { addr, prefix };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than /{max}"));
        }
        if c.network() != addr {
            return Err(format!(
                "{addr}/{prefix} has host bits set; the network is {}/{prefix}",
                c.network()
            ));
        }
        Ok(c)
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            // An IPv4-mapped network (::ffff:a.b.c.d/104) against an IPv4
            // address: compare in the mapped form.
            (IpAddr::V6(n), IpAddr::V4(a)) => {
                u128::from(a.to_ipv6_mapped()) & mask128(self.prefix) == u128::from(n)
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }

    /// Whether the two networks share any address.
    fn overlaps(&self, other: &Cidr) -> bool {
        let (short, long) = if self.prefix <= other.prefix {
            (self, other)
        } else {
            (other, self)
        };
        match (short.addr, long.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                short.contains(long.addr)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix as u32)
    }
}

/// What a rule's host part matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this (normalised) name.
    Exact(String),
    /// Any name strictly below this one.
    Below(String),
    /// IP-literal targets in this network.
    Net(Cidr),
}

/// One parsed rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub host: HostPattern,
    pub ports: Ports,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = matches!(&self.host, HostPattern::Net(c) if c.addr.is_ipv6());
        let host = match &self.host {
            HostPattern::Exact(n) => n.clone(),
            HostPattern::Below(n) => format!("*.{n}"),
            HostPattern::Net(c) if (c.addr.is_ipv4() && c.prefix == 32) || c.prefix == 128 => {
                c.addr.to_string()
            }
            HostPattern::Net(c) => c.to_string(),
        };
        match self.ports {
            Ports::Default => f.write_str(&host),
            Ports::One(p) if v6 => write!(f, "[{host}]:{p}"),
            Ports::Any if v6 => write!(f, "[{host}]:*"),
            Ports::One(p) => write!(f, "{host}:{p}"),
            Ports::Any => write!(f, "{host}:*"),
        }
    }
}

impl Rule {
    /// Does the rule allow `target:port` (a portless rule: 80 and 443)?
    pub fn matches(&self, target: &Target, port: u16) -> bool {
        self.matches_host(target) && self.matches_port(port, false)
    }

    fn matches_host(&self, target: &Target) -> bool {
        match (&self.host, target) {
            (HostPattern::Exact(n), Target::Name(t)) => n == t,
            (HostPattern::Below(n), Target::Name(t)) => {
                t.len() > n.len() + 1 && t.ends_with(n.as_str()) && {
                    let cut = t.len() - n.len();
                    t.as_bytes()[cut - 1] == b'.'
                }
            }
            (HostPattern::Net(c), Target::Addr(a)) => c.contains(*a),
            _ => false,
        }
    }

    /// `deny` widens a portless rule to every port.
    fn matches_port(&self, port: u16, deny: bool) -> bool {
        match self.ports {
            Ports::Default => deny || port == 80 || port == 443,
            Ports::One(p) => p == port,
            Ports::Any => true,
        }
    }
}

#[cfg(feature = "testing")]
static LOOPBACK_FOR_TESTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only (feature `testing`): let CIDR rules cover loopback, because
/// integration tests run their upstream servers on 127.0.0.x. Process-wide.
#[cfg(feature = "testing")]
pub fn allow_loopback_rules_for_tests() {
    LOOPBACK_FOR_TESTS.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn loopback_rules_allowed() -> bool {
    #[cfg(feature = "testing")]
    {
        LOOPBACK_FOR_TESTS.load(std::sync::atomic::Ordering::SeqCst)
    }
    #[cfg(not(feature = "testing"))]
    {
        false
    }
}

const RULE_FORMS: &str = "e.g. \"example.com\", \"*.example.com\", \"example.com:22\", \
     \"example.com:*\", \"203.0.113.0/24\", \"203.0.113.0/24:5432\" or \"[2001:db8::/32]:22\"";

/// Parse one rule string (see the module docs for the syntax).
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let s = s.trim();
    let bad = |why: String| Err(format!("rule {s:?}: {why} ({RULE_FORMS})"));
    if s.is_empty() {
        return bad("empty rule".into());
    }
    // Split off the port. Bracketed IPv6 first; a bare IPv6 (several
    // colons) has no port; otherwise the last colon.
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return bad("'[' without a closing ']'".into());
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad(format!("unexpected {after:?} after ']'")),
            },
        };
        if !inner.contains(':') {
            return bad("brackets are only for IPv6 addresses".into());
        }
        (inner, port)
    } else if s.matches(':').count() > 1 {
        let port_after_prefix = s.split_once('/').is_some_and(|(_, p)| p.contains(':'));
        if !port_after_prefix && (s.contains('/') || s.parse::<Ipv6Addr>().is_ok()) {
            (s, None)
        } else {
            return bad("not a valid IPv6 address or network; an IPv6 rule with a port goes in brackets, \"[2001:db8::/32]:22\"".into());
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let ports = match port {
        None => Ports::Default,
        Some("*") => Ports::Any,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ports::One(n),
            _ => return bad(format!("port {p:?} is not 1-65535 or *")),
        },
    };
    let host = match parse_host_pattern(host) {
        Ok(h) => h,
        Err(e) => return bad(e),
    };
    if let HostPattern::Net(c) = &host {
        if covers_loopback(c) && !loopback_rules_allowed() {
            return Err(format!(
                "rule {s:?}: {c} covers loopback (127.0.0.0/8, ::1); to reach a service on this \
                 host use host_services, e.g. host_services = [\"127.0.0.1:11434\"], and connect \
                 to {HOST_SERVICE_NAME}:11434 from the sandbox"
            ));
        }
    }
    if let HostPattern::Net(c) = &host {
        let pool = Cidr {
            addr: IpAddr::V4(crate::pool::POOL_BASE),
            prefix: 15,
        };
        let mapped = Cidr {
            addr: IpAddr::V6(crate::pool::POOL_BASE.to_ipv6_mapped()),
            prefix: 111,
        };
        if c.overlaps(&pool) || c.overlaps(&mapped) {
            return Err(format!(
                "rule {s:?}: {c} covers 198.18.0.0/15, the synthetic addresses keystone's DNS \
                 gives the sandbox; allow the names instead, e.g. \"api.example.com\""
            ));
        }
    }
    Ok(Rule { host, ports })
}

fn covers_loopback(c: &Cidr) -> bool {
    let lo4 = Cidr {
        addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
        prefix: 8,
    };
    // ::ffff:127.0.0.0/104 and the deprecated compatible ::127.0.0.0/104.
    let mapped = Cidr {
        addr: IpAddr::V6(Ipv4Addr::new(127, 0, 0, 0).to_ipv6_mapped()),
        prefix: 104,
    };
    let compat = Cidr {
        addr: IpAddr::V6(Ipv6Addr::from(0x7f00_0000u128)),
        prefix: 104,
    };
    c.overlaps(&lo4)
        || c.overlaps(&mapped)
        || c.overlaps(&compat)
        || (c.addr.is_ipv6() && c.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)))
}

fn parse_host_pattern(h: &str) -> Result<HostPattern, String> {
    if h.is_empty() {
        return Err("no host before the port".into());
    }
    if let Some((a, p)) = h.split_once('/') {
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address (in the network {h:?})"))?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
            return Err(format!("prefix length {p:?} is not a number"));
        }
        let prefix: u8 = p.parse().map_err(|_| format!("prefix length {p:?}"))?;
        return Cidr::new(addr, prefix).map(HostPattern::Net);
    }
    if let Ok(addr) = h.parse::<IpAddr>() {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        return Cidr::new(addr, prefix).map(HostPattern::Net);
    }
    if h.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{h:?} is not a valid IPv4 address"));
    }
    if let Some(rest) = h.strip_prefix("*.") {
        let name = normalize_name(rest)?;
        if !name.contains('.') {
            return Err(format!(
                "*.{name} would allow a whole top-level domain; name a domain below it"
            ));
        }
        return Ok(HostPattern::Below(name));
    }
    if h.contains('*') {
        return Err(
            "a wildcard is only allowed as the whole first label, \"*.example.com\"".into(),
        );
    }
    normalize_name(h).map(HostPattern::Exact)
}

/// Lowercase, strip one trailing dot, and check the name is LDH labels
/// (letters, digits, hyphens, plus `_`), each 1-63 bytes, at most 253 in
/// all. Anything else (spaces, CR/LF, non-ASCII) is refused, so a name can
/// never smuggle bytes into a log line, a CONNECT line or a header.
pub fn normalize_name(name: &str) -> Result<String, String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() {
        return Err("empty host name".into());
    }
    if n.len() > 253 {
        return Err(format!("host name is {} bytes, over 253", n.len()));
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err(format!("{n:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is over 63 bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{n:?} contains {c:?}; host names are letters, digits, '-', '_' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    // A numeric last label ("1.2.3.4", "0x7f000001") is an address in
    // disguise: getaddrinfo would parse it (inet_aton forms) rather than
    // look it up, so a name rule must never cover it.
    let last = n.rsplit('.').next().unwrap_or_default();
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if last.bytes().all(|b| b.is_ascii_digit()) || hex {
        return Err(format!(
            "{n:?} ends in a numeric label, so it reads as an IP address, not a name"
        ));
    }
    Ok(n)
}

/// Named presets of rule strings, for `presets = [...]`.
pub fn presets() -> &'static [(&'static str, &'static [&'static str])] {
    &[
        (
            "claude",
            &[
                "api.anthropic.com",
                "console.anthropic.com",
                "statsig.anthropic.com",
                "claude.ai",
                "platform.claude.com",
            ],
        ),
        (
            "gemini",
            &[
                "generativelanguage.googleapis.com",
                "cloudcode-pa.googleapis.com",
                "oauth2.googleapis.com",
                "accounts.google.com",
            ],
        ),
        (
            "codex",
            &["api.openai.com", "auth.openai.com", "chatgpt.com"],
        ),
        (
            "registries",
            &[
                "registry.npmjs.org",
                "*.npmjs.org",
                "registry.yarnpkg.com",
                "pypi.org",
                "files.pythonhosted.org",
                "crates.io",
                "index.crates.io",
                "static.crates.io",
                "static.rust-lang.org",
                "deb.debian.org",
                "security.debian.org",
                "archive.ubuntu.com",
                "security.ubuntu.com",
                "proxy.golang.org",
                "sum.golang.org",
                "rubygems.org",
                "repo.maven.apache.org",
                "repo1.maven.org",
            ],
        ),
        (
            "git",
            &[
                "github.com",
                "github.com:22",
                "*.github.com",
                "*.githubusercontent.com",
                "codeload.github.com",
                "gitlab.com",
                "gitlab.com:22",
                "bitbucket.org",
                "bitbucket.org:22",
            ],
        ),
    ]
}

/// Where a connection (or a DNS question) is going: a name, or an IP
/// literal the guest used directly.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Name(String),
    Addr(IpAddr),
}

impl Target {
    /// A host as written in a CONNECT line, a URI or a Host header (no
    /// port): `[v6]`, a v4/v6 literal, or a name (validated, normalised).
    pub fn parse(host: &str) -> Result<Target, String> {
        let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if let Some(v6) = inner {
            return v6
                .parse::<Ipv6Addr>()
                .map(|a| Target::Addr(IpAddr::V6(a).to_canonical()))
                .map_err(|_| format!("{host:?} is not an IPv6 address"));
        }
        if let Ok(a) = host.parse::<IpAddr>() {
            return Ok(Target::Addr(a.to_canonical()));
        }
        normalize_name(host).map(Target::Name)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// The outcome of [`Policy::decide`]: allowed or not, and what decided
/// (for the log and the 403 page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: String,
}

#[derive(Clone, Debug)]
struct Compiled {
    rule: Rule,
    /// `"allow *.npmjs.org (preset registries)"`, `"deny evil.com"`.
    origin: String,
}

/// A compiled [`Spec`]: immutable, shared through an `Arc`, swapped
/// whole on reload.
#[derive(Clone, Debug)]
pub struct Policy {
    allow: Vec<Compiled>,
    deny: Vec<Compiled>,
    host_services: BTreeMap<u16, SocketAddr>,
    resolver: Option<SocketAddr>,
}

impl Spec {
    /// Expand presets, parse every rule, check host services and the
    /// resolver. Errors name the field and index.
    pub fn compile(&self) -> Result<Policy, String> {
        let mut allow = Vec::new();
        for name in &self.presets {
            let Some((_, rules)) = presets().iter().find(|(n, _)| n == name) else {
                let known: Vec<&str> = presets().iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown preset {name:?}; the presets are {}",
                    known.join(", ")
                ));
            };
            for r in rules.iter() {
                let rule = parse_rule(r).map_err(|e| format!("preset {name}: {e}"))?;
                allow.push(Compiled {
                    origin: format!("allow {rule} (preset {name})"),
                    rule,
                });
            }
        }
        let compile = |list: &[String], what: &str| -> Result<Vec<Compiled>, String> {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    let rule = parse_rule(r).map_err(|e| format!("{what}[{i}]: {e}"))?;
                    if let HostPattern::Exact(n) = &rule.host {
                        if n == HOST_SERVICE_NAME {
                            return Err(format!(
                                "{what}[{i}]: {HOST_SERVICE_NAME} is reached through host_services, not rules"
                            ));
                        }
                    }
                    Ok(Compiled {
                        origin: format!("{what} {rule}"),
                        rule,
                    })
                })
                .collect()
        };
        allow.extend(compile(&self.allow, "allow")?);
        let deny = compile(&self.deny, "deny")?;
        let mut host_services = BTreeMap::new();
        for (i, s) in self.host_services.iter().enumerate() {
            let addr: SocketAddr = s.trim().parse().map_err(|_| {
                format!("host_services[{i}]: {s:?} is not an address with a port, e.g. \"127.0.0.1:11434\"")
            })?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "host_services[{i}]: {s:?} is not a loopback address; host services are ports on this host's 127.0.0.1 or ::1"
                ));
            }
            if addr.port() == 0 {
                return Err(format!("host_services[{i}]: port 0"));
            }
            if host_services.insert(addr.port(), addr).is_some() {
                return Err(format!(
                    "host_services[{i}]: port {} is listed twice (the guest sees every service as {HOST_SERVICE_NAME}:PORT)",
                    addr.port()
                ));
            }
        }
        let resolver = match &self.resolver {
            None => None,
            Some(r) => Some(parse_resolver(r)?),
        };
        Ok(Policy {
            allow,
            deny,
            host_services,
            resolver,
        })
    }
}

fn parse_resolver(r: &str) -> Result<SocketAddr, String> {
    let r = r.trim();
    if let Ok(a) = r.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = r.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "resolver {r:?} is not an IP address or IP:port, e.g. \"192.0.2.53\" or \"[2001:db8::53]:53\""
    ))
}

impl Policy {
    /// May a connection to `target` on `port` go out? Deny rules first
    /// (deny wins), then [`HOST_SERVICE_NAME`], then allow rules in order.
    /// IP-literal targets are only allowed by CIDR rules.
    pub fn decide(&self, target: &Target, port: u16) -> Decision {
        let target = match target {
            Target::Name(n) => match normalize_name(n) {
                Ok(n) => Target::Name(n),
                Err(e) => {
                    return Decision {
                        allowed: false,
                        rule: format!("not a valid host name: {e}"),
                    }
                }
            },
            Target::Addr(a) => Target::Addr(a.to_canonical()),
        };
        if let Some(d) = self
            .deny
            .iter()
            .find(|c| c.rule.matches_host(&target) && c.rule.matches_port(port, true))
        {
            return Decision {
                allowed: false,
                rule: d.origin.clone(),
            };
        }
        if let Target::Name(n) = &target {
            if n == HOST_SERVICE_NAME {
                return match self.host_services.get(&port) {
                    Some(a) => Decision {
                        allowed: true,
                        rule: format!("host service {a}"),
                    },
                    None => Decision {
                        allowed: false,
                        rule: format!("no host service on port {port}"),
                    },
                };
            }
        }
        if let Some(a) = self
            .allow
            .iter()
            .find(|c| c.rule.matches_host(&target) && c.rule.matches_port(port, false))
        {
            return Decision {
                allowed: true,
                rule: a.origin.clone(),
            };
        }
        Decision {
            allowed: false,
            rule: "no rule allows it".into(),
        }
    }

    /// Does some rule allow `name` on some port? What DNS answers from: a
    /// name nothing could connect to gets no address.
    pub fn name_allowed(&self, name: &str) -> bool {
        self.name_decision(name).allowed
    }

    /// [`Policy::name_allowed`] with the rule that decided, for the log.
    pub fn name_decision(&self, name: &str) -> Decision {
        let deny = |rule: String| Decision {
            allowed: false,
            rule,
        };
        let n = match normalize_name(name) {
            Ok(n) => n,
            Err(e) => return deny(format!("not a valid host name: {e}")),
        };
        let t = Target::Name(n.clone());
        if n == HOST_SERVICE_NAME {
            return self
                .host_services
                .keys()
                .map(|p| self.decide(&t, *p))
                .find(|d| d.allowed)
                .unwrap_or_else(|| deny("no host services".into()));
        }
        let denies: Vec<&Compiled> = self
            .deny
            .iter()
            .filter(|c| c.rule.matches_host(&t))
            .collect();
        if let Some(d) = denies
            .iter()
            .find(|c| matches!(c.rule.ports, Ports::Default | Ports::Any))
        {
            return deny(d.origin.clone());
        }
        let denied = |p: u16| denies.iter().any(|c| c.rule.ports == Ports::One(p));
        self.allow
            .iter()
            .filter(|c| c.rule.matches_host(&t))
            .find(|c| match c.rule.ports {
                Ports::Default => !denied(80) || !denied(443),
                Ports::One(p) => !denied(p),
                // Single-port denies cannot cover all 65535 ports.
                Ports::Any => true,
            })
            .map(|c| Decision {
                allowed: true,
                rule: c.origin.clone(),
            })
            .unwrap_or_else(|| deny("no rule allows it".into()))
    }

    /// Every concrete port some rule (or host service) allows, always with
    /// 80 and 443: the ports capture listeners are needed on. `NAME:*`
    /// rules add none, so they work only through the explicit proxy.
    pub fn ports(&self) -> BTreeSet<u16> {
        let mut ports: BTreeSet<u16> = [80, 443].into();
        for c in &self.allow {
            if let Ports::One(p) = c.rule.ports {
                ports.insert(p);
            }
        }
        ports.extend(self.host_services.keys());
        ports
    }

    /// The host-side address of [`HOST_SERVICE_NAME`]`:port`, if configured.
    pub fn host_service(&self, port: u16) -> Option<SocketAddr> {
        self.host_services.get(&port).copied()
    }

    pub fn has_host_services(&self) -> bool {
        !self.host_services.is_empty()
    }

    /// The upstream DNS server, or `None` for the host's resolver.
    pub fn resolver(&self) -> Option<SocketAddr> {
        self.resolver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allow: &[&str], deny: &[&str]) -> Spec {
        Spec {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            ..Spec::default()
        }
    }

    fn name(n: &str) -> Target {
        Target::Name(n.into())
    }

    fn addr(a: &str) -> Target {
        Target::Addr(a.parse().expect("address"))
    }

    #[test]
    fn parses_every_form() {
        let r = parse_rule("Example.COM.").expect("name");
        assert_eq!(r.host, HostPattern::Exact("example.com".into()));
        assert_eq!(r.ports, Ports::Default);
        let r = parse_rule("*.example.com").expect("wildcard");
        assert_eq!(r.host, HostPattern::Below("example.com".into()));
        assert_eq!(
            parse_rule("example.com:22").expect("port").ports,
            Ports::One(22)
        );
        assert_eq!(parse_rule("example.com:*").expect("any").ports, Ports::Any);
        assert_eq!(
            parse_rule("_dmarc.example.com").expect("underscore").ports,
            Ports::Default
        );
        let r = parse_rule("203.0.113.0/24").expect("cidr");
        assert!(matches!(r.host, HostPattern::Net(_)));
        assert_eq!(r.to_string(), "203.0.113.0/24");
        assert_eq!(
            parse_rule("203.0.113.7").expect("ip").to_string(),
            "203.0.113.7"
        );
        assert_eq!(
            parse_rule("203.0.113.0/24:5432").expect("cidr port").ports,
            Ports::One(5432)
        );
        assert_eq!(
            parse_rule("2001:db8::/32").expect("v6").to_string(),
            "2001:db8::/32"
        );
        let r = parse_rule("[2001:db8::/32]:22").expect("v6 port");
        assert_eq!(r.ports, Ports::One(22));
        assert_eq!(r.to_string(), "[2001:db8::/32]:22");
        assert_eq!(
            parse_rule("[2001:db8::1]").expect("v6 bracket").ports,
            Ports::Default
        );
        assert_eq!(
            parse_rule("[2001:db8::/32]:*").expect("v6 any").ports,
            Ports::Any
        );
    }

    #[test]
    fn refuses_bad_rules_with_reasons() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("example.com:0", "not 1-65535"),
            ("example.com:70000", "not 1-65535"),
            ("example.com:+22", "not 1-65535"),
            ("example.com:", "not 1-65535"),
            (":22", "no host"),
            ("exa mple.com", "contains ' '"),
            ("evil.com\r\nX: y", "not 1-65535"),
            ("evil.com\r\nx", "contains '\\r'"),
            ("ex\u{e9}mple.com", "contains"),
            ("a..b", "empty label"),
            ("-a.com", "starts or ends with '-'"),
            ("*.com", "whole top-level domain"),
            ("foo*.example.com", "wildcard"),
            ("*", "wildcard"),
            ("*.*.example.com", "contains '*'"),
            ("300.1.2.3", "not a valid IPv4"),
            ("1.2.3", "not a valid IPv4"),
            ("203.0.113.5/24", "host bits set"),
            ("203.0.113.0/33", "longer than /32"),
            ("203.0.113.0/x", "not a number"),
            ("2001:db8::/32:22", "in brackets"),
            ("[2001:db8::1", "closing"),
            ("[example.com]:22", "only for IPv6"),
            ("[2001:db8::1]x", "unexpected"),
        ];
        for (rule, want) in cases {
            let e = parse_rule(rule).expect_err(rule);
            assert!(e.contains(want), "{rule:?}: {e}");
            assert!(e.contains("e.g."), "{rule:?} error has no example: {e}");
        }
        for numeric in ["*.2.3.4", "0x7f000001", "a.0x01", "host.1"] {
            let e = parse_rule(numeric).expect_err(numeric);
            assert!(e.contains("numeric label"), "{numeric}: {e}");
        }
        assert!(Target::parse("0x7f000001").is_err());
        assert!(parse_rule("0xdead.com").is_ok());
        let long = format!("{}.com", "a".repeat(64));
        assert!(parse_rule(&long).expect_err("label").contains("over 63"));
        let huge = vec!["abcdefghi"; 26].join(".");
        assert!(parse_rule(&huge).expect_err("len").contains("over 253"));
    }

    #[test]
    fn refuses_loopback_cidrs() {
        #[cfg(feature = "testing")]
        if loopback_rules_allowed() {
            return;
        }
        for r in [
            "127.0.0.0/8",
            "127.0.0.1",
            "127.1.2.0/24:22",
            "0.0.0.0/0",
            "::1",
            "::/0",
            "[::ffff:127.0.0.1]:80",
            "::ffff:0:0/96",
        ] {
            let e = parse_rule(r).expect_err(r);
            assert!(e.contains("use host_services"), "{r}: {e}");
        }
        for r in [
            "198.18.0.0/15",
            "198.19.1.1",
            "198.0.0.0/8:22",
            "[::ffff:198.18.0.1]:443",
        ] {
            let e = parse_rule(r).expect_err(r);
            assert!(e.contains("synthetic"), "{r}: {e}");
        }
        assert!(parse_rule("198.20.0.0/16").is_ok());
        assert!(parse_rule("64.0.0.0/3").is_ok());
        assert!(parse_rule("126.0.0.0/8").is_ok());
    }

    #[test]
    fn wildcard_does_not_match_apex() {
        let p = spec(&["*.example.com"], &[]).compile().expect("compile");
        assert!(p.decide(&name("a.example.com"), 443).allowed);
        assert!(p.decide(&name("a.b.example.com"), 80).allowed);
        assert!(!p.decide(&name("example.com"), 443).allowed);
        assert!(!p.decide(&name("badexample.com"), 443).allowed);
        assert!(!p.decide(&name("a.example.com"), 22).allowed);
        assert!(!p.name_allowed("example.com"));
        assert!(p.name_allowed("x.example.com"));
    }

    #[test]
    fn deny_wins_and_names_the_rule() {
        let p = spec(
            &["*.example.com", "evil.example.com:22"],
            &["evil.example.com"],
        )
        .compile()
        .expect("compile");
        let d = p.decide(&name("evil.example.com"), 443);
        assert_eq!(
            d,
            Decision {
                allowed: false,
                rule: "deny evil.example.com".into()
            }
        );
        // A portless deny covers every port.
        assert!(!p.decide(&name("evil.example.com"), 22).allowed);
        assert!(!p.name_allowed("evil.example.com"));
        assert_eq!(
            p.decide(&name("ok.example.com"), 443).rule,
            "allow *.example.com"
        );
        assert_eq!(p.decide(&name("other.org"), 443).rule, "no rule allows it");
        // A port-specific deny leaves the other ports.
        let p = spec(&["a.com"], &["a.com:80"]).compile().expect("compile");
        assert!(!p.decide(&name("a.com"), 80).allowed);
        assert!(p.decide(&name("a.com"), 443).allowed);
        assert!(p.name_allowed("a.com"));
    }

    #[test]
    fn ports_and_any() {
        let p = spec(&["a.com:22", "b.com:*", "203.0.113.0/24:5432"], &[])
            .compile()
            .expect("compile");
        assert!(p.decide(&name("a.com"), 22).allowed);
        assert!(!p.decide(&name("a.com"), 443).allowed);
        assert!(p.decide(&name("b.com"), 9999).allowed);
        assert_eq!(
            p.ports().into_iter().collect::<Vec<_>>(),
            vec![22, 80, 443, 5432]
        );
    }

    #[test]
    fn ip_targets_only_by_cidr() {
        let p = spec(
            &["203.0.113.0/24", "[2001:db8::/32]:22", "example.com"],
            &[],
        )
        .compile()
        .expect("compile");
        assert!(p.decide(&addr("203.0.113.9"), 443).allowed);
        assert!(p.decide(&addr("::ffff:203.0.113.9"), 443).allowed);
        assert!(!p.decide(&addr("203.0.114.9"), 443).allowed);
        assert!(p.decide(&addr("2001:db8::5"), 22).allowed);
        assert!(!p.decide(&addr("2001:db8::5"), 443).allowed);
        // A name rule never allows an address, nor a CIDR rule a name.
        assert!(!p.decide(&addr("93.184.216.34"), 443).allowed);
        assert!(!p.decide(&name("203.0.113.9.example"), 443).allowed);
    }

    #[test]
    fn presets_expand_and_unknown_is_listed() {
        let p = Spec {
            presets: vec!["registries".into(), "git".into()],
            ..Spec::default()
        }
        .compile()
        .expect("compile");
        assert_eq!(
            p.decide(&name("foo.npmjs.org"), 443).rule,
            "allow *.npmjs.org (preset registries)"
        );
        assert!(p.decide(&name("github.com"), 22).allowed);
        assert!(!p.decide(&name("codeberg.org"), 443).allowed);
        assert!(p.ports().contains(&22));
        let e = Spec {
            presets: vec!["nope".into()],
            ..Spec::default()
        }
        .compile()
        .expect_err("unknown");
        assert!(
            e.contains("nope") && e.contains("claude, gemini, codex, registries, git"),
            "{e}"
        );
        for (n, rules) in presets() {
            for r in rules.iter() {
                assert!(parse_rule(r).is_ok(), "preset {n}: {r}");
            }
        }
    }

    #[test]
    fn host_services() {
        let p = Spec {
            host_services: vec!["127.0.0.1:11434".into()],
            ..Spec::default()
        }
        .compile()
        .expect("compile");
        let d = p.decide(&name(HOST_SERVICE_NAME), 11434);
        assert_eq!(
            d,
            Decision {
                allowed: true,
                rule: "host service 127.0.0.1:11434".into()
            }
        );
        assert!(!p.decide(&name(HOST_SERVICE_NAME), 22).allowed);
        assert!(p.name_allowed(HOST_SERVICE_NAME));
        assert!(p.ports().contains(&11434));
        assert!(!Spec::default()
            .compile()
            .expect("empty")
            .name_allowed(HOST_SERVICE_NAME));
        for bad in ["10.0.0.1:80", "127.0.0.1", "127.0.0.1:0"] {
            assert!(Spec {
                host_services: vec![bad.into()],
                ..Spec::default()
            }
            .compile()
            .is_err());
        }
        assert!(spec(&[HOST_SERVICE_NAME], &[]).compile().is_err());
    }

    #[test]
    fn resolver_and_json() {
        let s: Spec =
            serde_json::from_str(r#"{"allow":["a.com"],"resolver":"192.0.2.53"}"#).expect("json");
        assert_eq!(
            s.compile().expect("compile").resolver(),
            Some("192.0.2.53:53".parse().expect("addr"))
        );
        assert!(serde_json::from_str::<Spec>(r#"{"alow":[]}"#).is_err());
        let s = Spec {
            resolver: Some("dns.google".into()),
            ..Spec::default()
        };
        assert!(s.compile().expect_err("resolver").contains("not an IP"));
    }

    #[test]
    fn target_parse() {
        assert_eq!(
            Target::parse("Example.com").expect("n"),
            name("example.com")
        );
        assert_eq!(
            Target::parse("[2001:db8::1]").expect("v6"),
            addr("2001:db8::1")
        );
        assert_eq!(
            Target::parse("[::ffff:1.2.3.4]").expect("m"),
            addr("1.2.3.4")
        );
        assert!(Target::parse("a b").is_err());
        assert!(Target::parse("a\r\nb").is_err());
    }
}
