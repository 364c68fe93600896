//! The content-addressed artifact store.
//!
//! ```text
//! .rudder/store.json                 layout version
//! .rudder/lock                       writers share a lock on this file; `gc` holds it alone
//! .rudder/locks/<key>                held by whoever builds that key (pid and host inside)
//! .rudder/objects/<key>/             one immutable artifact: its files + manifest.json
//! .rudder/tmp/<key>.*                artifacts being built; renamed into objects/ when complete
//! .rudder/work/<key>/                checkpoints of an unfinished stage, and its status.json
//! .rudder/runs/                      one JSON record per run; <ms>-<pid>.live.json while it runs
//! .rudder/slurm/<key>.{sh,log,job}   a Slurm job's script, its output, its id (`slurm.rs`)
//! .rudder/cache/digests.json         file digests by path, size and mtime
//! .rudder/cache/pull/<blake3>        files a pull fetched and verified, until their artifact
//!                                    is committed (`remote/pull.rs`)
//! ```
//!
//! An artifact becomes visible in one `rename` of a complete directory, so a crash at any point
//! leaves either no artifact or a whole one. `tmp/` and `objects/` are in one directory, hence
//! on one filesystem, so that rename is atomic on a shared filesystem as well.
//!
//! Locking, with `flock` (which Linux maps onto the NFS lock protocol; Lustre needs its `flock`
//! mount option):
//!
//! ```text
//!   rudder run / rudder exec     lock (shared)  ─┬─ lock_key(k1) build k1, commit
//!                                                └─ lock_key(k2) ...
//!   rudder gc                    lock_exclusive: no writer is running
//! ```
//!
//! Any number of runs, threads and Slurm jobs write to one store at once: the per-key lock makes
//! each key built by one of them, the others wait for it and find it built. A `tmp/` entry
//! whose key's lock nobody holds was left by a builder that died: the next writer removes it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::{DigestCache, list_files};
use crate::error::EngineError;
use crate::fsutil::write_atomic;
use crate::key::Key;

/// Version of the directory layout and manifest format. Version 2 added per-key locks (a
/// shared store lock) and `slurm/`; a version-1 store is read and written as it is, since a
/// version-1 rudder's exclusive store lock still excludes every newer writer.
pub const LAYOUT_VERSION: u32 = 2;

/// Layouts this rudder reads.
const READS_LAYOUTS: std::ops::RangeInclusive<u64> = 1..=LAYOUT_VERSION as u64;

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// `manifest.json`: what an artifact is and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub layout: u32,
    pub key: String,
    pub kind: String,
    /// The node's name when it was built (informational: names are not in keys).
    pub name: String,
    pub implementation_version: u32,
    pub params: Value,
    /// Input keys by role.
    pub inputs: BTreeMap<String, String>,
    pub seed: u64,
    pub backend: String,
    pub precision: String,
    pub files: Vec<FileEntry>,
    /// Final metrics of the stage (loss, accuracy, ...).
    #[serde(default)]
    pub summary: BTreeMap<String, f64>,
    pub rudder_version: String,
    pub started: String,
    pub seconds: f64,
}

/// A store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while writing to the store (shared) or collecting garbage (exclusive); released on
/// drop (and by the OS if the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Held while building one key; released on drop (and by the OS if the process dies).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

/// An artifact being built: the stage writes into `dir`, then [`Store::commit`] publishes it.
#[derive(Debug)]
pub struct Pending {
    pub key: Key,
    pub dir: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.join("objects").is_dir()
    }

    fn io(&self, context: &str, path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
        let context = format!("{context} {}", path.display());
        move |source| EngineError::Io { context, source }
    }

    /// Creates the layout if missing and checks its version.
    pub fn init(&self) -> Result<(), EngineError> {
        for dir in ["objects", "tmp", "work", "runs", "cache", "locks"] {
            let path = self.root.join(dir);
            std::fs::create_dir_all(&path).map_err(self.io("creating", &path))?;
        }
        let marker = self.root.join("store.json");
        match std::fs::read(&marker) {
            Ok(bytes) => {
                let layout = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("layout").and_then(Value::as_u64));
                match layout {
                    Some(v) if READS_LAYOUTS.contains(&v) => Ok(()),
                    Some(v) => Err(EngineError::Store {
                        path: self.root.clone(),
                        message: format!(
                            "layout version {v}, but this rudder reads version {LAYOUT_VERSION}"
                        ),
                    }),
                    None => Err(EngineError::Store {
                        path: self.root.clone(),
                        message: "store.json is unreadable".into(),
                    }),
                }
            }
            Err(_) => write_atomic(
                &marker,
                serde_json::json!({ "layout": LAYOUT_VERSION })
                    .to_string()
                    .as_bytes(),
            ),
        }
    }

    /// Takes the writer lock, shared with other writers (runs, their threads, Slurm jobs). When
    /// `gc` holds it, calls `on_wait` with that process's id (if known) and waits.
    pub fn lock(&self, on_wait: impl FnOnce(Option<u32>)) -> Result<StoreLock, EngineError> {
        let path = self.root.join("lock");
        let mut file = self.lock_file(&path)?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                on_wait(holder.trim().parse().ok());
                file.lock_shared().map_err(self.io("locking", &path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(self.io("locking", &path)(e)),
        }
        self.sweep_tmp();
        Ok(StoreLock { _file: file })
    }

    /// Removes what builders that died left in `tmp/`: entries of keys whose lock nobody holds.
    fn sweep_tmp(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.split('.').next().and_then(Key::from_hex) else {
                continue;
            };
            let lock = self.root.join("locks").join(key.to_hex());
            let Ok(file) = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock)
            else {
                continue;
            };
            if file.try_lock().is_ok() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Takes the store lock alone (`gc`): waits until no writer holds it, then removes every
    /// leftover of `tmp/` and the key locks, since no build is running (keys are locked only
    /// under the shared store lock).
    pub fn lock_exclusive(
        &self,
        on_wait: impl FnOnce(Option<u32>),
    ) -> Result<StoreLock, EngineError> {
        let path = self.root.join("lock");
        let mut file = self.lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // Shared holders do not write their ids: there may be many.
                on_wait(None);
                file.lock().map_err(self.io("locking", &path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(self.io("locking", &path)(e)),
        }
        // Record the holder for the message a waiting writer prints.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()));
        if let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.root.join("locks")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(StoreLock { _file: file })
    }

    /// Takes the lock of one key, to build it. When another process holds it, calls `on_wait`
    /// with who that is (`pid 123 on node7`) and waits. Leftovers of an earlier build of the key
    /// in `tmp/` belong to a builder that died, and are removed.
    pub fn lock_key(
        &self,
        key: &Key,
        on_wait: impl FnOnce(Option<String>),
    ) -> Result<KeyLock, EngineError> {
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir).map_err(self.io("creating", &dir))?;
        let path = dir.join(key.to_hex());
        let mut file = self.lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                on_wait((!holder.is_empty()).then(|| holder.to_owned()));
                file.lock().map_err(self.io("locking", &path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(self.io("locking", &path)(e)),
        }
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| {
            write!(
                file,
                "pid {} on {}",
                std::process::id(),
                crate::fsutil::host_name()
            )
        });
        let prefix = format!("{}.", key.to_hex());
        if let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(KeyLock { _file: file })
    }

    fn lock_file(&self, path: &Path) -> Result<File, EngineError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(self.io("opening", path))
    }

    /// Directories in `tmp/` where the artifact `key` is being built now (by [`Store::begin`]).
    pub fn pending_dirs(&self, key: &Key) -> Vec<PathBuf> {
        let prefix = format!("{}.", key.to_hex());
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        dirs
    }

    pub fn object_dir(&self, key: &Key) -> PathBuf {
        self.root.join("objects").join(key.to_hex())
    }

    pub fn work_dir(&self, key: &Key) -> PathBuf {
        self.root.join("work").join(key.to_hex())
    }

    /// Whether a complete artifact with this key is in the store.
    pub fn contains(&self, key: &Key) -> bool {
        self.object_dir(key).join("manifest.json").is_file()
    }

    pub fn manifest(&self, key: &Key) -> Result<Option<Manifest>, EngineError> {
        let path = self.object_dir(key).join("manifest.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| EngineError::Store {
                    path: path.clone(),
                    message: format!("unreadable manifest: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading", &path)(e)),
        }
    }

    /// A fresh, empty directory for building the artifact `key` (the caller holds its
    /// [`KeyLock`]).
    pub fn begin(&self, key: &Key) -> Result<Pending, EngineError> {
        let tmp = self.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(self.io("creating", &tmp))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", key.to_hex()))
            .tempdir_in(&tmp)
            .map_err(self.io("creating a directory in", &tmp))?
            .keep();
        Ok(Pending { key: *key, dir })
    }

    /// Describes the pending artifact's files (every file but the manifest).
    pub fn describe_files(&self, pending: &Pending) -> Result<Vec<FileEntry>, EngineError> {
        let cache = DigestCache::in_memory();
        let mut files = Vec::new();
        for name in list_files(&pending.dir)? {
            if name == "manifest.json" {
                continue;
            }
            let path = pending.dir.join(&name);
            let size = std::fs::metadata(&path)
                .map_err(self.io("reading", &path))?
                .len();
            files.push(FileEntry {
                blake3: cache.file(&path)?,
                name,
                size,
            });
        }
        Ok(files)
    }

    /// Writes the manifest and publishes the artifact atomically. An artifact already there
    /// (a forced re-run) is replaced.
    pub fn commit(&self, pending: Pending, manifest: &Manifest) -> Result<PathBuf, EngineError> {
        let bytes = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        let manifest_path = pending.dir.join("manifest.json");
        std::fs::write(&manifest_path, bytes).map_err(self.io("writing", &manifest_path))?;
        sync_tree(&pending.dir).map_err(self.io("syncing", &pending.dir))?;
        let target = self.object_dir(&pending.key);
        if target.exists() {
            let old = self
                .root
                .join("tmp")
                .join(format!("{}.replaced", pending.key.to_hex()));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&target, &old).map_err(self.io("replacing", &target))?;
            std::fs::rename(&pending.dir, &target).map_err(self.io("publishing", &target))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&pending.dir, &target).map_err(self.io("publishing", &target))?;
        }
        if let Some(parent) = target.parent()
            && let Ok(dir) = File::open(parent)
        {
            let _ = dir.sync_all();
        }
        Ok(target)
    }

    /// Discards a pending artifact (the stage failed).
    pub fn abandon(&self, pending: Pending) {
        let _ = std::fs::remove_dir_all(&pending.dir);
    }

    /// Every artifact key in the store.
    pub fn objects(&self) -> Result<Vec<Key>, EngineError> {
        let dir = self.root.join("objects");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("listing", &dir)(e)),
        };
        let mut keys: Vec<Key> = entries
            .flatten()
            .filter_map(|e| Key::from_hex(&e.file_name().to_string_lossy()))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Keys that have a work directory (checkpoints of unfinished stages).
    pub fn work_dirs(&self) -> Vec<Key> {
        std::fs::read_dir(self.root.join("work"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| Key::from_hex(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn remove_object(&self, key: &Key) -> Result<(), EngineError> {
        let dir = self.object_dir(key);
        // Rename first so that a crash mid-removal never leaves a partial artifact visible.
        let doomed = self
            .root
            .join("tmp")
            .join(format!("{}.removed", key.to_hex()));
        std::fs::create_dir_all(self.root.join("tmp")).map_err(self.io("creating", &self.root))?;
        std::fs::rename(&dir, &doomed).map_err(self.io("removing", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(self.io("removing", &doomed))
    }

    pub fn digest_cache(&self) -> DigestCache {
        DigestCache::load(self.root.join("cache").join("digests.json"))
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Slurm jobs' scripts, logs and ids.
    pub fn slurm_dir(&self) -> PathBuf {
        self.root.join("slurm")
    }

    /// Total size in bytes of an artifact's files.
    pub fn size_of(manifest: &Manifest) -> u64 {
        manifest.files.iter().map(|f| f.size).sum()
    }
}

/// fsync every file and directory under `dir`, so that the rename publishes durable content.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    fn manifest(key: &Key, files: Vec<FileEntry>) -> Manifest {
        Manifest {
            layout: LAYOUT_VERSION,
            key: key.to_hex(),
            kind: "command".into(),
            name: "x".into(),
            implementation_version: 1,
            params: Value::Null,
            inputs: BTreeMap::new(),
            seed: 0,
            backend: "cpu".into(),
            precision: "fp32".into(),
            files,
            summary: BTreeMap::new(),
            rudder_version: "test".into(),
            started: String::new(),
            seconds: 0.0,
        }
    }

    #[test]
    fn commit_publishes_a_complete_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let _lock = store.lock(|_| panic!("nobody else holds it")).unwrap();
        let key = KeyBuilder::new("test").str("a").finish();
        let _key_lock = store
            .lock_key(&key, |_| panic!("nobody builds it"))
            .unwrap();
        let pending = store.begin(&key).unwrap();
        std::fs::write(pending.dir.join("out.txt"), "hi").unwrap();
        assert!(!store.contains(&key));
        let files = store.describe_files(&pending).unwrap();
        assert_eq!(files[0].name, "out.txt");
        store.commit(pending, &manifest(&key, files)).unwrap();
        assert!(store.contains(&key));
        assert_eq!(store.objects().unwrap(), vec![key]);
        let read = store.manifest(&key).unwrap().unwrap();
        assert_eq!(read.files[0].size, 2);
        store.remove_object(&key).unwrap();
        assert!(!store.contains(&key));
    }

    #[test]
    fn abandoned_work_is_not_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let key = KeyBuilder::new("test").str("b").finish();
        let pending = store.begin(&key).unwrap();
        std::fs::write(pending.dir.join("partial"), "x").unwrap();
        store.abandon(pending);
        assert!(!store.contains(&key));
        assert!(store.objects().unwrap().is_empty());
    }

    #[test]
    fn writers_share_the_store_and_exclude_each_other_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let _a = store
            .lock(|_| panic!("writers share the store lock"))
            .unwrap();
        let _b = store
            .lock(|_| panic!("writers share the store lock"))
            .unwrap();
        let key = KeyBuilder::new("test").str("c").finish();
        let held = store.lock_key(&key, |_| panic!("free")).unwrap();
        // A leftover of a builder that died is removed by the next holder of the key's lock.
        let stale = store.begin(&key).unwrap();
        drop(held);
        let other = KeyBuilder::new("test").str("d").finish();
        let other_pending = store.begin(&other).unwrap();
        let held = store.lock_key(&key, |_| panic!("free again")).unwrap();
        assert!(!stale.dir.exists());
        assert!(
            other_pending.dir.exists(),
            "another key's build is left alone"
        );
        // While one holds the key, another waits and is told who holds it.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let _lock = store
                    .lock_key(&key, |holder| tx.send(holder).unwrap())
                    .unwrap();
            })
        };
        let holder = rx.recv().unwrap().unwrap();
        assert!(
            holder.starts_with(&format!("pid {} on ", std::process::id())),
            "{holder}"
        );
        drop(held);
        waiter.join().unwrap();
    }

    #[test]
    fn gc_waits_for_writers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let writer = store.lock(|_| panic!("free")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let gc = {
            let store = store.clone();
            std::thread::spawn(move || {
                let _lock = store.lock_exclusive(|_| tx.send(()).unwrap()).unwrap();
            })
        };
        rx.recv().unwrap();
        drop(writer);
        gc.join().unwrap();
    }

    #[test]
    fn version_1_stores_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::write(store.root().join("store.json"), r#"{"layout": 1}"#).unwrap();
        store.init().unwrap();
    }

    #[test]
    fn newer_layouts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::write(store.root().join("store.json"), r#"{"layout": 99}"#).unwrap();
        let err = store.init().unwrap_err().to_string();
        assert!(err.contains("layout version 99"), "{err}");
    }
}
