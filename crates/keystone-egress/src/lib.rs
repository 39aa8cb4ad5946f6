//! A sandbox's only way out.
//!
//! With `[egress] mode = "allowlist"` the guest has no route to any
//! address: its network namespace (container) or the namespace its tap
//! lives in (microVM) holds nothing but loopback, the tap, and a
//! `local 0.0.0.0/0` / `local ::/0` route, so every connection the guest
//! makes to any address lands on a socket keystone bound in that
//! namespace and serves from the host:
//!
//! - DNS on [`GATEWAY`]:53 (UDP and TCP): allowed names get a synthetic
//!   address from this sandbox's [`pool`]; every other query is REFUSED
//!   without being forwarded anywhere, so nothing leaves in query names.
//! - An HTTP proxy on [`GATEWAY`]:[`PROXY_PORT`] for tools that honour
//!   `HTTP(S)_PROXY` (CONNECT and absolute-form requests).
//! - Capture listeners on every port the policy allows (80 and 443
//!   always) for tools that do not: the destination address names the
//!   host through the pool.
//!
//! Every path asks one [`policy::Policy::decide`]; names are resolved on
//! the host only (`upstream`), the address pinned and checked; TLS SNI and
//! HTTP Host must agree with the name that was allowed.
//!
//! The policy is host-side state (a file in the sandbox's directory that
//! only the CLI writes); the guest cannot reach it.
//!
//! Modules, each owning one thing:
//!
//! - [`policy`]: the policy file ([`policy::Spec`]), rule syntax, presets,
//!   and the compiled [`policy::Policy`] every path asks.
//! - [`pool`]: per-sandbox synthetic addresses, persisted, never reused.
//! - [`dns`]: answering the guest's queries from the policy alone.
//! - [`sni`]: reading the server name from a ClientHello.
//! - [`upstream`]: host-side resolution (answers kept for their TTL, at
//!   most 30 s), the address filter, pinned connect.
//! - [`proxy`]: the explicit proxy and transparent capture.
//! - [`log`]: the JSON-lines decision log and [`log::tail`].
//! - [`control`]: reload over a Unix socket ([`control::reload`] for the CLI).
//! - [`daemon`]: all of it as one process ([`daemon::run`]).
//! - [`relay`]: the same egress point for a Kubernetes pod, whose traffic
//!   an in-pod relay brings here over pulls this host opens.
//!
//! Known limits (by design here, not oversights): inside an allowed TLS
//! tunnel the HTTP `Host` cannot be checked without terminating TLS (no
//! MITM); an allowed non-HTTP, non-TLS port is a raw TCP relay to the
//! pinned address; a tunnel already open is not re-checked when the policy
//! is reloaded (each new connection and each plain-HTTP request is).

use std::net::Ipv4Addr;

/// The guest's resolver and proxy address, inside the synthetic range.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The explicit HTTP proxy's port on [`GATEWAY`].
pub const PROXY_PORT: u16 = 3128;
/// The name under which `[egress] host_services` are reachable.
pub const HOST_SERVICE_NAME: &str = "host.keystone.internal";

pub mod control;
pub mod daemon;
pub mod dns;
pub mod inject;
mod intercept;
pub mod log;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod relay;
pub mod sni;
pub mod tls;
pub mod upstream;
