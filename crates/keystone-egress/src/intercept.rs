//! A TLS connection to a credential's host, terminated here: the guest
//! gets a certificate from the keystone CA ([`crate::tls::Authority`]),
//! each request is checked like plain HTTP in a tunnel (its Host must be
//! the flow's name; the policy is asked again), gets its credentials
//! ([`crate::inject`]), and goes upstream over a TLS connection verified
//! with the host's roots. Upstream connections are kept per name and
//! reused once their previous response has been read, so a second request
//! costs no handshake.
//!
//! Only names some credential lists are intercepted; every other TLS
//! connection stays a tunnel the egress point cannot read.

use crate::inject::Injector;
use crate::policy::Target;
use crate::proxy::{self, Body, Ctx, Flow};
use crate::tls;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};

/// Idle upstream connections kept per name and port.
const IDLE_PER_HOST: usize = 8;

/// Upstream connections waiting for their next request.
#[derive(Default)]
pub struct Pool(Mutex<HashMap<HostPort, Vec<SendRequest<Incoming>>>>);

/// An intercepted name and port.
type HostPort = (String, u16);

impl Pool {
    fn take(&self, key: &HostPort) -> Option<SendRequest<Incoming>> {
        let mut m = self.0.lock().ok()?;
        let list = m.get_mut(key)?;
        while let Some(s) = list.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, key: HostPort, s: SendRequest<Incoming>) {
        if let Ok(mut m) = self.0.lock() {
            let list = m.entry(key).or_default();
            list.retain(|s| !s.is_closed());
            if list.len() < IDLE_PER_HOST {
                list.push(s);
            }
        }
    }
}

/// Terminate the guest's TLS on `io` (its ClientHello already checked
/// against the flow) and serve its requests.
pub(crate) async fn serve<S>(io: S, flow: Flow, injector: Arc<Injector>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Target::Name(name) = &flow.target else {
        return;
    };
    let config = match injector.authority.server_config(name) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%name, "egress interception: {e}");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(proxy::HEADER_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The guest does not trust the keystone CA (or gave up).
            let d = proxy::deny(format!(
                "the guest's TLS with keystone's certificate for {name} failed: {e}"
            ));
            flow.ctx.log.record("tls", name, flow.port, &d);
            return;
        }
        Err(_) => return,
    };
    let flow = Arc::new(flow);
    let svc = hyper::service::service_fn(move |req| {
        let flow = flow.clone();
        async move { Ok::<_, Infallible>(request(&flow, req).await) }
    });
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy::HEADER_TIMEOUT)
        .half_close(true)
        .max_buf_size(proxy::MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades()
        .await;
    if let Err(e) = r {
        tracing::debug!("egress intercepted connection: {e}");
    }
}

async fn request(flow: &Flow, mut req: Request<Incoming>) -> Response<Body> {
    let ctx = &flow.ctx;
    if let Some(refused) = proxy::check_host(flow, &req) {
        return refused;
    }
    let policy = ctx.policy();
    let d = policy.decide(&flow.target, flow.port);
    if !d.allowed {
        ctx.log
            .record("https", &flow.target.to_string(), flow.port, &d);
        return proxy::denied(ctx, &flow.target, flow.port, &d.rule);
    }
    let Target::Name(name) = &flow.target else {
        return proxy::text(StatusCode::BAD_GATEWAY, "keystone egress: no name\n".into());
    };
    let upgrade = proxy::wants_upgrade(req.headers());
    let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    match path.parse::<Uri>() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => {
            return proxy::text(
                StatusCode::BAD_REQUEST,
                "keystone egress: bad path\n".into(),
            )
        }
    }
    proxy::strip_hop_by_hop(req.headers_mut(), upgrade);
    if !req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(name) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let key = (name.clone(), flow.port);
    // An upgrade takes its connection for good: never a pooled one.
    let pooled = if upgrade {
        None
    } else {
        ctx.tls_pool.take(&key)
    };
    let mut sender = match pooled {
        Some(s) => s,
        None => match dial(ctx, &flow.target, name, flow.port).await {
            Ok(s) => s,
            Err(resp) => return resp,
        },
    };
    // The credentials current now (a rotated value applies to the next
    // request, on connections already open too), put in only once an
    // upstream whose certificate this host trusts is connected.
    if let Some(inj) = ctx.credentials.get() {
        let out = inj.apply(
            &flow.target,
            flow.port,
            true,
            req.headers_mut(),
            &ctx.credentials.counters,
        );
        proxy::record_credentials(ctx, "https", &flow.target, flow.port, &out);
    }
    let mut resp =
        match tokio::time::timeout(proxy::RESPONSE_TIMEOUT, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return proxy::text(
                    StatusCode::BAD_GATEWAY,
                    format!("keystone egress: {name} port {}: {e}\n", flow.port),
                )
            }
            Err(_) => {
                return proxy::text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "keystone egress: {name} port {} sent no response\n",
                        flow.port
                    ),
                )
            }
        };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(d), Ok(u)) = tokio::join!(downstream, up) else {
                    return;
                };
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
            });
        }
    } else {
        proxy::strip_hop_by_hop(resp.headers_mut(), false);
        if !upgrade {
            // Back to the pool once this response has been read through.
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    ctx.tls_pool.put(key, sender);
                }
            });
        }
    }
    resp.map(|b| b.boxed())
}

/// A new upstream connection: the pinned address, TLS verified with the
/// host's roots for `name`.
async fn dial(
    ctx: &Arc<Ctx>,
    target: &Target,
    name: &str,
    port: u16,
) -> Result<SendRequest<Incoming>, Response<Body>> {
    let policy = ctx.policy();
    let tcp = match ctx.connect(target, port, &policy).await {
        Ok(s) => s,
        Err(r) => return Err(proxy::refusal(ctx, "https", target, port, &r)),
    };
    let config = tls::upstream_config().map_err(|e| {
        tracing::warn!("egress interception: {e}");
        proxy::text(StatusCode::BAD_GATEWAY, format!("keystone egress: {e}\n"))
    })?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| {
        proxy::text(
            StatusCode::BAD_GATEWAY,
            format!("keystone egress: {name}: {e}\n"),
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match tokio::time::timeout(
        crate::upstream::CONNECT_TIMEOUT,
        connector.connect(server, tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Most often a certificate this host does not trust: nothing
            // with a real value was sent.
            let why =
                format!("{name}'s TLS certificate was refused by this host's trust store: {e}");
            ctx.log
                .record("https", name, port, &proxy::deny(why.clone()));
            return Err(proxy::text(
                StatusCode::BAD_GATEWAY,
                format!("keystone egress: {why}. Nothing was sent to it.\n"),
            ));
        }
        Err(_) => {
            return Err(proxy::text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("keystone egress: TLS to {name} port {port} timed out\n"),
            ))
        }
    };
    let (sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(tls)).await {
            Ok(x) => x,
            Err(e) => {
                return Err(proxy::text(
                    StatusCode::BAD_GATEWAY,
                    format!("keystone egress: {name} port {port}: {e}\n"),
                ))
            }
        };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("egress intercepted upstream: {e}");
        }
    });
    Ok(sender)
}
