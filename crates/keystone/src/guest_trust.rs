//! The guest's trust stores: which certificate authorities the sandbox's
//! TLS clients accept beyond its stock Debian bundle.
//!
//! Two kinds of certificate may be added, both public:
//!
//! - keystone's CA, which signs the certificates the host-side egress proxy
//!   presents for the hosts it intercepts (to put a credential the guest
//!   never sees into a request);
//! - the host's extra CAs (`guest.trust_host_cas`): the certificates the
//!   host trusts that the guest's pristine Debian bundle lacks, typically a
//!   TLS-inspecting corporate proxy's, without which nothing in the guest
//!   reaches the network the host reaches.
//!
//! One ssh exec, as root (the agent's sudo), does all of it (each exec
//! costs about a second on an emulated VM). The host never reads the guest's bundle: it sends every
//! candidate over ssh's stdin (never on a command line), the keystone CA
//! first and then each host certificate, and the guest script (POSIX `sh`
//! and `awk`, both in the minimal image, which has no `openssl`) keeps the
//! blocks whose normalised base64 body, that is the DER, is not in the
//! pristine bundle. Fetching the guest's bundle first would take a second
//! exec, and doing both in one exec means reading and writing the same
//! ssh session in turns, which deadlocks easily. The guest prints how many
//! host certificates it kept.
//!
//! In the guest: the first run keeps the Debian bundle as
//! [`GUEST_PRISTINE`]; every run writes the kept certificates to
//! [`GUEST_CA_FILE`] (mode 0644: they are public) and, one file each, to
//! [`GUEST_LOCAL_CAS`], where a later `update-ca-certificates` (an `apt
//! install` may trigger one) picks them up again instead of dropping them;
//! and replaces [`GUEST_BUNDLE`] atomically with the pristine bundle
//! followed by them. `update-ca-certificates` itself is not run: it takes
//! tens of seconds under emulation. With nothing to add the pristine
//! bundle is put back and the two keystone copies removed, so turning the
//! setting off takes effect at the next start.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use keystone_channel::{Channel, ExecOptions};
use keystone_config::TrustHostCas;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::error::{CliError, Result};

/// The guest's system bundle (Debian's, made by `update-ca-certificates`).
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The guest's bundle as the image had it, kept by the first run.
pub const GUEST_PRISTINE: &str = "/etc/ssl/certs/ca-certificates.keystone-pristine.crt";
/// What keystone adds: its CA and the host's extra CAs, in one PEM file.
pub const GUEST_CA_FILE: &str = "/usr/local/share/keystone/ca.pem";
/// The same certificates one file each, for `update-ca-certificates`.
pub const GUEST_LOCAL_CAS: &str = "/usr/local/share/ca-certificates/keystone";

/// Where the host's bundle is looked for when `SSL_CERT_FILE` is unset:
/// Debian and Ubuntu, Fedora and RHEL, Alpine and the BSDs.
const HOST_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The host's copy of the Mozilla roots on Debian and Ubuntu. A host
/// certificate found here is a stock root, not one the host added: a host
/// on an older release may still carry roots the guest's newer Debian
/// deliberately dropped, and those must not come back into the guest.
const HOST_MOZILLA_DIR: &str = "/usr/share/ca-certificates/mozilla";

/// What the guest now trusts beyond its Debian bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trust {
    /// Variables for every guest shell, pointing the TLS stacks that keep
    /// their own root list at the bundle; empty when nothing was added.
    pub env: Vec<(String, String)>,
    /// How many of the host's certificates the guest lacked and now trusts.
    pub host_extra: usize,
    /// One line for `start` to print.
    pub summary: String,
}

/// Makes the guest trust `keystone_ca_pem` (when given) and, as `mode`
/// says, the host's extra CAs; see the module documentation.
///
/// `auto` and `always` add the same certificates (every host certificate
/// the guest lacks; the point of `auto` is the start line saying so). They
/// differ when the host's bundle cannot be read: `auto` goes on without it
/// and says why in the summary, `always` fails. `never` adds none and does
/// not read the host's bundle.
pub fn install(
    channel: &Channel,
    keystone_ca_pem: Option<&str>,
    mode: TrustHostCas,
) -> Result<Trust> {
    let keystone = match keystone_ca_pem {
        Some(pem) => {
            let certs = pem_certs(pem.as_bytes()).map_err(|e| {
                CliError::failed(format!(
                    "keystone's CA certificate is not a PEM certificate ({e}); \
                     remove keystone's CA files to have them made again"
                ))
            })?;
            if certs.is_empty() {
                return Err(CliError::failed(
                    "keystone's CA certificate holds no PEM certificate; \
                     remove keystone's CA files to have them made again",
                ));
            }
            certs
        }
        None => Vec::new(),
    };
    let (host, note) = match mode {
        TrustHostCas::Never => (Vec::new(), None),
        TrustHostCas::Auto | TrustHostCas::Always => {
            match host_candidates(std::env::var_os("SSL_CERT_FILE")) {
                Ok(certs) => (certs, None),
                Err(e) if mode == TrustHostCas::Auto => (Vec::new(), Some(e)),
                Err(e) => {
                    return Err(CliError::failed(format!(
                        "{e}; fix it, or set guest.trust_host_cas = \"auto\" to start without \
                         the host's CAs (\"never\" not to use them at all)"
                    )))
                }
            }
        }
    };
    let payload = payload(&keystone, &host);
    let output = run_in_guest(channel, &payload)?;
    let counts = parse_counts(&output).ok_or_else(|| {
        CliError::failed(format!(
            "could not update the sandbox's trust store: unexpected output {:?}",
            output.trim()
        ))
    })?;
    Ok(Trust {
        env: trust_env(counts.keystone + counts.host_extra > 0),
        host_extra: counts.host_extra,
        summary: summary(
            counts.keystone > 0,
            counts.host_extra,
            mode,
            note.as_deref(),
        ),
    })
}

/// Runs the guest script as root (sudo), `payload` on its stdin; its stdout.
fn run_in_guest(channel: &Channel, payload: &str) -> Result<String> {
    // As the agent through its passwordless sudo, not as root: the agent's
    // ssh connection is already up (its control master), while root's
    // would be a new handshake, seconds under software emulation.
    let mut cmd = channel.command(
        &format!("sudo -n sh -c {}", shell_words::quote(&guest_script(""))),
        &ExecOptions {
            user: Some("agent".into()),
            cwd: Some("/".into()),
            tty: false,
        },
    )?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::failed(format!("cannot run ssh: {e}")))?;
    let stdin = child.stdin.take();
    // Written from a thread while the output is read, so neither side can
    // block the other; a script that died early shows in its stderr, not
    // as a broken pipe here.
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(payload.as_bytes());
            }
        });
        child.wait_with_output()
    })?;
    if !out.status.success() {
        return Err(CliError::failed(format!(
            "could not update the sandbox's trust store (exit {}): {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The DER of every `CERTIFICATE` block of a PEM text (other blocks are
/// skipped); the first malformed block is an error.
pub(crate) fn pem_certs(pem: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let cert = item.map_err(|e| e.to_string())?;
        certs.push(cert.as_ref().to_vec());
    }
    Ok(certs)
}

/// A certificate as canonical PEM: standard base64 in 64-column lines, the
/// form Debian's bundle has, so the guest can compare bodies as text.
pub(crate) fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The host's bundle: `$SSL_CERT_FILE` when set, else the first of
/// [`HOST_BUNDLES`] that exists.
pub(crate) fn host_bundle_path(ssl_cert_file: Option<OsString>) -> Option<PathBuf> {
    if let Some(path) = ssl_cert_file.filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    HOST_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The host's certificates the guest may lack: its bundle less the stock
/// Mozilla roots it has a copy of. No bundle at all is no certificate.
fn host_candidates(ssl_cert_file: Option<OsString>) -> std::result::Result<Vec<Vec<u8>>, String> {
    let Some(path) = host_bundle_path(ssl_cert_file) else {
        return Ok(Vec::new());
    };
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read the host's CA bundle {} ({e}; it is $SSL_CERT_FILE when set)",
            path.display()
        )
    })?;
    let bundle = pem_certs(&bytes).map_err(|e| {
        format!(
            "the host's CA bundle {} is not valid PEM ({e})",
            path.display()
        )
    })?;
    Ok(without_stock(
        bundle,
        &stock_roots(Path::new(HOST_MOZILLA_DIR)),
    ))
}

/// The DER of every `*.crt` in `dir` (unreadable ones skipped: this only
/// narrows the candidates).
fn stock_roots(dir: &Path) -> HashSet<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "crt"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| pem_certs(&bytes).ok())
        .flatten()
        .collect()
}

/// `certs` without the ones in `stock` and without repeats, in order.
pub(crate) fn without_stock(certs: Vec<Vec<u8>>, stock: &HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut seen = HashSet::new();
    certs
        .into_iter()
        .filter(|c| !stock.contains(c) && seen.insert(c.clone()))
        .collect()
}

/// The guest script's stdin: the keystone CA's blocks after a
/// `# keystone-ca` line, the host's after a `# host` line.
pub(crate) fn payload(keystone: &[Vec<u8>], host: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for (marker, certs) in [("# keystone-ca\n", keystone), ("# host\n", host)] {
        if !certs.is_empty() {
            out.push_str(marker);
            certs.iter().for_each(|c| out.push_str(&to_pem(c)));
        }
    }
    out
}

/// The variables every guest shell gets when something was added: the TLS
/// stacks that ignore the system bundle are pointed at it. curl, git, apt,
/// wget and Go read the system bundle already.
pub(crate) fn trust_env(added: bool) -> Vec<(String, String)> {
    if !added {
        return Vec::new();
    }
    [
        // Node (Claude Code, Gemini CLI) keeps its own root list and adds
        // this file's certificates to it.
        ("NODE_EXTRA_CA_CERTS", GUEST_CA_FILE),
        // OpenSSL-based tools and Rust's rustls-native-certs.
        ("SSL_CERT_FILE", GUEST_BUNDLE),
        // Python requests and pip use certifi's copy otherwise.
        ("REQUESTS_CA_BUNDLE", GUEST_BUNDLE),
        ("PIP_CERT", GUEST_BUNDLE),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The guest script's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    /// keystone CA certificates the guest now trusts.
    pub keystone: usize,
    /// Host certificates the guest lacked and now trusts.
    pub host_extra: usize,
}

/// Reads the script's last line, `keystone-trust host_extra=N keystone=K`.
pub(crate) fn parse_counts(output: &str) -> Option<Counts> {
    let line = output.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut words = line.split_whitespace();
    if words.next()? != "keystone-trust" {
        return None;
    }
    let mut value = |name: &str| {
        words
            .next()?
            .strip_prefix(name)?
            .strip_prefix('=')?
            .parse()
            .ok()
    };
    let host_extra = value("host_extra")?;
    let keystone = value("keystone")?;
    Some(Counts {
        keystone,
        host_extra,
    })
}

/// The start line: what the guest trusts beyond Debian's bundle, and why.
pub(crate) fn summary(
    keystone: bool,
    host_extra: usize,
    mode: TrustHostCas,
    note: Option<&str>,
) -> String {
    let mut parts = Vec::new();
    if keystone {
        parts.push("keystone CA (intercepted hosts)".to_string());
    }
    if host_extra > 0 {
        let s = if host_extra == 1 { "" } else { "s" };
        parts.push(format!("{host_extra} host CA{s} the Debian bundle lacks"));
    }
    let what = if parts.is_empty() {
        "the Debian bundle only".to_string()
    } else {
        parts.join(", ")
    };
    let why = match (mode, host_extra, note) {
        (TrustHostCas::Never, _, _) => "; host CAs not added".to_string(),
        (_, _, Some(note)) => format!("; host CAs not added: {note}"),
        (_, 0, None) => "; the host has no CA the Debian bundle lacks".to_string(),
        _ => String::new(),
    };
    format!("guest trusts: {what}{why} (guest.trust_host_cas = {mode})")
}

/// The script run as root in the guest, every path under `root` ("" in the
/// guest; a temporary directory in the tests). Its stdin is [`payload`];
/// its last line of output is read by [`parse_counts`].
pub(crate) fn guest_script(root: &str) -> String {
    let q = |p: &str| shell_words::quote(&format!("{root}{p}")).into_owned();
    let dir = Path::new(GUEST_CA_FILE)
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    format!(
        r#"set -eu
umask 022
B={bundle}; P={pristine}; D={dir}; C={ca}; L={local}
if [ ! -e "$P" ]; then
  if [ -f "$B" ]; then cp "$B" "$P.tmp"; else : > "$P.tmp"; fi
  mv -f "$P.tmp" "$P"
fi
mkdir -p "$D"
rm -rf "$L.tmp"; mkdir -p "$L.tmp"
: > "$C.tmp"
counts=$(awk -v out="$C.tmp" -v dir="$L.tmp" '{awk}' phase=pristine "$P" phase=input -)
if [ -s "$C.tmp" ]; then
  chmod 0644 "$C.tmp"; mv -f "$C.tmp" "$C"
  rm -rf "$L"; mv "$L.tmp" "$L"
  {{ cat "$P"; if [ -s "$P" ] && [ -n "$(tail -c 1 "$P")" ]; then echo; fi; cat "$C"; }} > "$B.keystone-tmp"
else
  rm -f "$C.tmp" "$C"; rm -rf "$L" "$L.tmp"
  cat "$P" > "$B.keystone-tmp"
fi
chmod 0644 "$B.keystone-tmp"; mv -f "$B.keystone-tmp" "$B"
echo "$counts"
"#,
        bundle = q(GUEST_BUNDLE),
        pristine = q(GUEST_PRISTINE),
        dir = q(&dir),
        ca = q(GUEST_CA_FILE),
        local = q(GUEST_LOCAL_CAS),
        awk = AWK,
    )
}

/// Reads the pristine bundle (`phase=pristine`), remembering each
/// certificate's body with blanks removed, then the payload
/// (`phase=input`), keeping each certificate whose body is new: into
/// `out`, and one file each into `dir`. Prints the counts. No single
/// quote may appear in it (it is quoted for the shell as is).
const AWK: &str = r##"
BEGIN { kind = "host"; extra = 0; ks = 0; kept = 0 }
/^-----BEGIN CERTIFICATE-----/ { inblk = 1; body = ""; text = "-----BEGIN CERTIFICATE-----\n"; next }
inblk && /^-----END CERTIFICATE-----/ {
  inblk = 0
  text = text "-----END CERTIFICATE-----\n"
  if (phase == "pristine") { seen[body] = 1; next }
  if (body == "" || (body in seen)) next
  seen[body] = 1
  printf "%s", text > out
  kept++
  f = dir "/keystone-" kept ".crt"
  printf "%s", text > f
  close(f)
  if (kind == "host") extra++; else ks++
  next
}
inblk { line = $0; gsub(/[ \t\r]/, "", line); body = body line; text = text line "\n"; next }
phase == "input" && $0 == "# keystone-ca" { kind = "keystone"; next }
phase == "input" && $0 == "# host" { kind = "host"; next }
END { close(out); printf "keystone-trust host_extra=%d keystone=%d\n", extra, ks }
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Three distinct fake certificates (DER need not be valid X.509 for
    /// the PEM layer).
    fn der(n: u8) -> Vec<u8> {
        (0..100u8)
            .map(|i| i.wrapping_mul(n).wrapping_add(n))
            .collect()
    }

    #[test]
    fn pem_blocks_split_and_round_trip_through_der() {
        let text = format!(
            "# comment\n{}\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{}",
            to_pem(&der(1)),
            to_pem(&der(2)).replace('\n', "\r\n")
        );
        assert_eq!(pem_certs(text.as_bytes()), Ok(vec![der(1), der(2)]));
        assert_eq!(pem_certs(b"no pem here"), Ok(Vec::new()));
        assert!(
            pem_certs(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
        let pem = to_pem(&[7u8; 100]);
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        assert_eq!(pem.lines().count(), 2 + 3);
    }

    #[test]
    fn candidates_drop_stock_roots_and_repeats() {
        let stock: HashSet<Vec<u8>> = [der(2)].into_iter().collect();
        assert_eq!(
            without_stock(vec![der(1), der(2), der(3), der(1)], &stock),
            vec![der(1), der(3)]
        );
    }

    #[test]
    fn stock_roots_are_read_from_crt_files() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("a.crt"), to_pem(&der(4))).expect("w");
        fs::write(dir.path().join("b.pem"), to_pem(&der(5))).expect("w");
        let roots = stock_roots(dir.path());
        assert!(roots.contains(&der(4)));
        assert!(!roots.contains(&der(5)));
        assert!(stock_roots(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn ssl_cert_file_names_the_host_bundle() {
        assert_eq!(
            host_bundle_path(Some("/x/bundle.pem".into())),
            Some(PathBuf::from("/x/bundle.pem"))
        );
        let fallback = host_bundle_path(Some("".into()));
        assert!(fallback.is_none_or(|p| HOST_BUNDLES.iter().any(|b| Path::new(b) == p)));
        let err =
            host_candidates(Some("/nonexistent/keystone-test.pem".into())).expect_err("missing");
        assert!(
            err.contains("cannot read the host's CA bundle /nonexistent/keystone-test.pem"),
            "{err}"
        );
    }

    #[test]
    fn the_env_is_set_only_when_something_was_added() {
        assert!(trust_env(false).is_empty());
        let env = trust_env(true);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("NODE_EXTRA_CA_CERTS"), Some(GUEST_CA_FILE));
        assert_eq!(get("SSL_CERT_FILE"), Some(GUEST_BUNDLE));
        assert_eq!(get("REQUESTS_CA_BUNDLE"), Some(GUEST_BUNDLE));
        assert_eq!(get("PIP_CERT"), Some(GUEST_BUNDLE));
        assert_eq!(get("CURL_CA_BUNDLE"), None);
    }

    #[test]
    fn counts_are_read_from_the_last_line() {
        assert_eq!(
            parse_counts("noise\nkeystone-trust host_extra=2 keystone=1\n"),
            Some(Counts {
                keystone: 1,
                host_extra: 2
            })
        );
        assert_eq!(parse_counts(""), None);
        assert_eq!(parse_counts("keystone-trust host_extra=x keystone=1"), None);
        assert_eq!(parse_counts("keystone-trust keystone=1 host_extra=2"), None);
    }

    #[test]
    fn the_summary_says_what_and_why() {
        use TrustHostCas::*;
        assert_eq!(
            summary(true, 1, Auto, None),
            "guest trusts: keystone CA (intercepted hosts), 1 host CA the Debian bundle lacks \
             (guest.trust_host_cas = auto)"
        );
        assert_eq!(
            summary(false, 3, Always, None),
            "guest trusts: 3 host CAs the Debian bundle lacks (guest.trust_host_cas = always)"
        );
        assert_eq!(
            summary(true, 0, Auto, None),
            "guest trusts: keystone CA (intercepted hosts); the host has no CA the Debian bundle \
             lacks (guest.trust_host_cas = auto)"
        );
        assert_eq!(
            summary(false, 0, Never, None),
            "guest trusts: the Debian bundle only; host CAs not added (guest.trust_host_cas = never)"
        );
        assert_eq!(
            summary(true, 0, Auto, Some("cannot read X")),
            "guest trusts: keystone CA (intercepted hosts); host CAs not added: cannot read X \
             (guest.trust_host_cas = auto)"
        );
    }

    #[test]
    fn the_payload_marks_keystone_and_host_blocks() {
        let p = payload(&[der(1)], &[der(2), der(3)]);
        assert!(
            p.starts_with("# keystone-ca\n-----BEGIN CERTIFICATE-----\n"),
            "{p}"
        );
        assert_eq!(p.matches("# host\n").count(), 1);
        assert_eq!(p.matches("BEGIN CERTIFICATE").count(), 3);
        assert_eq!(payload(&[], &[]), "");
        assert!(!payload(&[], &[der(2)]).contains("# keystone-ca"));
        assert!(!AWK.contains('\''), "the awk program is single-quoted");
    }

    /// A guest root in a temporary directory, its bundle holding `certs`.
    struct Guest {
        dir: tempfile::TempDir,
    }

    impl Guest {
        fn new(certs: &[Vec<u8>]) -> Guest {
            let dir = tempfile::tempdir().expect("tmp");
            let guest = Guest { dir };
            fs::create_dir_all(guest.path(GUEST_BUNDLE).parent().expect("dir")).expect("mkdir");
            // Debian's bundle: canonical blocks, no comments.
            let text: String = certs.iter().map(|c| to_pem(c)).collect();
            fs::write(guest.path(GUEST_BUNDLE), text).expect("w");
            guest
        }

        fn root(&self) -> String {
            self.dir.path().display().to_string()
        }

        fn path(&self, p: &str) -> PathBuf {
            PathBuf::from(format!("{}{p}", self.root()))
        }

        fn read(&self, p: &str) -> String {
            fs::read_to_string(self.path(p)).unwrap_or_default()
        }

        /// Runs the guest script with `sh`, `stdin` on its stdin.
        fn run(&self, stdin: &str) -> Counts {
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(guest_script(&self.root()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("sh");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(stdin.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("wait");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(stdout.lines().count(), 1, "only the counts: {stdout}");
            parse_counts(&stdout).expect("counts")
        }
    }

    #[test]
    fn the_guest_script_adds_what_the_bundle_lacks_and_restores_it_when_told_nothing() {
        let debian = vec![der(1), der(2)];
        let guest = Guest::new(&debian);
        let original = guest.read(GUEST_BUNDLE);

        // keystone CA + the host's bundle (which shares der(1) with the
        // guest's, and repeats der(3)).
        let counts = guest.run(&payload(&[der(9)], &[der(1), der(3), der(3)]));
        assert_eq!(
            counts,
            Counts {
                keystone: 1,
                host_extra: 1
            }
        );
        assert_eq!(guest.read(GUEST_PRISTINE), original);
        let ca = guest.read(GUEST_CA_FILE);
        assert_eq!(ca, format!("{}{}", to_pem(&der(9)), to_pem(&der(3))));
        assert_eq!(guest.read(GUEST_BUNDLE), format!("{original}{ca}"));
        assert_eq!(
            pem_certs(guest.read(GUEST_BUNDLE).as_bytes()).expect("pem"),
            vec![der(1), der(2), der(9), der(3)]
        );
        let mode = fs::metadata(guest.path(GUEST_CA_FILE))
            .expect("meta")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o644
        );
        let mut local: Vec<String> = fs::read_dir(guest.path(GUEST_LOCAL_CAS))
            .expect("local dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        local.sort();
        assert_eq!(local, ["keystone-1.crt", "keystone-2.crt"]);
        assert_eq!(
            guest.read(&format!("{GUEST_LOCAL_CAS}/keystone-2.crt")),
            to_pem(&der(3))
        );

        // A second start compares against the pristine copy, not the
        // modified bundle, and replaces what the first added.
        let counts = guest.run(&payload(&[der(9)], &[]));
        assert_eq!(
            counts,
            Counts {
                keystone: 1,
                host_extra: 0
            }
        );
        assert_eq!(guest.read(GUEST_CA_FILE), to_pem(&der(9)));
        assert_eq!(
            guest.read(GUEST_BUNDLE),
            format!("{original}{}", to_pem(&der(9)))
        );
        assert!(!guest
            .path(&format!("{GUEST_LOCAL_CAS}/keystone-2.crt"))
            .exists());

        // Nothing to trust: the pristine bundle comes back, byte for byte.
        let counts = guest.run("");
        assert_eq!(
            counts,
            Counts {
                keystone: 0,
                host_extra: 0
            }
        );
        assert_eq!(guest.read(GUEST_BUNDLE), original);
        assert!(!guest.path(GUEST_CA_FILE).exists());
        assert!(!guest.path(GUEST_LOCAL_CAS).exists());
        assert!(!guest.path(&format!("{GUEST_CA_FILE}.tmp")).exists());
    }

    #[test]
    fn the_guest_script_compares_bodies_not_line_breaks() {
        // A pristine bundle with CRLF line ends, a comment and no final
        // newline still matches the host's canonical blocks.
        let guest = Guest::new(&[]);
        let odd = format!("# Debian\r\n{}", to_pem(&der(1)).replace('\n', "\r\n"));
        let odd = odd.trim_end().to_string();
        fs::write(guest.path(GUEST_BUNDLE), &odd).expect("w");
        let counts = guest.run(&payload(&[], &[der(1), der(2)]));
        assert_eq!(counts.host_extra, 1);
        let bundle = guest.read(GUEST_BUNDLE);
        assert!(bundle.starts_with(&odd), "the pristine part is kept as is");
        assert_eq!(
            pem_certs(bundle.as_bytes()).expect("pem"),
            vec![der(1), der(2)]
        );
    }

    #[test]
    fn the_guest_script_copes_with_a_guest_without_a_bundle() {
        let guest = Guest::new(&[]);
        fs::remove_file(guest.path(GUEST_BUNDLE)).expect("rm");
        let counts = guest.run(&payload(&[der(9)], &[der(3)]));
        assert_eq!(
            counts,
            Counts {
                keystone: 1,
                host_extra: 1
            }
        );
        assert_eq!(guest.read(GUEST_PRISTINE), "");
        assert_eq!(
            pem_certs(guest.read(GUEST_BUNDLE).as_bytes()).expect("pem"),
            vec![der(9), der(3)]
        );
    }

    #[test]
    fn the_guest_script_handles_a_real_host_bundle() {
        // This host's own bundle against an empty guest: every block kept,
        // and the counts match what the host parsed.
        let Some(path) = host_bundle_path(None) else {
            return;
        };
        let Ok(bytes) = fs::read(&path) else { return };
        let Ok(certs) = pem_certs(&bytes) else { return };
        let half = &certs[..certs.len() / 2];
        let guest = Guest::new(half);
        let unique = without_stock(certs.clone(), &HashSet::new());
        let expected = unique.iter().filter(|c| !half.contains(c)).count();
        let counts = guest.run(&payload(&[], &unique));
        assert_eq!(counts.host_extra, expected);
        assert_eq!(
            pem_certs(guest.read(GUEST_BUNDLE).as_bytes())
                .expect("pem")
                .len(),
            half.len() + expected
        );
    }
}
