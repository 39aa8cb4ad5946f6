//! The recipe of a guest image and the content hash that names it.

use crate::agents::{self, AgentSetup};
use crate::guest;
use crate::ImageError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Bumped whenever the builder changes in a way the hashed inputs do not show
/// (mmdebstrap options, the manifest layout), so old images stop matching.
pub const FORMAT_VERSION: u32 = 1;

/// The Debian suite images are built from unless the caller says otherwise.
pub const DEFAULT_SUITE: &str = "trixie";
/// Debian's own archive, the one mirror every machine we run on can reach.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The mmdebstrap variant: `apt` is the smallest set that still has apt, so
/// a user can `apt-get install` inside a sandbox.
pub(crate) const VARIANT: &str = "apt";

/// Packages of every image. The kernel (Debian's cloud flavour, the
/// smallest with virtio) and initramfs-tools are for the microvm backend,
/// which boots the image's own kernel; the container backend ignores /boot.
const MINIMAL_PACKAGES: &[&str] = &[
    "ca-certificates",
    "curl",
    "direnv",
    "git",
    "iproute2",
    "jq",
    "kmod",
    "less",
    "libnss-myhostname",
    // `nft`, for the Kubernetes pod's egress fence (an init container
    // running this image; keystone_egress::relay).
    "nftables",
    "linux-image-cloud-amd64",
    "openssh-server",
    "procps",
    // A dev server with no setup (`python3 -m http.server`), and what the
    // proxy's end-to-end tests serve from inside.
    "python3",
    "ripgrep",
    "rsync",
    "sudo",
    "tini",
    "tmux",
    // DHCP on a host bridge (`--network bridge`); busybox's, 1 MB.
    "udhcpc",
];

/// What the full profile adds: a toolchain and the Node.js the agents need.
const FULL_PACKAGES: &[&str] = &["build-essential", "nodejs", "npm"];

/// How much goes into the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// SSH, git and the everyday tools; fast to build, used by the tests.
    Minimal,
    /// Minimal plus build-essential, Node.js and npm.
    Full,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Minimal => "minimal",
            Profile::Full => "full",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minimal" => Ok(Profile::Minimal),
            "full" => Ok(Profile::Full),
            _ => Err(ImageError::UnknownProfile { name: s.to_owned() }),
        }
    }
}

/// Everything the caller chooses about an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recipe {
    pub profile: Profile,
    /// Debian suite or codename, e.g. `trixie`.
    pub suite: String,
    /// Archive URL handed to mmdebstrap.
    pub mirror: String,
    /// Added to the profile's packages (order and duplicates do not matter).
    pub extra_packages: Vec<String>,
    /// The coding agents, installed from npm at exact versions (full
    /// profile only: they need Node.js). Order does not matter.
    #[serde(default)]
    pub agents: Vec<AgentSetup>,
    /// Zellij at this exact crates.io version, when the sessions use it
    /// (built on the host into the store's `tools/`, see [`crate::tools`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zellij: Option<String>,
    /// Where the store found or built that Zellij; set just before a build,
    /// never part of the hash (the image does not depend on the host path).
    #[serde(skip)]
    pub zellij_binary: Option<std::path::PathBuf>,
}

impl Recipe {
    /// The profile on [`DEFAULT_SUITE`] from [`DEFAULT_MIRROR`], no extras.
    pub fn new(profile: Profile) -> Self {
        Recipe {
            profile,
            suite: DEFAULT_SUITE.to_owned(),
            mirror: DEFAULT_MIRROR.to_owned(),
            extra_packages: Vec::new(),
            agents: Vec::new(),
            zellij: None,
            zellij_binary: None,
        }
    }

    /// The hooks mmdebstrap runs, Zellij's last; with `real_paths`, the
    /// host path of the Zellij binary, else the placeholder the hash uses.
    pub(crate) fn hooks(&self, real_paths: bool) -> Vec<String> {
        let mut hooks = guest::customize_hooks(&self.sorted_agents());
        if let Some(version) = &self.zellij {
            let path = match (&self.zellij_binary, real_paths) {
                (Some(p), true) => p.display().to_string(),
                _ => guest::ZELLIJ_PLACEHOLDER.to_string(),
            };
            hooks.push(guest::zellij_hook(version, &path));
        }
        hooks
    }

    /// The agents in a fixed order (one per kind), so the hash and the
    /// hooks do not depend on how the caller listed them.
    pub fn sorted_agents(&self) -> Vec<AgentSetup> {
        let mut agents = self.agents.clone();
        agents.sort_by_key(|a| a.agent);
        agents.dedup_by_key(|a| a.agent);
        agents
    }

    /// The full `--include` list, sorted and without duplicates.
    pub fn packages(&self) -> Vec<String> {
        let profile_packages: &[&str] = match self.profile {
            Profile::Minimal => &[],
            Profile::Full => FULL_PACKAGES,
        };
        let mut packages: Vec<String> = MINIMAL_PACKAGES
            .iter()
            .chain(profile_packages)
            .map(|p| (*p).to_owned())
            .chain(self.extra_packages.iter().map(|p| p.trim().to_owned()))
            .collect();
        packages.sort();
        packages.dedup();
        packages
    }

    /// Hex SHA-256 over everything that shapes the image: [`FORMAT_VERSION`],
    /// profile, suite, mirror, variant, package list, dpkg options and the
    /// exact text of every hook (which embeds every file the builder writes).
    pub fn hash(&self) -> String {
        self.hash_with(FORMAT_VERSION, &self.hooks(false))
    }

    /// `<profile>-<first 12 hex digits of the hash>`.
    pub fn id(&self) -> String {
        id_for(self.profile, &self.hash())
    }

    pub(crate) fn hash_with(&self, format_version: u32, hooks: &[String]) -> String {
        // Each field is tagged and length-prefixed, so no two different
        // recipes serialize to the same bytes.
        let mut h = Sha256::new();
        let mut field = |tag: &str, value: &[u8]| {
            h.update(tag.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("format_version", &format_version.to_le_bytes());
        field("profile", self.profile.as_str().as_bytes());
        field("suite", self.suite.as_bytes());
        field("mirror", self.mirror.as_bytes());
        field("variant", VARIANT.as_bytes());
        for package in self.packages() {
            field("package", package.as_bytes());
        }
        for option in guest::DPKG_OPTIONS {
            field("dpkgopt", option.as_bytes());
        }
        // The hooks embed the same facts; naming them here keeps the hash
        // honest even if a hook stopped mentioning one.
        for setup in self.sorted_agents() {
            field("agent", setup.agent.name().as_bytes());
            field("agent_package", setup.spec().as_bytes());
            field("agent_auto_accept", &[u8::from(setup.auto_accept)]);
        }
        if let Some(version) = &self.zellij {
            field("zellij", version.as_bytes());
        }
        for hook in hooks {
            field("customize_hook", hook.as_bytes());
        }
        hex(&h.finalize())
    }

    /// Rejects what mmdebstrap would misread: an option where a positional
    /// argument belongs, or a package name that splits into several.
    pub fn validate(&self) -> Result<(), ImageError> {
        let invalid = |reason: String| Err(ImageError::InvalidRecipe { reason });
        if self.suite.is_empty()
            || self.suite.starts_with('-')
            || !self
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return invalid(format!(
                "suite {:?} is not a Debian suite name like \"trixie\"",
                self.suite
            ));
        }
        if self.mirror.is_empty()
            || self.mirror.starts_with('-')
            || self.mirror.chars().any(char::is_whitespace)
        {
            return invalid(format!(
                "mirror {:?} is not a URL like \"{DEFAULT_MIRROR}\"",
                self.mirror
            ));
        }
        for package in &self.extra_packages {
            let package = package.trim();
            let ok = !package.is_empty()
                && package
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && package
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.:=/~_".contains(c));
            if !ok {
                return invalid(format!(
                    "{package:?} is not a Debian package name; give one package per entry"
                ));
            }
        }
        if !self.agents.is_empty() && self.profile != Profile::Full {
            return invalid(format!(
                "agents ({}) need the full profile, which has Node.js",
                self.sorted_agents()
                    .iter()
                    .map(|a| a.agent.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(version) = &self.zellij {
            if !agents::is_exact_version(version) {
                return invalid(format!(
                    "zellij version {version:?} is not an exact version like \"{}\"",
                    crate::tools::ZELLIJ_VERSION
                ));
            }
        }
        for setup in &self.agents {
            if !agents::is_exact_version(&setup.version) {
                return invalid(format!(
                    "{} version {:?} is not an exact version like \"{}\"",
                    setup.agent,
                    setup.version,
                    setup.agent.pinned_version()
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn id_for(profile: Profile, hash: &str) -> String {
    let short = hash.get(..12).unwrap_or(hash);
    format!("{profile}-{short}")
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Recipe {
        Recipe::new(Profile::Minimal)
    }

    #[test]
    fn same_recipe_same_hash() {
        assert_eq!(minimal().hash(), minimal().hash());
        assert_eq!(minimal().hash().len(), 64);
        assert!(minimal().hash().chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn profile_changes_hash() {
        assert_ne!(minimal().hash(), Recipe::new(Profile::Full).hash());
    }

    #[test]
    fn suite_changes_hash() {
        let mut r = minimal();
        r.suite = "bookworm".into();
        assert_ne!(minimal().hash(), r.hash());
    }

    #[test]
    fn zellij_and_its_version_change_hash_but_its_host_path_does_not() {
        let mut with = minimal();
        with.zellij = Some("0.45.1".into());
        assert_ne!(minimal().hash(), with.hash());
        let mut other = with.clone();
        other.zellij = Some("0.45.0".into());
        assert_ne!(with.hash(), other.hash());
        let mut moved = with.clone();
        moved.zellij_binary = Some("/somewhere/else/bin/zellij".into());
        assert_eq!(with.hash(), moved.hash());
        // The build copies the real binary; the hash sees the placeholder.
        assert!(moved
            .hooks(true)
            .join("\n")
            .contains("'/somewhere/else/bin/zellij'"));
        assert!(!moved.hooks(false).join("\n").contains("/somewhere"));
        for hook in moved.hooks(true) {
            let ok = std::process::Command::new("sh")
                .args(["-n", "-c", &hook])
                .status()
                .expect("sh")
                .success();
            assert!(ok, "{hook}");
        }
        let mut bad = minimal();
        bad.zellij = Some("latest".into());
        assert!(bad.validate().is_err());
    }

    #[test]
    fn mirror_changes_hash() {
        let mut r = minimal();
        r.mirror = "http://ftp.de.debian.org/debian".into();
        assert_ne!(minimal().hash(), r.hash());
    }

    #[test]
    fn extra_package_changes_hash() {
        let mut r = minimal();
        r.extra_packages = vec!["vim".into()];
        assert_ne!(minimal().hash(), r.hash());
    }

    #[test]
    fn extra_package_order_and_duplicates_do_not_change_hash() {
        let mut a = minimal();
        a.extra_packages = vec!["vim".into(), "htop".into()];
        let mut b = minimal();
        b.extra_packages = vec!["htop".into(), "vim".into(), "htop".into()];
        assert_eq!(a.hash(), b.hash());
        let mut c = minimal();
        c.extra_packages = vec!["git".into()];
        assert_eq!(minimal().hash(), c.hash(), "git is already in the profile");
    }

    #[test]
    fn hook_text_changes_hash() {
        let r = minimal();
        let hooks = guest::customize_hooks(&[]);
        assert_eq!(r.hash(), r.hash_with(FORMAT_VERSION, &hooks));
        for i in 0..hooks.len() {
            let mut edited = hooks.clone();
            edited[i].push(' ');
            assert_ne!(r.hash(), r.hash_with(FORMAT_VERSION, &edited), "hook {i}");
        }
        let mut reordered = hooks.clone();
        reordered.swap(0, 1);
        assert_ne!(r.hash(), r.hash_with(FORMAT_VERSION, &reordered));
    }

    fn full_with(agents: &[(agents::Agent, &str, bool)]) -> Recipe {
        let mut r = Recipe::new(Profile::Full);
        r.agents = agents
            .iter()
            .map(|(a, v, auto)| AgentSetup {
                agent: *a,
                version: (*v).to_owned(),
                auto_accept: *auto,
            })
            .collect();
        r
    }

    #[test]
    fn agent_set_version_and_settings_change_hash() {
        use agents::Agent::{Claude, Codex};
        let base = full_with(&[(Claude, "2.1.332", true)]);
        assert_ne!(base.hash(), Recipe::new(Profile::Full).hash());
        assert_ne!(base.hash(), full_with(&[(Claude, "2.1.333", true)]).hash());
        assert_ne!(base.hash(), full_with(&[(Claude, "2.1.332", false)]).hash());
        let two = full_with(&[(Claude, "2.1.332", true), (Codex, "0.171.0", true)]);
        assert_ne!(base.hash(), two.hash());
        let swapped = full_with(&[(Codex, "0.171.0", true), (Claude, "2.1.332", true)]);
        assert_eq!(two.hash(), swapped.hash(), "order does not matter");
    }

    #[test]
    fn agents_need_full_profile_and_exact_versions() {
        use agents::Agent::Claude;
        assert!(full_with(&[(Claude, "2.1.332", true)]).validate().is_ok());
        let mut r = full_with(&[(Claude, "2.1.332", true)]);
        r.profile = Profile::Minimal;
        assert!(r.validate().is_err());
        assert!(full_with(&[(Claude, "latest", true)]).validate().is_err());
        assert!(full_with(&[(Claude, "1.0.0; rm -rf /", true)])
            .validate()
            .is_err());
    }

    #[test]
    fn format_version_changes_hash() {
        let r = minimal();
        let hooks = guest::customize_hooks(&[]);
        assert_ne!(r.hash(), r.hash_with(FORMAT_VERSION + 1, &hooks));
    }

    #[test]
    fn fields_cannot_bleed_into_each_other() {
        let mut a = minimal();
        a.suite = "trixieX".into();
        a.mirror = "m".into();
        let mut b = minimal();
        b.suite = "trixie".into();
        b.mirror = "Xm".into();
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn minimal_id_is_pinned() {
        // Fails whenever anything hashed changes: a package, an option, a
        // hook, a guest file. That is intended: update the value knowing
        // that every user's cached image will be rebuilt.
        assert_eq!(minimal().id(), "minimal-9de4aff7a300");
    }

    #[test]
    fn id_format() {
        let id = minimal().id();
        let (profile, short) = id.split_once('-').expect("a dash");
        assert_eq!(profile, "minimal");
        assert_eq!(short.len(), 12);
        assert!(short.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert!(minimal().hash().starts_with(short));
        assert!(Recipe::new(Profile::Full).id().starts_with("full-"));
    }

    /// What the image's own files run comes from a package every image
    /// installs: dropping one breaks the guest at run time, not the build.
    /// (The list's exact content is pinned by `minimal_id_is_pinned`.)
    #[test]
    fn every_image_installs_what_its_own_files_run() {
        let needs = [
            // The init: PID 1, sshd, the network, the microVM's modules.
            ("exec /usr/bin/tini", "tini"),
            ("/usr/sbin/sshd -D", "openssh-server"),
            ("| ip -batch -", "iproute2"),
            ("udhcpc -f -i eth1", "udhcpc"),
            ("modprobe -a virtio_blk", "kmod"),
            // The kernel hook keeps the kernel the microVM boots.
            ("/boot/vmlinuz-", "linux-image-cloud-amd64"),
            // The agent's shell, sessions and sudo.
            ("eval \"$(direnv hook bash)\"", "direnv"),
            ("tmux new-session", "tmux"),
            ("/etc/sudoers.d/agent", "sudo"),
        ];
        for profile in [Profile::Minimal, Profile::Full] {
            let r = Recipe::new(profile);
            let hooks = r.hooks(false).concat();
            let packages = r.packages();
            for (used, package) in needs {
                assert!(
                    hooks.contains(used),
                    "the {profile} image's files no longer use {used:?}: does it still need {package}?"
                );
                assert!(
                    packages.iter().any(|p| p == package),
                    "the {profile} image's files use {used:?} but it does not install {package}"
                );
            }
        }
    }

    #[test]
    fn full_packages_add_toolchain_and_node() {
        let mut r = Recipe::new(Profile::Full);
        r.extra_packages = vec!["vim".into(), "jq".into()];
        let p = r.packages();
        for name in ["build-essential", "nodejs", "npm", "vim", "openssh-server"] {
            assert!(p.contains(&name.to_owned()), "{name}");
        }
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(p, sorted);
        assert_eq!(p.len(), minimal().packages().len() + 4);
    }

    #[test]
    fn profile_text_round_trips() {
        for p in [Profile::Minimal, Profile::Full] {
            assert_eq!(p.to_string().parse::<Profile>().expect("parse"), p);
            let json = serde_json::to_string(&p).expect("json");
            assert_eq!(json, format!("\"{p}\""));
        }
        let err = "huge".parse::<Profile>().expect_err("unknown");
        assert!(err.to_string().contains("expected \"minimal\" or \"full\""));
    }

    #[test]
    fn validate_rejects_what_mmdebstrap_would_misread() {
        assert!(minimal().validate().is_ok());
        for bad in ["vim,htop", "vim htop", "--foo", "", "a;b"] {
            let mut r = minimal();
            r.extra_packages = vec![bad.into()];
            assert!(r.validate().is_err(), "{bad:?}");
        }
        let mut r = minimal();
        r.extra_packages = vec!["libc6:amd64".into(), "g++".into(), "foo/trixie".into()];
        assert!(r.validate().is_ok());
        let mut r = minimal();
        r.suite = "--mode=root".into();
        assert!(r.validate().is_err());
        let mut r = minimal();
        r.mirror = "http://x y".into();
        assert!(r.validate().is_err());
    }
}
