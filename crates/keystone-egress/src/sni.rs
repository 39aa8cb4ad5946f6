//! Reading the server name from a TLS ClientHello, without terminating TLS.
//!
//! The name a tunnel was allowed for (CONNECT authority, or the pool name
//! a captured address stands for) must be the name the client asks the
//! server for; otherwise a tunnel to an allowed CDN front could carry a
//! handshake for any host behind it (gh-aw-firewall #8878). A small strict
//! parser rather than `tls-parser` (which brings `nom` and `phf`): it
//! reassembles the handshake across records, and refuses anything that is
//! not exactly one well-formed ClientHello, duplicate extensions, and
//! server_name lists that are not exactly one host_name.

/// The most ClientHello bytes we buffer (records and all) before giving up.
pub const MAX_HELLO: usize = 64 * 1024;

/// What the bytes so far are.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello; its server_name, if any (not yet validated
    /// as a host name).
    Complete(Option<String>),
    /// A plausible prefix: read more.
    Incomplete,
    /// Not a ClientHello we accept.
    Invalid(String),
}

/// Does this look like the start of a TLS handshake record?
pub fn is_tls(first: &[u8]) -> bool {
    first.first() == Some(&0x16)
}

/// Parse the ClientHello at the start of `buf` (TLS records).
pub fn parse(buf: &[u8]) -> Hello {
    let mut hs = Vec::new();
    let mut at = 0;
    loop {
        // Enough handshake bytes for the whole message?
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Hello::Invalid(format!("handshake type {} is not ClientHello", hs[0]));
            }
            let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if len + 4 > MAX_HELLO {
                return Hello::Invalid(format!("ClientHello of {len} bytes"));
            }
            if hs.len() >= len + 4 {
                return match client_hello(&hs[4..4 + len]) {
                    Ok(sni) => Hello::Complete(sni),
                    Err(e) => Hello::Invalid(e),
                };
            }
        }
        if buf.len() < at + 5 {
            return Hello::Incomplete;
        }
        let rec = &buf[at..at + 5];
        if rec[0] != 0x16 {
            return Hello::Invalid(format!("record type {} inside the ClientHello", rec[0]));
        }
        if rec[1] != 3 {
            return Hello::Invalid(format!("record version {}.{}", rec[1], rec[2]));
        }
        let len = u16::from_be_bytes([rec[3], rec[4]]) as usize;
        if len == 0 || len > 16384 {
            return Hello::Invalid(format!("record of {len} bytes"));
        }
        if buf.len() < at + 5 + len {
            return Hello::Incomplete;
        }
        hs.extend_from_slice(&buf[at + 5..at + 5 + len]);
        at += 5 + len;
        if at > MAX_HELLO {
            return Hello::Invalid("ClientHello too large".into());
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("ClientHello truncated in {what}"))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<usize, String> {
        Ok(self.take(1, what)?[0] as usize)
    }
    fn u16(&mut self, what: &str) -> Result<usize, String> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]) as usize)
    }
    fn vec8(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u8(what)?;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn client_hello(body: &[u8]) -> Result<Option<String>, String> {
    let mut r = Reader { b: body, at: 0 };
    let version = r.take(2, "version")?;
    if version[0] != 3 {
        return Err(format!("client version {}.{}", version[0], version[1]));
    }
    r.take(32, "random")?;
    if r.vec8("session id")?.len() > 32 {
        return Err("session id over 32 bytes".into());
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list".into());
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err("no compression methods".into());
    }
    if r.done() {
        return Ok(None); // no extensions at all
    }
    let exts = r.vec16("extensions")?;
    if !r.done() {
        return Err("bytes after the extensions".into());
    }
    let mut e = Reader { b: exts, at: 0 };
    let mut seen = std::collections::HashSet::new();
    let mut sni = None;
    while !e.done() {
        let ty = e.u16("extension type")?;
        let data = e.vec16("extension")?;
        if !seen.insert(ty) {
            return Err(format!("extension {ty} appears twice"));
        }
        if ty == 0 {
            sni = Some(server_name(data)?);
        }
    }
    Ok(sni)
}

fn server_name(data: &[u8]) -> Result<String, String> {
    let mut r = Reader { b: data, at: 0 };
    let list = r.vec16("server_name list")?;
    if !r.done() {
        return Err("bytes after the server_name list".into());
    }
    let mut l = Reader { b: list, at: 0 };
    if l.u8("name type")? != 0 {
        return Err("server_name is not a host_name".into());
    }
    let name = l.vec16("host_name")?;
    if !l.done() {
        return Err("more than one server_name".into());
    }
    if name.is_empty() {
        return Err("empty server_name".into());
    }
    String::from_utf8(name.to_vec()).map_err(|_| "server_name is not ASCII".into())
}

/// A minimal ClientHello (one record): for tests, here and in
/// `tests/`. `sni: None` leaves the extension out.
#[doc(hidden)]
pub fn build_client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let mut list = vec![0u8];
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(&data);
    }
    // supported_versions: TLS 1.3, to look like a modern client.
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x42; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sni() {
        let h = build_client_hello(Some("api.example.com"));
        assert_eq!(parse(&h), Hello::Complete(Some("api.example.com".into())));
        assert_eq!(parse(&build_client_hello(None)), Hello::Complete(None));
    }

    #[test]
    fn incomplete_until_whole() {
        let h = build_client_hello(Some("api.example.com"));
        for cut in [0, 1, 4, 5, 20, h.len() - 1] {
            assert_eq!(parse(&h[..cut]), Hello::Incomplete, "cut {cut}");
        }
    }

    #[test]
    fn reassembles_across_records() {
        let h = build_client_hello(Some("api.example.com"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two), Hello::Complete(Some("api.example.com".into())));
    }

    #[test]
    fn refuses_oddities() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Hello::Invalid(_)));
        let mut h = build_client_hello(Some("a.com"));
        h[5] = 2; // ServerHello
        assert!(matches!(parse(&h), Hello::Invalid(_)));
        // Duplicate SNI extension.
        let h = build_client_hello(Some("a.com"));
        let body_len = h.len();
        let mut dup = h.clone();
        let ext = {
            let n = b"b.com";
            let mut e = vec![
                0,
                0,
                0,
                (n.len() + 5) as u8,
                0,
                (n.len() + 3) as u8,
                0,
                0,
                n.len() as u8,
            ];
            e.extend_from_slice(n);
            e
        };
        dup.extend_from_slice(&ext);
        // Fix up the lengths: record, handshake, extensions.
        let add = ext.len();
        let rec = u16::from_be_bytes([dup[3], dup[4]]) as usize + add;
        dup[3..5].copy_from_slice(&(rec as u16).to_be_bytes());
        let hsl = u32::from_be_bytes([0, dup[6], dup[7], dup[8]]) as usize + add;
        dup[6..9].copy_from_slice(&(hsl as u32).to_be_bytes()[1..]);
        // The extensions length sits right after compression methods.
        let ext_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        let el = u16::from_be_bytes([dup[ext_at], dup[ext_at + 1]]) as usize + add;
        dup[ext_at..ext_at + 2].copy_from_slice(&(el as u16).to_be_bytes());
        assert_eq!(dup.len(), body_len + add);
        assert!(matches!(parse(&dup), Hello::Invalid(e) if e.contains("twice")));
    }
}
