//! `keystone agent ssh`: an interactive shell, or (`--port`) the sandbox's
//! SSH server served on 127.0.0.1 for clients that cannot use our
//! ProxyCommand.

use crate::cli::SshArgs;
use crate::context::Ctx;
use crate::error::{CliError, Result};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

pub fn run(args: SshArgs) -> Result<i32> {
    let ctx = Ctx::new()?;
    let sb = ctx.resolve(args.sandbox.as_deref())?;
    ctx.require_running(&sb)?;
    let channel = ctx.channel(&sb)?;
    match args.port {
        None => {
            let status = channel.ssh()?.arg("-t").arg(&channel.alias).status()?;
            Ok(status.code().unwrap_or(255))
        }
        Some(port) => {
            let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
                CliError::state(format!(
                    "cannot listen on 127.0.0.1:{port}: {e}; pick another --port"
                ))
            })?;
            println!(
                "serving sandbox {}'s SSH on 127.0.0.1:{port} until interrupted; connect with:\n  ssh -p {port} -i {} -o UserKnownHostsFile={} -o HostKeyAlias={} agent@127.0.0.1",
                sb.name,
                channel.ssh_dir.join(keystone_channel::keys::CLIENT_KEY).display(),
                channel.ssh_dir.join(keystone_channel::keys::KNOWN_HOSTS).display(),
                channel.alias
            );
            for conn in listener.incoming().flatten() {
                let socket = channel.socket.clone();
                std::thread::spawn(move || {
                    if let Err(e) = bridge(conn, &socket) {
                        tracing::warn!("ssh forward: {e}");
                    }
                });
            }
            Ok(0)
        }
    }
}

/// Pump one TCP client to the sandbox's SSH socket and back.
fn bridge(conn: TcpStream, socket: &Path) -> std::io::Result<()> {
    let up = UnixStream::connect(socket)?;
    let (mut from_client, mut to_guest) = (conn.try_clone()?, up.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_guest);
        let _ = to_guest.shutdown(Shutdown::Write);
    });
    let (mut from_guest, mut to_client) = (up, conn);
    let _ = std::io::copy(&mut from_guest, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}
