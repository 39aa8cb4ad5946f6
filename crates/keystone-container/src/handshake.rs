//! The one channel between the supervisor and the sandbox's first process
//! C during start (youki's `process/message.rs` plays the same part): a
//! `SOCK_SEQPACKET` pair, so each message arrives whole and the end of
//! the peer (its exit, or G's exec, which closes its copy) reads as
//! [`Received::Closed`].
//!
//! The order: C says [`Msg::UserNamespace`] once it has unshared its user
//! namespace; the supervisor writes the id maps and answers
//! [`Msg::IdsMapped`]; C forks G and says [`Msg::Pid1`] with G's host pid.
//! Either C or G may instead say [`Msg::Failed`] with the reason, which the
//! supervisor puts in its error.

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use std::os::fd::{AsRawFd, OwnedFd};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// C has its user namespace: map its ids.
    UserNamespace,
    /// The supervisor has written C's id maps.
    IdsMapped,
    /// G, the sandbox's PID 1, by its host pid.
    Pid1(i32),
    /// Start failed inside; the reason.
    Failed(String),
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Msg(Msg),
    /// The other end is gone (exited, or exec'd: the ends are CLOEXEC).
    Closed,
    /// Non-blocking receive: nothing there.
    Empty,
}

/// One end of the channel.
pub struct Channel(OwnedFd);

/// A connected pair: the supervisor's end and C's.
pub fn pair() -> nix::Result<(Channel, Channel)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((Channel(a), Channel(b)))
}

const MAX: usize = 4096;

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::UserNamespace => vec![b'u'],
            Msg::IdsMapped => vec![b'g'],
            Msg::Pid1(pid) => {
                let mut v = vec![b'p'];
                v.extend_from_slice(&pid.to_le_bytes());
                v
            }
            Msg::Failed(why) => {
                let mut v = vec![b'e'];
                v.extend(why.bytes().take(MAX - 1));
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        match b.split_first()? {
            (b'u', []) => Some(Msg::UserNamespace),
            (b'g', []) => Some(Msg::IdsMapped),
            (b'p', rest) => Some(Msg::Pid1(i32::from_le_bytes(rest.try_into().ok()?))),
            (b'e', rest) => Some(Msg::Failed(String::from_utf8_lossy(rest).into_owned())),
            _ => None,
        }
    }
}

impl Channel {
    /// Send one message. Safe in a forked child (one `send`; the message's
    /// bytes are built first).
    pub fn send(&self, msg: &Msg) -> Result<(), String> {
        let bytes = msg.encode();
        loop {
            match send(self.0.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("handshake: {e}")),
            }
        }
    }

    fn recv_with(&self, flags: MsgFlags) -> Received {
        let mut buf = [0u8; MAX];
        loop {
            match recv(self.0.as_raw_fd(), &mut buf, flags) {
                Ok(0) => return Received::Closed,
                Ok(n) => {
                    return match Msg::decode(&buf[..n]) {
                        Some(m) => Received::Msg(m),
                        None => Received::Msg(Msg::Failed(format!(
                            "handshake: a message that is not one ({n} bytes)"
                        ))),
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Received::Empty,
                Err(_) => return Received::Closed,
            }
        }
    }

    /// Wait for the next message.
    pub fn recv(&self) -> Received {
        self.recv_with(MsgFlags::empty())
    }

    /// Every `Failed` reason already waiting, without blocking: what the
    /// sandbox said before a start that failed.
    pub fn pending_failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Received::Msg(m) = self.recv_with(MsgFlags::MSG_DONTWAIT) {
            if let Msg::Failed(why) = m {
                out.push(why);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_whole_and_in_order_then_closed() {
        let (a, b) = pair().expect("pair");
        for m in [
            Msg::UserNamespace,
            Msg::Pid1(4_194_303),
            Msg::Failed("mount /proc: EPERM".into()),
        ] {
            b.send(&m).expect("send");
        }
        assert_eq!(a.recv(), Received::Msg(Msg::UserNamespace));
        assert_eq!(a.recv(), Received::Msg(Msg::Pid1(4_194_303)));
        drop(b);
        assert_eq!(a.pending_failures(), vec!["mount /proc: EPERM".to_string()]);
        assert_eq!(a.recv(), Received::Closed);
    }

    #[test]
    fn garbage_is_reported_not_trusted() {
        assert_eq!(Msg::decode(b"p\x01"), None);
        assert_eq!(Msg::decode(b"x"), None);
        assert_eq!(Msg::decode(b""), None);
        assert_eq!(Msg::decode(&Msg::IdsMapped.encode()), Some(Msg::IdsMapped));
    }
}
