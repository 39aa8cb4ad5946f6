//! One long-lived SSH connection per sandbox, in-process (russh), over the
//! same Unix socket the OpenSSH client reaches through `__connect`.
//!
//! Why in-process and not OpenSSH's ControlMaster forwarding: a new
//! upstream connection is then one `direct-tcpip` channel open on a
//! connection we already hold (no extra process hop, no mux socket, no
//! forwarding state to rebuild when the master times out), and the port
//! discovery's poll is an exec channel on the same connection rather than
//! an `ssh` process a second. The guest's host key is pinned exactly as the
//! generated ssh_config pins it (the sandbox's `known_hosts`), and the
//! client key is the sandbox's own.

use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Bounds for bringing the SSH connection up (handshake + auth).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the sandbox's SSH socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    #[error("the guest refused our key")]
    Auth,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The guest's sshd could not connect to the port (nothing listens).
    #[error("nothing is listening on {host}:{port} inside the sandbox")]
    Refused { host: String, port: u16 },
}

/// How to reach one sandbox's sshd, and the connection once made.
pub struct Link {
    pub socket: PathBuf,
    pub client_key: PathBuf,
    pub known_hosts: PathBuf,
    handle: Mutex<Option<Arc<Handle<Pinned>>>>,
}

/// Accepts exactly the host key pinned in the sandbox's `known_hosts`.
pub struct Pinned {
    key: PublicKey,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data() == self.key.key_data(),
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

impl Link {
    pub fn new(socket: PathBuf, ssh_dir: PathBuf) -> Link {
        Link {
            socket,
            client_key: ssh_dir.join(keystone_channel::keys::CLIENT_KEY),
            known_hosts: ssh_dir.join(keystone_channel::keys::KNOWN_HOSTS),
            handle: Mutex::new(None),
        }
    }

    /// The connection, made (or remade, if it dropped) on demand.
    async fn handle(&self) -> Result<Arc<Handle<Pinned>>, LinkError> {
        let mut slot = self.handle.lock().await;
        if let Some(h) = slot.as_ref().filter(|h| !h.is_closed()) {
            return Ok(h.clone());
        }
        *slot = None;
        let h = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
        let h = Arc::new(h);
        *slot = Some(h.clone());
        Ok(h)
    }

    /// Forget the connection (the sandbox stopped, or it failed).
    pub async fn reset(&self) {
        *self.handle.lock().await = None;
    }

    async fn connect(&self) -> Result<Handle<Pinned>, LinkError> {
        let pinned = self.pinned_key()?;
        let key =
            russh::keys::load_secret_key(&self.client_key, None).map_err(|e| LinkError::Key {
                path: self.client_key.clone(),
                source: Box::new(e),
            })?;
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| LinkError::Socket {
                path: self.socket.clone(),
                source,
            })?;
        let config = Arc::new(client::Config {
            // Same liveness rule as the ssh_config: 15 s × 4.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            // Defaults (2 MiB window, 32 KiB packets) are tuned for bulk
            // transfer; dev-server responses are mostly small.
            ..Default::default()
        });
        let mut handle = client::connect_stream(config, stream, Pinned { key: pinned }).await?;
        let auth = handle
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await?;
        if !auth.success() {
            return Err(LinkError::Auth);
        }
        Ok(handle)
    }

    fn pinned_key(&self) -> Result<PublicKey, LinkError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| LinkError::Key {
            path: self.known_hosts.clone(),
            source,
        };
        let text = std::fs::read_to_string(&self.known_hosts).map_err(|e| err(Box::new(e)))?;
        // `<alias> <kind> <base64>`, written by keystone_channel::keys.
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .ok_or_else(|| err("no host key in it".into()))?;
        let key = line.split_once(' ').map(|(_, k)| k).unwrap_or(line);
        PublicKey::from_openssh(key.trim()).map_err(|e| err(Box::new(e)))
    }

    /// A TCP connection to `host:port` as the guest sees it (a
    /// `direct-tcpip` channel).
    pub async fn open_tcp(
        &self,
        host: &str,
        port: u16,
    ) -> Result<ChannelStream<client::Msg>, LinkError> {
        let handle = self.handle().await?;
        match handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
        {
            Ok(ch) => Ok(ch.into_stream()),
            Err(russh::Error::ChannelOpenFailure(_)) => Err(LinkError::Refused {
                host: host.into(),
                port,
            }),
            Err(e) => {
                self.reset().await;
                Err(e.into())
            }
        }
    }

    /// Run a shell command in the guest; its stdout, if it exits 0.
    pub async fn exec(&self, command: &str, limit: Duration) -> Result<String, LinkError> {
        let run = async {
            let handle = self.handle().await?;
            let mut ch = handle.channel_open_session().await?;
            ch.exec(true, command).await?;
            let mut out = Vec::new();
            let mut status = None;
            while let Some(msg) = ch.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    _ => {}
                }
            }
            match status {
                Some(0) => Ok(String::from_utf8_lossy(&out).into_owned()),
                other => Err(LinkError::Ssh(russh::Error::IO(std::io::Error::other(
                    format!("`{command}` exited with {other:?}"),
                )))),
            }
        };
        match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => {
                self.reset().await;
                Err(LinkError::Timeout(limit))
            }
        }
    }
}
