//! Credentials injected on the way out: the guest holds a placeholder for
//! each, the real value lives only here, and it is put into a request
//! only when all of these hold:
//!
//! - the request goes to one of the credential's hosts ([`Secret::hosts`],
//!   the policy's rule syntax) over TLS that this egress point terminated
//!   (see [`crate::tls`]); plain HTTP never gets a real value;
//! - the placeholder is in a header (one [`Secret::headers`] names, or
//!   any); bodies are never touched. `Authorization: Basic` is decoded,
//!   so a placeholder used as a password is found too.
//!
//! A placeholder seen anywhere else passes unchanged and is logged.
//!
//! The CLI sends a [`Bundle`] over the control socket at every start (and
//! on `tokens --refresh`); nothing of it is written to disk by the egress
//! point, and the guest cannot reach the socket.

use crate::policy::{parse_rule, Rule, Target};
use crate::tls::Authority;
use base64::Engine;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One credential as the CLI sends it.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// The variable's name (`ANTHROPIC_API_KEY`).
    pub name: String,
    /// What the guest holds instead.
    pub placeholder: String,
    /// The real value.
    pub value: String,
    /// Where it may go: rules as in the policy (`api.example.com`,
    /// `*.example.com`, `host:8443`).
    pub hosts: Vec<String>,
    /// Only these headers (`x-api-key`); empty: any header.
    #[serde(default)]
    pub headers: Vec<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// What the CLI sends: the CA the egress point signs with, and the
/// credentials.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub ca_cert_pem: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub ca_key_pem: String,
    pub secrets: Vec<Secret>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct Compiled {
    name: String,
    placeholder: String,
    value: HeaderValueText,
    hosts: Vec<Rule>,
    headers: Vec<HeaderName>,
}

/// A real value known to be a valid header value.
struct HeaderValueText(String);

/// The compiled bundle, swapped whole when the CLI sends a new one.
pub struct Injector {
    pub authority: Authority,
    secrets: Vec<Compiled>,
}

/// A credential's use, as `tokens` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    /// Requests it was injected into.
    pub used: u64,
    /// Requests that carried its placeholder somewhere it is not injected.
    pub passed: u64,
}

/// Counts per credential name, kept across bundles (a rotated value
/// keeps its count).
#[derive(Default)]
pub struct Counters(Mutex<BTreeMap<String, Usage>>);

impl Counters {
    fn bump(&self, name: &str, injected: bool) {
        if let Ok(mut m) = self.0.lock() {
            let u = m.entry(name.to_string()).or_default();
            if injected {
                u.used += 1;
            } else {
                u.passed += 1;
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, Usage> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What happened to one request's headers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Credentials put in.
    pub injected: Vec<String>,
    /// Placeholders left as they were (not this credential's host, or
    /// not over terminated TLS, or not its header).
    pub passed: Vec<String>,
}

impl Injector {
    pub fn new(bundle: &Bundle) -> Result<Injector, String> {
        let authority = Authority::new(&bundle.ca_cert_pem, &bundle.ca_key_pem)?;
        let mut secrets = Vec::new();
        for s in &bundle.secrets {
            let what = |e: String| format!("credential {}: {e}", s.name);
            if s.placeholder.len() < 16 {
                return Err(what("the placeholder is shorter than 16 characters".into()));
            }
            if s.value.is_empty() || s.value == s.placeholder {
                return Err(what("no real value".into()));
            }
            HeaderValue::from_str(&s.value).map_err(|_| {
                what("the value cannot be sent in an HTTP header (control characters)".into())
            })?;
            let hosts = s
                .hosts
                .iter()
                .map(|h| parse_rule(h))
                .collect::<Result<Vec<_>, _>>()
                .map_err(what)?;
            let headers = s
                .headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| what(format!("header: {e}")))?;
            secrets.push(Compiled {
                name: s.name.clone(),
                placeholder: s.placeholder.clone(),
                value: HeaderValueText(s.value.clone()),
                hosts,
                headers,
            });
        }
        Ok(Injector { authority, secrets })
    }

    /// Is some credential injected into requests to `name:port`? Those
    /// connections are the only ones TLS is terminated for.
    pub fn intercepts(&self, name: &str, port: u16) -> bool {
        let t = Target::Name(name.to_string());
        self.secrets
            .iter()
            .any(|s| s.hosts.iter().any(|r| r.matches(&t, port)))
    }

    /// The credentials' names, in the order sent.
    pub fn names(&self) -> Vec<String> {
        self.secrets.iter().map(|s| s.name.clone()).collect()
    }

    /// Put real values into `headers` of a request to `target:port`;
    /// `terminated` says whether this egress point terminated its TLS
    /// (nothing is injected otherwise). Counts go to `counters`.
    pub fn apply(
        &self,
        target: &Target,
        port: u16,
        terminated: bool,
        headers: &mut HeaderMap,
        counters: &Counters,
    ) -> Outcome {
        let mut out = Outcome::default();
        for s in &self.secrets {
            let ours = terminated && s.hosts.iter().any(|r| r.matches(target, port));
            let mut found = false;
            let mut put = false;
            let names: Vec<HeaderName> = headers.keys().cloned().collect();
            for h in names {
                let allowed_here = ours && (s.headers.is_empty() || s.headers.contains(&h));
                let values: Vec<HeaderValue> = headers.get_all(&h).iter().cloned().collect();
                let mut replaced = Vec::with_capacity(values.len());
                let mut changed = false;
                for v in values {
                    match substitute(&h, &v, &s.placeholder, &s.value.0) {
                        Some(new) => {
                            found = true;
                            if allowed_here {
                                replaced.push(new);
                                changed = true;
                                put = true;
                            } else {
                                replaced.push(v);
                            }
                        }
                        None => replaced.push(v),
                    }
                }
                if changed {
                    headers.remove(&h);
                    for v in replaced {
                        headers.append(h.clone(), v);
                    }
                }
            }
            if put {
                counters.bump(&s.name, true);
                out.injected.push(s.name.clone());
            } else if found {
                counters.bump(&s.name, false);
                out.passed.push(s.name.clone());
            }
        }
        out
    }
}

/// `v` with the placeholder replaced, if it holds it (for
/// `Authorization: Basic`, inside the decoded `user:password` too).
fn substitute(
    h: &HeaderName,
    v: &HeaderValue,
    placeholder: &str,
    value: &str,
) -> Option<HeaderValue> {
    let bytes = v.as_bytes();
    let text = std::str::from_utf8(bytes).ok()?;
    if text.contains(placeholder) {
        return HeaderValue::from_str(&text.replace(placeholder, value)).ok();
    }
    if *h == AUTHORIZATION {
        let (scheme, rest) = text.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("basic") {
            let engine = base64::engine::general_purpose::STANDARD;
            let decoded = engine.decode(rest.trim()).ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            if decoded.contains(placeholder) {
                let encoded = engine.encode(decoded.replace(placeholder, value));
                return HeaderValue::from_str(&format!("{scheme} {encoded}")).ok();
            }
        }
    }
    None
}

/// The injector a running egress point holds, if the CLI sent one.
#[derive(Default)]
pub struct Slot {
    current: std::sync::RwLock<Option<Arc<Injector>>>,
    pub counters: Counters,
}

impl Slot {
    pub fn get(&self) -> Option<Arc<Injector>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, injector: Injector) {
        let i = Some(Arc::new(injector));
        match self.current.write() {
            Ok(mut g) => *g = i,
            Err(p) => *p.into_inner() = i,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        let (c, k) = crate::tls::generate_ca().expect("ca");
        Bundle {
            ca_cert_pem: c,
            ca_key_pem: k,
            secrets: vec![
                Secret {
                    name: "ANTHROPIC_API_KEY".into(),
                    placeholder: "sk-ant-api03-PLACEHOLDERxxxxxxxx".into(),
                    value: "sk-ant-api03-REALVALUEyyyyyyyyyy".into(),
                    hosts: vec!["api.anthropic.com".into()],
                    headers: Vec::new(),
                },
                Secret {
                    name: "GH_TOKEN".into(),
                    placeholder: "ghp_PLACEHOLDERzzzzzzzzzzzz".into(),
                    value: "ghp_REALVALUEwwwwwwwwwwwwww".into(),
                    hosts: vec!["github.com".into(), "*.github.com".into()],
                    headers: vec!["authorization".into()],
                },
            ],
        }
    }

    fn name(n: &str) -> Target {
        Target::Name(n.into())
    }

    #[test]
    fn injected_only_for_its_hosts_over_terminated_tls() {
        let inj = Injector::new(&bundle()).expect("injector");
        let counters = Counters::default();
        let mut h = HeaderMap::new();
        h.insert(
            "x-api-key",
            HeaderValue::from_static("sk-ant-api03-PLACEHOLDERxxxxxxxx"),
        );
        let out = inj.apply(&name("api.anthropic.com"), 443, true, &mut h, &counters);
        assert_eq!(out.injected, vec!["ANTHROPIC_API_KEY"]);
        assert_eq!(h["x-api-key"], "sk-ant-api03-REALVALUEyyyyyyyyyy");

        // Another host, or the same host over plain HTTP: unchanged.
        for (t, terminated) in [("evil.example", true), ("api.anthropic.com", false)] {
            let mut h = HeaderMap::new();
            h.insert(
                "x-api-key",
                HeaderValue::from_static("sk-ant-api03-PLACEHOLDERxxxxxxxx"),
            );
            let out = inj.apply(&name(t), 443, terminated, &mut h, &counters);
            assert!(out.injected.is_empty());
            assert_eq!(out.passed, vec!["ANTHROPIC_API_KEY"]);
            assert_eq!(h["x-api-key"], "sk-ant-api03-PLACEHOLDERxxxxxxxx");
        }
        assert_eq!(
            counters.snapshot()["ANTHROPIC_API_KEY"],
            Usage { used: 1, passed: 2 }
        );
        assert!(inj.intercepts("api.anthropic.com", 443));
        assert!(inj.intercepts("api.github.com", 443));
        assert!(!inj.intercepts("evil.example", 443));
    }

    #[test]
    fn a_named_header_only_and_basic_auth_decoded() {
        let inj = Injector::new(&bundle()).expect("injector");
        let counters = Counters::default();
        let engine = base64::engine::general_purpose::STANDARD;
        let basic = format!(
            "Basic {}",
            engine.encode("x-access-token:ghp_PLACEHOLDERzzzzzzzzzzzz")
        );
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(&basic).expect("v"));
        h.insert(
            "x-other",
            HeaderValue::from_static("ghp_PLACEHOLDERzzzzzzzzzzzz"),
        );
        let out = inj.apply(&name("api.github.com"), 443, true, &mut h, &counters);
        assert_eq!(out.injected, vec!["GH_TOKEN"]);
        let got = h[AUTHORIZATION].to_str().expect("ascii");
        let decoded = engine
            .decode(got.strip_prefix("Basic ").expect("basic"))
            .expect("b64");
        assert_eq!(decoded, b"x-access-token:ghp_REALVALUEwwwwwwwwwwwwww");
        assert_eq!(
            h["x-other"], "ghp_PLACEHOLDERzzzzzzzzzzzz",
            "not its header"
        );
    }

    #[test]
    fn bodies_are_not_headers_and_bad_bundles_are_refused() {
        let mut b = bundle();
        b.secrets[0].value = "a\r\nInjected: yes".into();
        assert!(Injector::new(&b).is_err());
        let mut b = bundle();
        b.secrets[0].placeholder = "short".into();
        assert!(Injector::new(&b).is_err());
        let mut b = bundle();
        b.secrets[0].hosts = vec!["not a host!".into()];
        assert!(Injector::new(&b).is_err());
        // The Debug form never shows a value.
        let shown = format!("{:?}", bundle().secrets);
        assert!(!shown.contains("REALVALUE") && !shown.contains("PLACEHOLDER"));
    }
}
