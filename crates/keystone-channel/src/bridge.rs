//! Byte pumps between the ssh client and the guest's sshd.
//!
//! [`stdio_to_unix`] is the body of the hidden `__connect` subcommand that
//! ssh runs as its ProxyCommand. [`serve_relay`] is what a backend runs,
//! inside the sandbox's network namespace, to expose the guest's sshd on a
//! host Unix socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;

/// Copy `from` to `to` until EOF, then half-close `to`'s write side.
fn pump(mut from: impl Read, mut to: impl Write, close: impl FnOnce()) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = to.flush();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    close();
}

/// Connect to `socket` and copy stdin → socket, socket → stdout until both
/// directions end.
pub fn stdio_to_unix(socket: &Path) -> io::Result<()> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the sandbox's ssh relay at {}: {e}; is the sandbox running? (`keystone agent status`)",
                socket.display()
            ),
        )
    })?;
    let writer = stream.try_clone()?;
    let up = thread::spawn(move || {
        let w = writer.try_clone();
        pump(io::stdin().lock(), writer, move || {
            if let Ok(w) = w {
                let _ = w.shutdown(Shutdown::Write);
            }
        })
    });
    pump(&stream, io::stdout().lock(), || {});
    // The guest closed its side: we are done even if stdin stays open.
    drop(up);
    Ok(())
}

/// After a failed accept: wait a little when the cause is a resource that
/// frees itself (descriptors, memory), not at all otherwise.
pub fn accept_backoff(e: &io::Error) {
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if exhausted {
        thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Accept connections on `listener` forever, connecting each to `target`
/// (from the current network namespace) and pumping both ways.
pub fn serve_relay(listener: UnixListener, target: SocketAddr) -> io::Result<()> {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning (the
                // proxy's accept loop does the same).
                accept_backoff(&e);
                continue;
            }
        };
        thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(target) else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let (Ok(c2), Ok(u2)) = (conn.try_clone(), upstream.try_clone()) else {
                return;
            };
            let down = thread::spawn(move || {
                let c3 = c2.try_clone();
                pump(u2, c2, move || {
                    if let Ok(c) = c3 {
                        let _ = c.shutdown(Shutdown::Write);
                    }
                })
            });
            let u3 = upstream.try_clone();
            pump(conn, upstream, move || {
                if let Ok(u) = u3 {
                    let _ = u.shutdown(Shutdown::Write);
                }
            });
            let _ = down.join();
        });
    }
    Ok(())
}

/// Wait until something answers on `target` with an SSH banner.
pub fn probe_ssh(target: SocketAddr, timeout: std::time::Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn relay_carries_bytes_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = echo.local_addr().expect("addr");
        thread::spawn(move || {
            for c in echo.incoming().flatten() {
                let mut r = c.try_clone().expect("clone");
                let mut w = c;
                let _ = io::copy(&mut r, &mut w);
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("relay.sock");
        let listener = UnixListener::bind(&sock).expect("bind unix");
        thread::spawn(move || serve_relay(listener, target));
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.write_all(b"hello").expect("write");
        c.shutdown(Shutdown::Write).expect("shutdown");
        let mut back = String::new();
        c.read_to_string(&mut back).expect("read");
        assert_eq!(back, "hello");
    }
}
