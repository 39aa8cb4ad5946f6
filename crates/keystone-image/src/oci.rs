//! The guest image as an OCI image archive, for the Kubernetes backend.
//!
//! One layer: the image's `rootfs.tar` itself, uncompressed
//! (`application/vnd.oci.image.layer.v1.tar`, which the OCI spec, containerd
//! and registries accept), so exporting costs one copy of the tarball and
//! no compression time; the tarball already carries numeric owners. The
//! archive is a tar of an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/`) whose index names the image twice: the OCI
//! `org.opencontainers.image.ref.name` annotation (the tag, for skopeo's
//! `oci-archive:` transport) and containerd's `io.containerd.image.name`
//! (the full reference, for `ctr images import`).
//!
//! Written by hand rather than with umoci or skopeo: the layout is three
//! small JSON documents around a blob we already have; umoci would unpack
//! and repack the whole root file system, and skopeo cannot make an image
//! from a plain tarball with a config of our own. `skopeo` is used for what
//! it is for: pushing the archive to a registry ([`push`]).
//!
//! The archive lands beside the image in the store as `oci.tar`, made in a
//! temporary file and renamed, so a half-written one is never used.

use crate::{Image, ImageError};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHIVE: &str = "oci.tar";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// The reference an image is known by when nobody named one: what the
/// archive carries and what `ctr images import` names it.
pub fn default_reference(image_id: &str) -> String {
    format!("localhost/keystone-guest:{image_id}")
}

/// Where [`export`] writes the archive of `image`.
pub fn archive_path(image: &Image) -> PathBuf {
    image.dir.join(ARCHIVE)
}

fn sha256_file(path: &Path) -> Result<(String, u64), ImageError> {
    let mut f = File::open(path).map_err(|e| ImageError::io("read", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// The image config: environment and working directory a shell in the
/// guest expects. No entrypoint: the backend gives the pod its command.
fn config_json(image: &Image, layer_digest: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8"
            ],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "keystone guest",
                "dev.keystone.image.id": image.id,
                "dev.keystone.image.profile": image.profile.to_string(),
                "dev.keystone.image.suite": image.suite,
            }
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created_by": format!("keystone image build (mmdebstrap, {})", image.suite)}]
    })
}

/// Export `image` as an OCI image archive named `reference`; returns its
/// path. Reuses an archive already made for the same reference.
pub fn export(image: &Image, reference: &str) -> Result<PathBuf, ImageError> {
    let out = archive_path(image);
    let stamp = image.dir.join("oci.ref");
    if out.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(reference) {
        return Ok(out);
    }
    let stage = image.dir.join(format!(".oci-stage-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    let result = write_layout(image, reference, &stage).and_then(|()| {
        let tmp = image
            .dir
            .join(format!(".oci.tar.tmp-{}", std::process::id()));
        let output = Command::new("tar")
            .arg("--numeric-owner")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("--hard-dereference")
            .arg("-cf")
            .arg(&tmp)
            .arg("-C")
            .arg(&stage)
            .args(["oci-layout", "index.json", "blobs"])
            .output()
            .map_err(|e| ImageError::Spawn {
                command: "tar".into(),
                source: e,
            })?;
        if !output.status.success() {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::io(
                "write",
                &tmp,
                io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
            ));
        }
        fs::rename(&tmp, &out).map_err(|e| ImageError::io("rename", &out, e))?;
        fs::write(&stamp, reference).map_err(|e| ImageError::io("write", &stamp, e))
    });
    let _ = fs::remove_dir_all(&stage);
    result.map(|()| out)
}

fn write_layout(image: &Image, reference: &str, dir: &Path) -> Result<(), ImageError> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|e| ImageError::io("create", &blobs, e))?;
    let rootfs = image.rootfs_tar();
    let (layer_digest, layer_size) = sha256_file(&rootfs)?;
    let layer = blobs.join(&layer_digest);
    // A hard link: the layer is the tarball, byte for byte.
    if fs::hard_link(&rootfs, &layer).is_err() {
        fs::copy(&rootfs, &layer).map_err(|e| ImageError::io("copy", &rootfs, e))?;
    }
    let write_blob = |body: &serde_json::Value| -> Result<(String, usize), ImageError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ImageError::Manifest {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let digest = sha256_bytes(&bytes);
        let path = blobs.join(&digest);
        fs::write(&path, &bytes).map_err(|e| ImageError::io("write", &path, e))?;
        Ok((digest, bytes.len()))
    };
    let (config_digest, config_size) = write_blob(&config_json(image, &layer_digest))?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = write_blob(&manifest)?;
    let tag = reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            }
        }]
    });
    let write = |name: &str, body: String| -> Result<(), ImageError> {
        let p = dir.join(name);
        fs::write(&p, body).map_err(|e| ImageError::io("write", &p, e))
    };
    write("index.json", index.to_string())?;
    write(
        "oci-layout",
        r#"{"imageLayoutVersion":"1.0.0"}"#.to_string(),
    )?;
    Ok(())
}

/// Push an exported archive to `destination` (a registry reference such as
/// `registry.example.com/team/keystone-guest:v1`) with skopeo. `tls_verify`
/// false allows a plain-HTTP or self-signed registry (a local test one).
pub fn push(archive: &Path, destination: &str, tls_verify: bool) -> Result<(), ImageError> {
    let output = Command::new("skopeo")
        .arg("copy")
        .arg("--quiet")
        .arg(format!("--dest-tls-verify={tls_verify}"))
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{destination}"))
        .output()
        .map_err(|e| ImageError::Spawn {
            command: "skopeo (apt-get install skopeo)".into(),
            source: e,
        })?;
    if !output.status.success() {
        return Err(ImageError::Push {
            destination: destination.to_string(),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_reference_is_local_and_tagged_by_id() {
        assert_eq!(
            default_reference("minimal-0123456789ab"),
            "localhost/keystone-guest:minimal-0123456789ab"
        );
    }
}
