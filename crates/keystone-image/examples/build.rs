//! Builds a real image: `cargo run -p keystone-image --example build --
//! [--ensure] minimal /tmp/images [suite]`. Needs mmdebstrap and Debian's
//! archive. `--ensure` reuses a cached image instead of rebuilding.

use keystone_image::{ImageStore, Profile, Progress, Recipe};
use std::path::PathBuf;
use std::time::Instant;

struct Stderr;

impl Progress for Stderr {
    fn phase(&self, message: &str) {
        eprintln!("==> {message}");
    }
    fn line(&self, line: &str) {
        eprintln!("    {line}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: build [--ensure] <minimal|full> <store-dir> [suite]";
    let ensure = args.next_if(|a| a == "--ensure").is_some();
    let profile: Profile = args.next().ok_or(usage)?.parse()?;
    let root = PathBuf::from(args.next().ok_or(usage)?);
    let mut recipe = Recipe::new(profile);
    if let Some(suite) = args.next() {
        recipe.suite = suite;
    }
    let started = Instant::now();
    let store = ImageStore::new(root);
    let image = if ensure {
        store.ensure(&recipe, &Stderr)?
    } else {
        store.build(&recipe, &Stderr)?
    };
    eprintln!(
        "==> image {} after {:.1} s (its build took {:.1} s), {} bytes: {}",
        image.id,
        started.elapsed().as_secs_f64(),
        image.build_seconds,
        image.size_bytes,
        image.rootfs_tar().display()
    );
    println!("{}", serde_json::to_string_pretty(&image)?);
    Ok(())
}
