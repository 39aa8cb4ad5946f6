//! One client of a session on a host pseudo-terminal: the same ssh command
//! the terminal attach runs, with the PTY standing in for the user's
//! terminal, so the guest sees an ordinary terminal client (window size,
//! SIGWINCH, TERM) and the multiplexer shares its session with every other
//! client.

use nix::pty::{openpty, Winsize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use tokio::sync::mpsc as async_mpsc;

pub struct Pty {
    master: File,
    child: Option<Child>,
    input: mpsc::Sender<Vec<u8>>,
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Pty {
    /// Starts `cmd` on a new PTY of `cols`×`rows`; everything it writes
    /// arrives on the returned receiver, which ends when the command does.
    pub fn spawn(
        mut cmd: Command,
        cols: u16,
        rows: u16,
    ) -> std::io::Result<(Pty, async_mpsc::Receiver<Vec<u8>>)> {
        let pty = openpty(Some(&winsize(cols, rows)), None).map_err(std::io::Error::from)?;
        let slave: OwnedFd = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork
        // and exec. A new session whose controlling terminal is the PTY:
        // ssh then reads window-size changes (SIGWINCH) and sends them on,
        // and sees a terminal on stdin, as under a real terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        // The parent's copies of the slave are closed with `cmd`, so the
        // reader sees EOF/EIO once the command exits.
        drop(cmd);
        let master = File::from(pty.master);
        let mut reader = master.try_clone()?;
        let mut writer = master.try_clone()?;
        let (out_tx, out_rx) = async_mpsc::channel::<Vec<u8>>(64);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for bytes in in_rx {
                if writer.write_all(&bytes).is_err() {
                    break;
                }
            }
        });
        Ok((
            Pty {
                master,
                child: Some(child),
                input: in_tx,
            },
            out_rx,
        ))
    }

    /// Keys typed in the client.
    pub fn write(&self, bytes: Vec<u8>) {
        let _ = self.input.send(bytes);
    }

    /// The kernel signals the PTY's foreground process (ssh), which tells
    /// the guest; the multiplexer redraws for the new size.
    pub fn resize(&self, cols: u16, rows: u16) {
        let ws = winsize(cols, rows);
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which
        // lives across the call; the fd is our open PTY master.
        unsafe {
            libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ as _, &ws);
        }
    }
}

impl Drop for Pty {
    /// The browser went away: end this client's ssh (the guest's client
    /// then detaches; the session goes on) and reap it off-thread.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}
