//! The local image store: `<root>/<id>/{rootfs.tar, image.json}`.
//!
//! An image directory appears only by a rename of a complete build, so a
//! directory with both files and a manifest that parses is a finished image;
//! anything else (a `.tmp-*` build directory, a half-removed image) is
//! ignored by `find` and `list`. Builds of one id are serialized by an
//! exclusive `flock` on `<root>/<id>.lock`.

use crate::mmdebstrap::{Builder, Mmdebstrap};
use crate::recipe::id_for;
use crate::{ImageError, NoProgress, Profile, Progress, Recipe};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const MANIFEST: &str = "image.json";
const ROOTFS: &str = "rootfs.tar";
/// The agent versions recorded by `image build --update`.
const AGENT_VERSIONS: &str = "agent-versions.json";
/// Prefix of directories that are not (yet, or any more) images.
const TMP_PREFIX: &str = ".tmp-";

/// A built image, as recorded in its `image.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub profile: Profile,
    pub hash: String,
    pub suite: String,
    pub packages: Vec<String>,
    /// The agents installed, at their exact versions.
    #[serde(default)]
    pub agents: Vec<crate::AgentSetup>,
    /// Unix seconds.
    pub created_at: u64,
    /// Size of `rootfs.tar`.
    pub size_bytes: u64,
    pub build_seconds: f64,
    /// Where the image is now; set when the manifest is read, not trusted
    /// from it.
    pub dir: PathBuf,
}

impl Image {
    /// The root filesystem tarball, numeric owners preserved.
    pub fn rootfs_tar(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    /// Reads a finished image from `dir`; `None` when it is not one.
    fn load(dir: &Path) -> Option<Image> {
        let text = match fs::read_to_string(dir.join(MANIFEST)) {
            Ok(text) => text,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "unreadable image manifest");
                }
                return None;
            }
        };
        let mut image: Image = match serde_json::from_str(&text) {
            Ok(image) => image,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "ignoring an image with a corrupt manifest");
                return None;
            }
        };
        if !dir.join(ROOTFS).is_file() {
            tracing::warn!(dir = %dir.display(), "ignoring an image without its rootfs.tar");
            return None;
        }
        if dir.file_name().and_then(|n| n.to_str()) != Some(image.id.as_str()) {
            tracing::warn!(dir = %dir.display(), id = %image.id, "ignoring an image whose manifest names another id");
            return None;
        }
        image.dir = dir.to_owned();
        Some(image)
    }
}

/// The directory of cached images.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// A store in `root`, created on the first build.
    pub fn new(root: PathBuf) -> Self {
        ImageStore { root }
    }

    /// `$XDG_CACHE_HOME/keystone/images`, else `$HOME/.cache/keystone/images`.
    pub fn default_root() -> Option<PathBuf> {
        default_root_from(
            std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The agent versions `image build --update` resolved, which replace
    /// the recipe's pins until the next update. Empty when there are none
    /// or the file is unreadable (the pins then apply, and a warning says
    /// why).
    pub fn agent_versions(&self) -> BTreeMap<crate::Agent, String> {
        let path = self.root.join(AGENT_VERSIONS);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring corrupt agent versions");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        }
    }

    /// Records the versions `image build --update` resolved (atomically).
    pub fn save_agent_versions(
        &self,
        versions: &BTreeMap<crate::Agent, String>,
    ) -> Result<(), ImageError> {
        fs::create_dir_all(&self.root)
            .map_err(|e| ImageError::io("create the image store", &self.root, e))?;
        let path = self.root.join(AGENT_VERSIONS);
        let tmp = self.root.join(format!("{TMP_PREFIX}{AGENT_VERSIONS}"));
        let json = serde_json::to_vec_pretty(versions).map_err(|source| ImageError::Manifest {
            path: path.clone(),
            source,
        })?;
        write_synced(&tmp, &json)?;
        fs::rename(&tmp, &path).map_err(|e| ImageError::io("replace", &path, e))?;
        Ok(())
    }

    /// The cached, complete image for `recipe`, if there is one.
    pub fn find(&self, recipe: &Recipe) -> Result<Option<Image>, ImageError> {
        let hash = recipe.hash();
        let id = id_for(recipe.profile, &hash);
        Ok(Image::load(&self.root.join(&id)).filter(|image| image.hash == hash))
    }

    /// The cached image for `recipe`, built first if there is none. Two
    /// concurrent calls build once: the second waits for the first's lock,
    /// then finds its image.
    pub fn ensure(&self, recipe: &Recipe, progress: &dyn Progress) -> Result<Image, ImageError> {
        self.ensure_with(recipe, progress, &Mmdebstrap)
    }

    /// Builds the image for `recipe`, replacing a cached one.
    pub fn build(&self, recipe: &Recipe, progress: &dyn Progress) -> Result<Image, ImageError> {
        self.build_with(recipe, progress, &Mmdebstrap)
    }

    /// Every complete image, newest first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("read the image store", &self.root, e)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("read the image store", &self.root, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                images.extend(Image::load(&entry.path()));
            }
        }
        images.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(images)
    }

    /// Deletes image `id` and its build log; `NotFound` when absent.
    ///
    /// Only what `list` shows can be removed; a directory that is not a
    /// complete image is left for the next build of that id to replace.
    pub fn remove(&self, id: &str) -> Result<Image, ImageError> {
        validate_id(id)?;
        let dir = self.root.join(id);
        let not_found = || ImageError::NotFound {
            id: id.to_owned(),
            root: self.root.clone(),
        };
        if Image::load(&dir).is_none() {
            return Err(not_found());
        }
        // Not while a build of the same id is publishing.
        let _lock = self.lock(id, &NoProgress)?;
        let image = Image::load(&dir).ok_or_else(not_found)?;
        // Move it out of sight first, so an interrupted removal leaves a
        // build directory the next build of this id cleans, never a half
        // image.
        let doomed = self.root.join(format!("{TMP_PREFIX}{id}.removing"));
        remove_dir_all(&doomed)?;
        fs::rename(&dir, &doomed).map_err(|e| ImageError::io("move aside", &dir, e))?;
        remove_dir_all(&doomed)?;
        let log = self.build_log(id);
        if let Err(e) = fs::remove_file(&log) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(ImageError::io("remove", log, e));
            }
        }
        // The lock file stays: removing it while another process waits on
        // it would let a third lock a new file and build alongside.
        Ok(image)
    }

    fn build_log(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.build.log"))
    }

    pub(crate) fn ensure_with(
        &self,
        recipe: &Recipe,
        progress: &dyn Progress,
        builder: &dyn Builder,
    ) -> Result<Image, ImageError> {
        if let Some(image) = self.find(recipe)? {
            return Ok(image);
        }
        recipe.validate()?;
        let _lock = self.lock(&recipe.id(), progress)?;
        // Someone may have built it while we waited.
        if let Some(image) = self.find(recipe)? {
            return Ok(image);
        }
        self.build_locked(recipe, progress, builder)
    }

    pub(crate) fn build_with(
        &self,
        recipe: &Recipe,
        progress: &dyn Progress,
        builder: &dyn Builder,
    ) -> Result<Image, ImageError> {
        recipe.validate()?;
        let _lock = self.lock(&recipe.id(), progress)?;
        self.build_locked(recipe, progress, builder)
    }

    /// Takes the build lock of `id`, saying so when it has to wait.
    fn lock(&self, id: &str, progress: &dyn Progress) -> Result<Flock<File>, ImageError> {
        fs::create_dir_all(&self.root)
            .map_err(|e| ImageError::io("create the image store", &self.root, e))?;
        let path = self.root.join(format!("{id}.lock"));
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| ImageError::io("open the lock file", &path, e))
        };
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => return Err(ImageError::io("lock", &path, e.into())),
        }
        progress.phase(&format!(
            "waiting for another build of image {id} to finish"
        ));
        let mut file = open()?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(ImageError::io("lock", &path, e.into())),
            }
        }
    }

    /// Builds into a temporary directory beside the store and renames it into
    /// place only when complete. The caller holds the lock of the id.
    fn build_locked(
        &self,
        recipe: &Recipe,
        progress: &dyn Progress,
        builder: &dyn Builder,
    ) -> Result<Image, ImageError> {
        let hash = recipe.hash();
        let id = id_for(recipe.profile, &hash);
        self.remove_stale_temporaries(&id);

        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{id}."))
            .tempdir_in(&self.root)
            .map_err(|e| ImageError::io("create a build directory in", &self.root, e))?;
        let tar = tmp.path().join(ROOTFS);
        let log = self.build_log(&id);
        let started = Instant::now();
        let mut recipe = recipe.clone();
        if let Some(version) = &recipe.zellij {
            recipe.zellij_binary =
                Some(crate::tools::ensure_zellij(&self.root, version, progress)?);
        }
        let recipe = &recipe;
        builder.build(recipe, &id, &tar, &log, progress)?;
        let build_seconds = started.elapsed().as_secs_f64();

        progress.phase(&format!("saving image {id}"));
        let size_bytes = sync_file(&tar)?;
        let final_dir = self.root.join(&id);
        let image = Image {
            id: id.clone(),
            profile: recipe.profile,
            hash,
            suite: recipe.suite.clone(),
            packages: recipe.packages(),
            agents: recipe.sorted_agents(),
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            size_bytes,
            build_seconds,
            dir: final_dir.clone(),
        };
        let manifest = tmp.path().join(MANIFEST);
        let json = serde_json::to_vec_pretty(&image).map_err(|source| ImageError::Manifest {
            path: manifest.clone(),
            source,
        })?;
        write_synced(&manifest, &json)?;

        publish(tmp.path(), &final_dir)?;
        // `tmp` now holds the replaced image, if there was one.
        drop(tmp);
        sync_dir(&self.root);
        tracing::info!(id = %id, seconds = build_seconds, bytes = size_bytes, "built image");
        Ok(image)
    }

    /// Build directories of `id` left by a build that was killed. Only
    /// called under the id's lock, so none of them is in use.
    fn remove_stale_temporaries(&self, id: &str) {
        let prefix = format!("{TMP_PREFIX}{id}.");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(dir = %entry.path().display(), "removing a stale build directory");
                if let Err(e) = remove_dir_all(&entry.path()) {
                    tracing::warn!(error = %e, "could not remove a stale build directory");
                }
            }
        }
    }
}

/// The XDG base directory rule: a relative `XDG_CACHE_HOME` is ignored.
fn default_root_from(xdg_cache_home: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    let cache = xdg_cache_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.filter(|p| p.is_absolute()).map(|h| h.join(".cache")))?;
    Some(cache.join("keystone").join("images"))
}

/// Ids are `<profile>-<hex>`; anything else could escape the store.
fn validate_id(id: &str) -> Result<(), ImageError> {
    let ok = id.len() <= 64
        && id.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidId { id: id.to_owned() })
    }
}

/// Moves `from` to `to`; when `to` exists, atomically exchanges them so
/// `find` never sees a moment without an image, and leaves the old image in
/// `from`.
fn publish(from: &Path, to: &Path) -> Result<(), ImageError> {
    use nix::fcntl::{renameat2, RenameFlags};
    match fs::rename(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {}
        Err(e) => return Err(ImageError::io("move the new image to", to, e)),
    }
    match renameat2(None, from, None, to, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        // Filesystems without RENAME_EXCHANGE: two renames, with a short
        // window in which the image is absent (never half present).
        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
            let aside = from.with_extension("old");
            fs::rename(to, &aside).map_err(|e| ImageError::io("move aside", to, e))?;
            fs::rename(from, to).map_err(|e| ImageError::io("move the new image to", to, e))?;
            fs::rename(&aside, from).map_err(|e| ImageError::io("move", &aside, e))
        }
        Err(e) => Err(ImageError::io("replace", to, e.into())),
    }
}

/// fsyncs `path` and returns its size, so a crash after the rename cannot
/// leave a published image with a truncated tarball.
fn sync_file(path: &Path) -> Result<u64, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    file.sync_all()
        .map_err(|e| ImageError::io("sync", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| ImageError::io("read", path, e))?;
    Ok(meta.len())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut file = File::create(path).map_err(|e| ImageError::io("create", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| ImageError::io("write", path, e))
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not sync the image store");
    }
}

fn remove_dir_all(path: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    /// Writes a small fake tarball instead of running mmdebstrap.
    #[derive(Default)]
    struct FakeBuilder {
        builds: AtomicUsize,
        delay: Duration,
        fail: bool,
    }

    impl Builder for FakeBuilder {
        fn build(
            &self,
            _recipe: &Recipe,
            id: &str,
            rootfs_tar: &Path,
            log: &Path,
            progress: &dyn Progress,
        ) -> Result<(), ImageError> {
            let n = self.builds.fetch_add(1, Ordering::SeqCst) + 1;
            progress.line("fake build");
            std::thread::sleep(self.delay);
            fs::write(log, "fake log\n").expect("log");
            if self.fail {
                fs::write(rootfs_tar, b"partial").expect("partial");
                return Err(ImageError::BuildFailed {
                    id: id.to_owned(),
                    status: "exit status: 1".into(),
                    tail: "E: boom".into(),
                    log: log.to_owned(),
                });
            }
            fs::write(rootfs_tar, format!("build {n}")).expect("tar");
            Ok(())
        }
    }

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::new(dir.path().join("images"));
        (dir, store)
    }

    fn recipe() -> Recipe {
        Recipe::new(Profile::Minimal)
    }

    /// Names in the store root other than lock files.
    fn entries(store: &ImageStore) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.root())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn empty_store_finds_and_lists_nothing() {
        let (_dir, store) = store();
        assert!(store.find(&recipe()).expect("find").is_none());
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn build_publishes_a_complete_image() {
        let (_dir, store) = store();
        let image = store
            .build_with(&recipe(), &crate::NoProgress, &FakeBuilder::default())
            .expect("build");
        assert_eq!(image.id, recipe().id());
        assert_eq!(image.hash, recipe().hash());
        assert_eq!(image.packages, recipe().packages());
        assert_eq!(image.size_bytes, "build 1".len() as u64);
        assert_eq!(
            image.rootfs_tar(),
            store.root().join(&image.id).join("rootfs.tar")
        );
        assert!(image.rootfs_tar().is_file());
        let found = store.find(&recipe()).expect("find").expect("found");
        assert_eq!(found.id, image.id);
        assert_eq!(found.dir, image.dir);
        assert_eq!(
            entries(&store),
            [image.id.clone(), format!("{}.build.log", image.id)]
        );
    }

    #[test]
    fn ensure_builds_once_then_finds() {
        let (_dir, store) = store();
        let builder = FakeBuilder::default();
        let a = store
            .ensure_with(&recipe(), &crate::NoProgress, &builder)
            .expect("a");
        let b = store
            .ensure_with(&recipe(), &crate::NoProgress, &builder)
            .expect("b");
        assert_eq!(builder.builds.load(Ordering::SeqCst), 1);
        assert_eq!(a.created_at, b.created_at);
    }

    #[test]
    fn build_replaces_the_cached_image() {
        let (_dir, store) = store();
        let builder = FakeBuilder::default();
        store
            .build_with(&recipe(), &crate::NoProgress, &builder)
            .expect("first");
        let second = store
            .build_with(&recipe(), &crate::NoProgress, &builder)
            .expect("second");
        assert_eq!(
            fs::read_to_string(second.rootfs_tar()).expect("tar"),
            "build 2"
        );
        assert_eq!(store.list().expect("list").len(), 1);
        assert_eq!(
            entries(&store).len(),
            2,
            "no leftover directories: {:?}",
            entries(&store)
        );
    }

    #[test]
    fn failed_build_leaves_no_image_but_keeps_the_log() {
        let (_dir, store) = store();
        let builder = FakeBuilder {
            fail: true,
            ..Default::default()
        };
        let err = store
            .ensure_with(&recipe(), &crate::NoProgress, &builder)
            .expect_err("fails");
        assert!(matches!(err, ImageError::BuildFailed { .. }));
        assert!(store.find(&recipe()).expect("find").is_none());
        assert_eq!(entries(&store), [format!("{}.build.log", recipe().id())]);
    }

    #[test]
    fn incomplete_directories_are_not_images() {
        let (_dir, store) = store();
        let image = store
            .build_with(&recipe(), &crate::NoProgress, &FakeBuilder::default())
            .expect("build");
        let id = image.id.clone();
        let manifest = fs::read_to_string(image.dir.join(MANIFEST)).expect("manifest");

        // A build directory, even with both files, is not an image.
        let tmp = store.root().join(format!(".tmp-{id}.abc123"));
        fs::create_dir(&tmp).expect("mkdir");
        fs::write(tmp.join(ROOTFS), "x").expect("tar");
        fs::write(tmp.join(MANIFEST), &manifest).expect("manifest");
        assert_eq!(store.list().expect("list").len(), 1);

        // The image without its tarball.
        fs::remove_file(image.rootfs_tar()).expect("rm tar");
        assert!(store.find(&recipe()).expect("find").is_none());
        assert!(store.list().expect("list").is_empty());

        // The tarball without a manifest.
        fs::write(image.rootfs_tar(), "x").expect("tar");
        fs::remove_file(image.dir.join(MANIFEST)).expect("rm manifest");
        assert!(store.find(&recipe()).expect("find").is_none());

        // A corrupt manifest.
        fs::write(image.dir.join(MANIFEST), "{").expect("corrupt");
        assert!(store.find(&recipe()).expect("find").is_none());

        // A manifest of another recipe under this id.
        let mut other: Image = serde_json::from_str(&manifest).expect("parse");
        other.hash = "0".repeat(64);
        fs::write(
            image.dir.join(MANIFEST),
            serde_json::to_vec(&other).expect("json"),
        )
        .expect("write");
        assert!(store.find(&recipe()).expect("find").is_none());
    }

    #[test]
    fn a_new_build_removes_stale_build_directories() {
        let (_dir, store) = store();
        let id = recipe().id();
        fs::create_dir_all(store.root().join(format!(".tmp-{id}.killed")).join("x"))
            .expect("mkdir");
        let other = store.root().join(".tmp-full-0123456789ab.running");
        fs::create_dir_all(&other).expect("mkdir");
        store
            .ensure_with(&recipe(), &crate::NoProgress, &FakeBuilder::default())
            .expect("build");
        assert!(!store.root().join(format!(".tmp-{id}.killed")).exists());
        assert!(other.exists(), "another id's build is not ours to clean");
    }

    #[test]
    fn list_finds_images_newest_first() {
        let (_dir, store) = store();
        let builder = FakeBuilder::default();
        let minimal = store
            .build_with(&recipe(), &crate::NoProgress, &builder)
            .expect("minimal");
        let mut full_recipe = Recipe::new(Profile::Full);
        full_recipe.extra_packages = vec!["vim".into()];
        let full = store
            .build_with(&full_recipe, &crate::NoProgress, &builder)
            .expect("full");
        // Make the order independent of the clock's resolution.
        let mut older: Image = minimal.clone();
        older.created_at = full.created_at - 10;
        fs::write(
            minimal.dir.join(MANIFEST),
            serde_json::to_vec(&older).expect("json"),
        )
        .expect("write");
        let listed: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(listed, [full.id.clone(), minimal.id.clone()]);
        assert_eq!(
            store.find(&full_recipe).expect("find").expect("found").id,
            full.id
        );
    }

    #[test]
    fn remove_deletes_the_image_and_its_log() {
        let (_dir, store) = store();
        let image = store
            .build_with(&recipe(), &crate::NoProgress, &FakeBuilder::default())
            .expect("build");
        let removed = store.remove(&image.id).expect("remove");
        assert_eq!(removed.id, image.id);
        assert!(store.find(&recipe()).expect("find").is_none());
        assert!(entries(&store).is_empty(), "{:?}", entries(&store));
        let err = store.remove(&image.id).expect_err("gone");
        assert!(matches!(err, ImageError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&image.id));
    }

    #[test]
    fn remove_rejects_ids_that_could_escape_the_store() {
        let (_dir, store) = store();
        for id in [
            "",
            "..",
            "../x",
            "/etc",
            ".tmp-minimal-x",
            "Minimal-1",
            "a/b",
        ] {
            assert!(
                matches!(store.remove(id), Err(ImageError::InvalidId { .. })),
                "{id:?}"
            );
        }
        assert!(matches!(
            store.remove("minimal-0123456789ab"),
            Err(ImageError::NotFound { .. })
        ));
    }

    #[test]
    fn concurrent_ensure_builds_once() {
        let (_dir, store) = store();
        let builder = Arc::new(FakeBuilder {
            delay: Duration::from_millis(300),
            ..Default::default()
        });
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let builder = Arc::clone(&builder);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    store
                        .ensure_with(&recipe(), &crate::NoProgress, builder.as_ref())
                        .expect("ensure")
                })
            })
            .collect();
        let images: Vec<Image> = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        assert_eq!(builder.builds.load(Ordering::SeqCst), 1);
        assert!(images.iter().all(|i| i.created_at == images[0].created_at));
        assert_eq!(store.list().expect("list").len(), 1);
    }

    #[test]
    fn waiting_for_the_lock_is_reported() {
        use std::cell::RefCell;
        #[derive(Default)]
        struct Phases(RefCell<Vec<String>>);
        impl Progress for Phases {
            fn phase(&self, message: &str) {
                self.0.borrow_mut().push(message.to_owned());
            }
            fn line(&self, _: &str) {}
        }

        let (_dir, store) = store();
        let id = recipe().id();
        let held = store.lock(&id, &crate::NoProgress).expect("lock");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let phases = Phases::default();
        let started = Instant::now();
        let lock = store.lock(&id, &phases).expect("second lock");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(phases.0.borrow()[0].contains("waiting for another build"));
        drop(lock);
        release.join().expect("join");
    }

    #[test]
    fn default_root_follows_xdg_then_home() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            default_root_from(p("/xdg"), p("/home/u")),
            p("/xdg/keystone/images")
        );
        assert_eq!(
            default_root_from(p("relative"), p("/home/u")),
            p("/home/u/.cache/keystone/images")
        );
        assert_eq!(
            default_root_from(None, p("/home/u")),
            p("/home/u/.cache/keystone/images")
        );
        assert_eq!(default_root_from(None, None), None);
        assert_eq!(default_root_from(None, p("")), None);
    }
}
