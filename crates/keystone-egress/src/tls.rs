//! TLS for the hosts whose requests carry credentials, and only for them:
//! the keystone CA that signs a certificate for each such name on the
//! guest's side, and the upstream client that re-originates the
//! connection with the **host's** trust store.
//!
//! - The CA is made once per user on the host ([`load_or_create_ca`]:
//!   `ca.crt`, public, copied into every guest's trust stores; `ca.key`,
//!   mode 0600, which never leaves the host). The egress point gets both
//!   from the CLI over its control socket and signs a leaf per name on
//!   first use ([`Authority::server_config`]), kept in memory.
//! - Upstream, the name is verified against the host's roots
//!   (`rustls-native-certs`: the system bundle, or `SSL_CERT_FILE` /
//!   `SSL_CERT_DIR` when set), so a TLS-inspecting network the host
//!   trusts works, and a certificate signed by anyone else for an
//!   intercepted name is refused before a request with a real value is
//!   sent.
//!
//! Both sides offer HTTP/1.1 only (ALPN), so every request is one hyper
//! request whose headers keystone can see.
//!
//! Why these crates: rustls (already in the tree through kube) is a TLS
//! stack without OpenSSL; tokio-rustls is its async adapter; rcgen is the
//! certificate generator rustls' own examples and hudsucker use;
//! rustls-native-certs reads the platform's roots the way OpenSSL does.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// The CA's common name, as the guest's trust store shows it.
pub const CA_NAME: &str = "keystone sandbox egress CA";
/// Leaf certificates kept per egress point (one per intercepted name).
const LEAF_CACHE: usize = 256;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whole years from the Unix epoch to now, and the current year (UTC).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// A new CA: `(certificate PEM, private key PEM)`, valid from last year
/// for ten years, allowed to sign end-entity certificates only.
pub fn generate_ca() -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| format!("CA key: {e}"))?;
    let params = ca_params();
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("CA certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "keystone");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let y = this_year();
    params.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(y + 10, 1, 1);
    params
}

/// The user's CA in `dir` (`ca.crt`, `ca.key`), made on first use: the
/// directory 0700, the key 0600, written under temporary names and
/// renamed, so a crash never leaves half a key. Returns the PEMs.
pub fn load_or_create_ca(dir: &Path) -> Result<(String, String), String> {
    let crt = dir.join("ca.crt");
    let key = dir.join("ca.key");
    let shown = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
    if key.exists() {
        let meta = std::fs::metadata(&key).map_err(|e| shown(&key, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
                key.display(),
                meta.permissions().mode() & 0o777,
                key.display()
            ));
        }
        let k = std::fs::read_to_string(&key).map_err(|e| shown(&key, e))?;
        let c = std::fs::read_to_string(&crt).map_err(|e| shown(&crt, e))?;
        Authority::new(&c, &k).map_err(|e| {
            format!(
                "{}: {e}; remove {} and {} to make a new CA (sandboxes get it at their next start)",
                dir.display(),
                crt.display(),
                key.display()
            )
        })?;
        return Ok((c, k));
    }
    std::fs::create_dir_all(dir).map_err(|e| shown(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| shown(dir, e))?;
    let (c, k) = generate_ca()?;
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), String> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| shown(&tmp, e))?;
        io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| shown(&tmp, e))?;
        f.sync_all().map_err(|e| shown(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| shown(path, e))
    };
    write(&crt, &c, 0o644)?;
    // The key last: its presence is what says the CA exists.
    write(&key, &k, 0o600)?;
    Ok((c, k))
}

/// The CA as the egress point holds it: signs a leaf per name.
pub struct Authority {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// The CA rebuilt from its key and parameters, for rcgen to sign with
    /// (the same subject and key as `ca.crt`, so leaves chain to it).
    signer: rcgen::Certificate,
    leaves: Mutex<HashMap<String, Leaf>>,
}

/// A name's server configuration, and its leaf certificate.
type Leaf = (Arc<rustls::ServerConfig>, CertificateDer<'static>);

impl Authority {
    /// From the PEMs [`load_or_create_ca`] returns.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Authority, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("CA key: {e}"))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("CA certificate: {e}"))?;
        let signer = ca_params()
            .self_signed(&key)
            .map_err(|e| format!("CA: {e}"))?;
        let authority = Authority {
            cert_der,
            key,
            signer,
            leaves: Mutex::new(HashMap::new()),
        };
        // The certificate must be this key's: a leaf signed with the key
        // must verify against the certificate as the only root.
        authority
            .verify_leaf("keystone-ca-check.invalid")
            .map_err(|e| format!("the CA certificate does not belong to its key ({e})"))?;
        authority
            .leaves
            .lock()
            .map_err(|_| "lock poisoned".to_string())?
            .clear();
        Ok(authority)
    }

    /// Sign a leaf for `name` and verify it as a client trusting only this
    /// CA would.
    fn verify_leaf(&self, name: &str) -> Result<(), String> {
        let (_, leaf) = self.leaf(name)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("CA certificate: {e}"))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let server =
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&leaf, &[], &server, &[], rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The CA certificate (DER), which the leaf chain carries.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The server side of an intercepted connection to `name`: a leaf for
    /// it, signed now or kept from before; ALPN `http/1.1` only.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        self.leaf(name).map(|(c, _)| c)
    }

    fn leaf(&self, name: &str) -> Result<Leaf, String> {
        let mut leaves = self
            .leaves
            .lock()
            .map_err(|_| "lock poisoned".to_string())?;
        if let Some(c) = leaves.get(name) {
            return Ok(c.clone());
        }
        let key = KeyPair::generate().map_err(|e| format!("leaf key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|e| format!("{name}: {e}"))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let y = this_year();
        params.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(y + 1, 12, 31);
        let leaf = params
            .signed_by(&key, &self.signer, &self.key)
            .map_err(|e| format!("leaf for {name}: {e}"))?;
        let leaf_der = leaf.der().clone();
        let chain = vec![leaf_der.clone(), self.cert_der.clone()];
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, der)
            .map_err(|e| format!("TLS certificate for {name}: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= LEAF_CACHE {
            leaves.clear();
        }
        leaves.insert(name.to_string(), (config.clone(), leaf_der.clone()));
        Ok((config, leaf_der))
    }
}

/// The upstream client: the host's roots, HTTP/1.1. Loaded once per
/// process (the roots of a long-running egress point are those it started
/// with; a restarted sandbox picks up new ones).
pub fn upstream_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no certificates found".into());
                return Err(format!(
                    "the host's trust store is empty ({why}); install ca-certificates or set SSL_CERT_FILE"
                ));
            }
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_ca_loads_and_signs_leaves_that_verify() {
        let dir = tempfile::tempdir().expect("tmp");
        let (c, k) = load_or_create_ca(&dir.path().join("ca")).expect("ca");
        let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second call loads the same pair.
        let again = load_or_create_ca(&dir.path().join("ca")).expect("again");
        assert_eq!(again, (c.clone(), k.clone()));
        let auth = Authority::new(&c, &k).expect("authority");
        auth.server_config("api.example.com").expect("leaf");
        // A key that is not the certificate's is refused.
        let (_, other_key) = generate_ca().expect("other");
        assert!(Authority::new(&c, &other_key).is_err());
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        load_or_create_ca(dir.path()).expect("ca");
        std::fs::set_permissions(
            dir.path().join("ca.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let e = load_or_create_ca(dir.path()).expect_err("refused");
        assert!(e.contains("chmod 600"), "{e}");
    }
}
