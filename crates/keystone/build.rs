//! Fetches the web terminal's front end (xterm.js and its fit addon) from
//! the npm registry at build time, so `attach --web` ships it inside the
//! binary and needs nothing at run time.
//!
//! `npm pack` downloads each package at its pinned version into OUT_DIR
//! (npm checks the tarball against the registry's integrity); we then check
//! the tarball's SHA-512 against the integrity pinned here, so a changed
//! package can never slip in, and extract the few files the page loads.

use base64::Engine;
use sha2::{Digest, Sha512};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Package {
    name: &'static str,
    version: &'static str,
    /// The `dist.integrity` the registry published for this version.
    integrity: &'static str,
    /// (path inside the tarball, file name in OUT_DIR/webterm)
    files: &'static [(&'static str, &'static str)],
}

const PACKAGES: &[Package] = &[
    Package {
        name: "@xterm/xterm",
        version: "6.0.0",
        integrity: "sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==",
        files: &[
            ("package/lib/xterm.js", "xterm.js"),
            ("package/css/xterm.css", "xterm.css"),
        ],
    },
    Package {
        name: "@xterm/addon-fit",
        version: "0.11.0",
        integrity: "sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g==",
        files: &[("package/lib/addon-fit.js", "addon-fit.js")],
    },
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("webterm");
    std::fs::create_dir_all(&dest).expect("create OUT_DIR/webterm");
    for pkg in PACKAGES {
        if let Err(e) = fetch(pkg, &out, &dest) {
            panic!(
                "\n\nkeystone's build fetches {}@{} (the web terminal of `attach --web`) from the npm registry with `npm pack`, and that failed:\n  {e}\nInstall npm (Debian: apt-get install npm) and make sure the npm registry is reachable.\n\n",
                pkg.name, pkg.version
            );
        }
    }
}

fn fetch(pkg: &Package, out: &Path, dest: &Path) -> Result<(), String> {
    let have_all = pkg.files.iter().all(|(_, name)| dest.join(name).is_file());
    let stamp = dest.join(format!(".{}-{}", pkg.name.replace('/', "_"), pkg.version));
    if have_all && stamp.is_file() {
        return Ok(());
    }
    let spec = format!("{}@{}", pkg.name, pkg.version);
    let output = Command::new("npm")
        .args(["pack", &spec, "--json", "--silent", "--pack-destination"])
        .arg(out)
        .output()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`npm pack {spec}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("`npm pack {spec} --json` printed no JSON: {e}"))?;
    let entry = &report[0];
    let filename = entry["filename"]
        .as_str()
        .ok_or("npm pack named no tarball")?;
    if entry["integrity"].as_str() != Some(pkg.integrity) {
        return Err(format!(
            "{spec}: the registry's integrity {} is not the pinned {}",
            entry["integrity"], pkg.integrity
        ));
    }
    let tarball = out.join(filename);
    let bytes = std::fs::read(&tarball).map_err(|e| format!("{}: {e}", tarball.display()))?;
    let ours = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes))
    );
    if ours != pkg.integrity {
        return Err(format!(
            "{}: SHA-512 {ours} is not the pinned {}",
            tarball.display(),
            pkg.integrity
        ));
    }
    let unpack = out.join(format!("unpack-{}", pkg.name.replace('/', "_")));
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack).map_err(|e| e.to_string())?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpack)
        .args(pkg.files.iter().map(|(inside, _)| *inside))
        .status()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !status.success() {
        return Err(format!("tar could not extract {}", tarball.display()));
    }
    for (inside, name) in pkg.files {
        std::fs::copy(unpack.join(inside), dest.join(name))
            .map_err(|e| format!("{inside} from {}: {e}", tarball.display()))?;
    }
    std::fs::write(&stamp, pkg.integrity).map_err(|e| e.to_string())?;
    Ok(())
}
