//! The content-addressed artifact store.
//!
//! ```text
//! .rudder/store.json                 layout version
//! .rudder/lock                       writers share a lock on this file; `gc` holds it alone
//! .rudder/locks/<key>                held by whoever builds that key (pid and host inside)
//! .rudder/objects/<key>/             one immutable, read-only artifact: its files + manifest.json
//! .rudder/tmp/<key>.*                artifacts being built; renamed into objects/ when complete
//! .rudder/work/<key>/                checkpoints of an unfinished stage, and its status.json
//!                                    (writable)
//! .rudder/runs/                      one JSON record per run; <ms>-<pid>.live.json while it runs
//! .rudder/slurm/<key>.{sh,log,job}   a Slurm job's script, its output, its id (`slurm.rs`)
//! .rudder/quarantine/<key>-<time>/   a corrupted artifact moved aside: note.json + artifact/
//! .rudder/cache/digests.json         file digests by path, size and mtime
//! .rudder/cache/verified/<key>.json  stats of artifact files re-hashed after their commit
//! .rudder/cache/cubecl/              CubeCL's compiled kernels and autotune results (GPU backends)
//! .rudder/cache/pull/<blake3>        files a pull fetched and verified, until their artifact
//!                                    is committed (`remote/pull.rs`)
//! ```
//!
//! Committing an artifact, in order: its files are hashed, made read-only and their stat
//! recorded; `manifest.json` is written; every file and directory is synced; the directory is
//! renamed into `objects/` and `objects/` synced. The rename is the one step that publishes,
//! so a crash or an error at any point leaves either no artifact or a whole one, and the
//! pending directory is removed (by the failing writer, or by the next one if it was killed).
//! `tmp/` and `objects/` are in one directory, hence on one filesystem, so that rename is
//! atomic on a shared filesystem as well.
//!
//! An artifact is checked against its manifest before it is used ([`Store::check`], with the
//! file checks of `integrity.rs`); one that fails is never used but moved to `quarantine/`
//! ([`Store::quarantine`], by the holder of its key's lock) and built again.
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
//! whose key's lock nobody holds was left by a builder that died: the next writer removes it
//! (read-only or not: a builder may die after making its files read-only).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::{DigestCache, list_files};
use crate::error::EngineError;
use crate::fault;
use crate::fsutil::write_atomic;
pub use crate::integrity::FileEntry;
use crate::integrity::{FileStat, Problem, VerifyMode, check_files, make_read_only, remove_tree};
use crate::key::Key;
use crate::sandbox::SandboxRecord;

/// Version of the directory layout and manifest format. Version 2 made artifacts read-only,
/// added each file's stat to the manifest, `quarantine/`, per-key locks under a shared store
/// lock, and `slurm/`. A version-1 store is upgraded in place when a writer opens it: under the
/// store lock held alone (which a version-1 rudder's exclusive lock excludes, so the upgrade
/// waits for it to finish) its artifacts are made read-only and the marker says 2; having no
/// recorded stat, their files are hashed once when first checked. A version-1 rudder refuses
/// the store from then on, as it must: it could not replace or remove read-only artifacts.
pub const LAYOUT_VERSION: u32 = 2;

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
    /// How a command stage was confined while it ran (absent for other kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxRecord>,
    pub rudder_version: String,
    pub started: String,
    pub seconds: f64,
    /// The measured peak memory of the stage (absent where it cannot be read, for command
    /// stages, and in manifests written before it existed). The record carries its own
    /// format version; it is never part of a key.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::peak::lenient"
    )]
    pub peak_memory: Option<crate::peak::PeakMemory>,
}

/// Whether an artifact can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Missing,
    Intact,
    Corrupted(Vec<Problem>),
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

/// Stats of an artifact's files that were verified by hashing after the commit.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Verified {
    files: BTreeMap<String, FileStat>,
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

    /// Creates the layout if missing and checks its version (upgrading a version-1 store).
    pub fn init(&self) -> Result<(), EngineError> {
        for dir in ["objects", "tmp", "work", "runs", "cache", "locks"] {
            let path = self.root.join(dir);
            std::fs::create_dir_all(&path).map_err(self.io("creating", &path))?;
        }
        let marker = self.root.join("store.json");
        match std::fs::read(&marker) {
            Ok(bytes) => match layout_of(&bytes) {
                Some(v) if v == u64::from(LAYOUT_VERSION) => Ok(()),
                Some(1) => self.upgrade_from_1(&marker),
                Some(v) if v > u64::from(LAYOUT_VERSION) => Err(EngineError::Store {
                    path: self.root.clone(),
                    message: format!(
                        "layout version {v} is newer than this rudder's {LAYOUT_VERSION}: use a newer rudder (or another --store)"
                    ),
                }),
                Some(v) => Err(EngineError::Store {
                    path: self.root.clone(),
                    message: format!("layout version {v} was never written by rudder"),
                }),
                None => Err(EngineError::Store {
                    path: self.root.clone(),
                    message: "store.json is unreadable".into(),
                }),
            },
            Err(_) => write_marker(&marker),
        }
    }

    /// Upgrades a version-1 store (see [`LAYOUT_VERSION`]). Version 1 differs only in writable
    /// artifacts and manifests without stats, which the checks treat as "hash once", and in
    /// its exclusive store lock and `tmp/` names, which holding the lock alone makes moot.
    fn upgrade_from_1(&self, marker: &Path) -> Result<(), EngineError> {
        let _alone = self.lock_exclusive(|_| {
            tracing::warn!(
                "waiting for another rudder to finish with {} before upgrading it to layout {LAYOUT_VERSION}",
                self.root.display()
            );
        })?;
        // Another writer may have upgraded it while this one waited.
        if read_layout(marker) == Some(u64::from(LAYOUT_VERSION)) {
            return Ok(());
        }
        for key in self.objects()? {
            let dir = self.object_dir(&key);
            make_read_only(&dir).map_err(self.io("upgrading", &dir))?;
        }
        write_marker(marker)
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
                let _ = remove_tree(&entry.path());
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
                let _ = remove_tree(&entry.path());
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
                    let _ = remove_tree(&entry.path());
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

    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    fn verified_path(&self, key: &Key) -> PathBuf {
        self.root
            .join("cache")
            .join("verified")
            .join(format!("{}.json", key.to_hex()))
    }

    /// Whether a complete artifact with this key is in the store (whatever its health).
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

    /// Checks an artifact against its manifest before it is used. Never fails: what cannot be
    /// read is a problem of the artifact.
    pub fn check(&self, key: &Key, mode: VerifyMode) -> Health {
        self.check_counting(key, mode).0
    }

    /// [`Store::check`], and the number of bytes it hashed.
    pub fn check_counting(&self, key: &Key, mode: VerifyMode) -> (Health, u64) {
        let dir = self.object_dir(key);
        let manifest = match self.manifest(key) {
            Ok(Some(m)) => m,
            Ok(None) if !dir.exists() => return (Health::Missing, 0),
            Ok(None) => {
                let problem = Problem::Manifest {
                    message: "missing".into(),
                };
                return (Health::Corrupted(vec![problem]), 0);
            }
            Err(e) => {
                let message = match e {
                    EngineError::Store { message, .. } => message,
                    other => other.to_string(),
                };
                return (Health::Corrupted(vec![Problem::Manifest { message }]), 0);
            }
        };
        if manifest.key != key.to_hex() {
            let problem = Problem::Manifest {
                message: format!("describes artifact {}, not this one", manifest.key),
            };
            return (Health::Corrupted(vec![problem]), 0);
        }
        let verified: Verified = std::fs::read(self.verified_path(key))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let check = check_files(
            &dir,
            &manifest.files,
            mode,
            &|name| verified.files.get(name).copied(),
            &["manifest.json"],
        );
        if !check.problems.is_empty() {
            return (Health::Corrupted(check.problems), check.hashed_bytes);
        }
        if !check.rehashed.is_empty() {
            // Only a cache: the next check hashes again if it cannot be written.
            let mut verified = verified;
            verified.files.extend(check.rehashed);
            let path = self.verified_path(key);
            if let Some(parent) = path.parent()
                && std::fs::create_dir_all(parent).is_ok()
            {
                let bytes = serde_json::to_vec(&verified).expect("stats serialise");
                let _ = write_atomic(&path, &bytes);
            }
        }
        (Health::Intact, check.hashed_bytes)
    }

    /// Moves a corrupted artifact out of `objects/` into `quarantine/<key>-<time>/artifact/`,
    /// beside a `note.json` that says what was wrong. The caller holds the key's [`KeyLock`].
    pub fn quarantine(&self, key: &Key, problems: &[Problem]) -> Result<PathBuf, EngineError> {
        let source = self.object_dir(key);
        let now = SystemTime::now();
        let stamp: String = humantime::format_rfc3339_millis(now)
            .to_string()
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let place = self
            .quarantine_dir()
            .join(format!("{}-{stamp}", key.to_hex()));
        std::fs::create_dir_all(&place).map_err(self.io("creating", &place))?;
        let manifest = self.manifest(key).ok().flatten();
        // Moving a directory to another parent rewrites its `..`: it must be writable.
        crate::integrity::make_dirs_writable(&source).map_err(self.io("quarantining", &source))?;
        let target = place.join("artifact");
        std::fs::rename(&source, &target).map_err(self.io("quarantining", &source))?;
        let _ = crate::integrity::make_writable(&target);
        let _ = std::fs::remove_file(self.verified_path(key));
        let note = serde_json::json!({
            "key": key.to_hex(),
            "kind": manifest.as_ref().map(|m| m.kind.clone()),
            "name": manifest.as_ref().map(|m| m.name.clone()),
            "quarantined": humantime::format_rfc3339_seconds(now).to_string(),
            "problems": problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "note": "this artifact did not match its manifest and was moved out of the store; rudder builds it again when it is needed. Inspect it, then delete this directory.",
        });
        write_atomic(
            &place.join("note.json"),
            serde_json::to_string_pretty(&note)
                .expect("note serialises")
                .as_bytes(),
        )?;
        Ok(place)
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
        fault::hit("commit.hash", None).map_err(self.io("reading", &pending.dir))?;
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
                stat: None,
            });
        }
        Ok(files)
    }

    /// Makes the pending artifact read-only, records its files' stats in the manifest, writes
    /// the manifest and publishes the artifact atomically. An artifact already there (a forced
    /// re-run) is replaced. On any error the pending directory is removed and nothing is
    /// published.
    pub fn commit(&self, pending: Pending, manifest: &Manifest) -> Result<PathBuf, EngineError> {
        let result = self.publish(&pending, manifest);
        if result.is_err() {
            let _ = remove_tree(&pending.dir);
        }
        result
    }

    fn publish(&self, pending: &Pending, manifest: &Manifest) -> Result<PathBuf, EngineError> {
        let dir = &pending.dir;
        let mut manifest = manifest.clone();
        make_read_only(dir).map_err(self.io("making read-only", dir))?;
        // Writable again only for the manifest to be added; its files keep their bits.
        crate::integrity::make_dirs_writable(dir).map_err(self.io("writing", dir))?;
        for file in &mut manifest.files {
            let path = dir.join(&file.name);
            let metadata = std::fs::metadata(&path).map_err(self.io("reading", &path))?;
            file.stat = Some(FileStat::of(&metadata));
        }
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let manifest_path = dir.join("manifest.json");
        let mut out = File::create(&manifest_path).map_err(self.io("writing", &manifest_path))?;
        fault::write_all("commit.manifest", Some(&manifest_path), &mut out, &bytes)
            .map_err(self.io("writing", &manifest_path))?;
        drop(out);
        make_read_only(dir).map_err(self.io("making read-only", dir))?;
        fault::hit("commit.sync", None)
            .and_then(|()| sync_tree(dir))
            .map_err(self.io("syncing", dir))?;
        let target = self.object_dir(&pending.key);
        fault::hit("commit.rename", None).map_err(self.io("publishing", &target))?;
        if target.exists() {
            let old = self
                .root
                .join("tmp")
                .join(format!("{}.replaced", pending.key.to_hex()));
            let _ = remove_tree(&old);
            crate::integrity::make_dirs_writable(&target).map_err(self.io("replacing", &target))?;
            std::fs::rename(&target, &old).map_err(self.io("replacing", &target))?;
            // The directory itself must be writable to move to another parent; it is closed again
            // once in place.
            set_dir_writable(dir, true).map_err(self.io("publishing", &target))?;
            std::fs::rename(dir, &target).map_err(self.io("publishing", &target))?;
            let _ = remove_tree(&old);
        } else {
            set_dir_writable(dir, true).map_err(self.io("publishing", &target))?;
            std::fs::rename(dir, &target).map_err(self.io("publishing", &target))?;
        }
        set_dir_writable(&target, false).map_err(self.io("making read-only", &target))?;
        let _ = std::fs::remove_file(self.verified_path(&pending.key));
        if let Some(parent) = target.parent()
            && let Ok(dir) = File::open(parent)
        {
            let _ = dir.sync_all();
        }
        fault::hit("commit.published", None).map_err(self.io("publishing", &target))?;
        Ok(target)
    }

    /// Discards a pending artifact (the stage failed).
    pub fn abandon(&self, pending: Pending) {
        let _ = remove_tree(&pending.dir);
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
        set_dir_writable(&dir, true).map_err(self.io("removing", &dir))?;
        std::fs::rename(&dir, &doomed).map_err(self.io("removing", &dir))?;
        let _ = std::fs::remove_file(self.verified_path(key));
        remove_tree(&doomed).map_err(self.io("removing", &doomed))
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

fn layout_of(marker: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(marker)
        .ok()
        .and_then(|v| v.get("layout").and_then(Value::as_u64))
}

fn read_layout(marker: &Path) -> Option<u64> {
    layout_of(&std::fs::read(marker).ok()?)
}

fn write_marker(marker: &Path) -> Result<(), EngineError> {
    write_atomic(
        marker,
        serde_json::json!({ "layout": LAYOUT_VERSION })
            .to_string()
            .as_bytes(),
    )
}

/// Sets or clears the owner's write bit of one directory (not its content).
fn set_dir_writable(dir: &Path, writable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    let new = if writable {
        mode | 0o200
    } else {
        mode & !0o222
    };
    if new != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(new))?;
    }
    Ok(())
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
    use std::os::unix::fs::PermissionsExt;

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
            sandbox: None,
            rudder_version: "test".into(),
            started: String::new(),
            seconds: 0.0,
            peak_memory: None,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        (dir, store)
    }

    /// Builds and commits an artifact with one file `out.txt`, as a builder does: under the
    /// key's lock.
    fn build(store: &Store, name: &str, text: &str) -> Result<Key, EngineError> {
        let key = KeyBuilder::new("test").str(name).finish();
        let _key_lock = store
            .lock_key(&key, |_| panic!("nobody builds it"))
            .unwrap();
        let pending = store.begin(&key).unwrap();
        std::fs::create_dir(pending.dir.join("sub")).unwrap();
        std::fs::write(pending.dir.join("out.txt"), text).unwrap();
        std::fs::write(pending.dir.join("sub/more.txt"), "more").unwrap();
        let files = store.describe_files(&pending).unwrap();
        store.commit(pending, &manifest(&key, files))?;
        Ok(key)
    }

    fn tmp_is_empty(store: &Store) -> bool {
        std::fs::read_dir(store.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    }

    #[test]
    fn commit_publishes_a_complete_read_only_artifact() {
        let (_dir, store) = store();
        let _lock = store.lock(|_| panic!("nobody else holds it")).unwrap();
        let key = build(&store, "a", "hi").unwrap();
        assert!(store.contains(&key));
        assert_eq!(store.objects().unwrap(), vec![key]);
        let read = store.manifest(&key).unwrap().unwrap();
        assert_eq!(read.files[0].name, "out.txt");
        assert_eq!(read.files[0].size, 2);
        assert!(read.files[0].stat.is_some());
        let dir = store.object_dir(&key);
        for path in [
            dir.clone(),
            dir.join("out.txt"),
            dir.join("sub"),
            dir.join("sub/more.txt"),
            dir.join("manifest.json"),
        ] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o222, 0, "{} is writable", path.display());
        }
        assert_eq!(store.check(&key, VerifyMode::Cheap), Health::Intact);
        assert_eq!(store.check(&key, VerifyMode::Full), Health::Intact);
        // A forced re-run replaces it; removal works on read-only trees.
        build(&store, "a", "hi").unwrap();
        assert_eq!(store.check(&key, VerifyMode::Full), Health::Intact);
        store.remove_object(&key).unwrap();
        assert!(!store.contains(&key));
        assert!(tmp_is_empty(&store));
    }

    #[test]
    fn abandoned_work_is_not_visible() {
        let (_dir, store) = store();
        let key = KeyBuilder::new("test").str("b").finish();
        let pending = store.begin(&key).unwrap();
        std::fs::write(pending.dir.join("partial"), "x").unwrap();
        store.abandon(pending);
        assert!(!store.contains(&key));
        assert!(store.objects().unwrap().is_empty());
    }

    /// Every failure the commit protocol can meet before the rename publishes nothing, leaves
    /// nothing in tmp/, keeps the artifact that was there, and a retry succeeds.
    #[test]
    fn a_failed_commit_publishes_nothing() {
        let faults = [
            "enospc@commit.manifest",
            "short@commit.manifest",
            "eio@commit.sync",
            "eio@commit.rename",
        ];
        for fault in faults {
            let (_dir, store) = store();
            let old = build(&store, "kept", "old").unwrap();
            crate::fault::inject(Some(fault));
            let err = build(&store, "new", "new").unwrap_err();
            crate::fault::inject(None);
            assert!(matches!(err, EngineError::Io { .. }), "{fault}: {err}");
            let new = KeyBuilder::new("test").str("new").finish();
            assert!(!store.contains(&new), "{fault}");
            assert!(!store.object_dir(&new).exists(), "{fault}");
            assert!(tmp_is_empty(&store), "{fault} left a pending directory");
            assert_eq!(store.objects().unwrap(), vec![old], "{fault}");
            assert_eq!(store.check(&old, VerifyMode::Full), Health::Intact);
            build(&store, "new", "new").unwrap();
            assert_eq!(store.check(&new, VerifyMode::Full), Health::Intact);
        }
        // Replacing an artifact (a forced re-run) that fails keeps the old one whole.
        for fault in faults {
            let (_dir, store) = store();
            let key = build(&store, "same", "first").unwrap();
            crate::fault::inject(Some(fault));
            assert!(build(&store, "same", "second").is_err(), "{fault}");
            crate::fault::inject(None);
            assert_eq!(store.check(&key, VerifyMode::Full), Health::Intact);
            let text = std::fs::read_to_string(store.object_dir(&key).join("out.txt")).unwrap();
            assert_eq!(text, "first", "{fault}");
        }
    }

    #[test]
    fn corruption_is_found_and_quarantined() {
        let (_dir, store) = store();
        let key = build(&store, "c", "line\n").unwrap();
        let file = store.object_dir(&key).join("out.txt");
        // As a user with a text editor would (root ignores the read-only bit anyway).
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(b"appended\n")
            .unwrap();
        let problems = vec![Problem::DigestMismatch {
            file: "out.txt".into(),
        }];
        assert_eq!(
            store.check(&key, VerifyMode::Cheap),
            Health::Corrupted(problems.clone())
        );
        let place = store.quarantine(&key, &problems).unwrap();
        assert!(!store.contains(&key));
        assert_eq!(store.check(&key, VerifyMode::Cheap), Health::Missing);
        assert!(place.starts_with(store.quarantine_dir()));
        assert!(place.join("artifact/out.txt").is_file());
        let note: Value =
            serde_json::from_slice(&std::fs::read(place.join("note.json")).unwrap()).unwrap();
        assert_eq!(note["problems"][0], "file out.txt: digest mismatch");
        assert_eq!(note["key"], key.to_hex());
        // The quarantined copy can be deleted like any directory.
        std::fs::remove_dir_all(&place).unwrap();
    }

    #[test]
    fn a_broken_manifest_is_a_problem_not_an_error() {
        let (_dir, store) = store();
        let key = build(&store, "m", "x").unwrap();
        let path = store.object_dir(&key).join("manifest.json");
        std::fs::write(&path, "{ not json").unwrap();
        let Health::Corrupted(problems) = store.check(&key, VerifyMode::Cheap) else {
            panic!("a broken manifest passed");
        };
        assert!(problems[0].to_string().starts_with("manifest.json: "));
        let other = KeyBuilder::new("test").str("other").finish();
        let mut m = manifest(&other, Vec::new());
        m.key = other.to_hex();
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let Health::Corrupted(problems) = store.check(&key, VerifyMode::Cheap) else {
            panic!("a manifest of another artifact passed");
        };
        assert!(problems[0].to_string().contains("describes artifact"));
    }

    /// A copied store (new inodes, same bytes) is hashed once, then checked cheaply again.
    #[test]
    fn rehashed_files_are_remembered() {
        let (_dir, store) = store();
        let key = build(&store, "r", "content").unwrap();
        let file = store.object_dir(&key).join("out.txt");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, bytes).unwrap();
        let (health, hashed) = store.check_counting(&key, VerifyMode::Cheap);
        assert_eq!(health, Health::Intact);
        assert_eq!(hashed, 7);
        let (health, hashed) = store.check_counting(&key, VerifyMode::Cheap);
        assert_eq!(health, Health::Intact);
        assert_eq!(hashed, 0);
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

    /// The upgrade of a version-1 store waits for a version-1 rudder (whose store lock is
    /// exclusive) to finish, and removes what such a rudder left in `tmp/` (named by short key,
    /// which no key lock covers).
    #[test]
    fn version_1_stores_are_upgraded_once_no_writer_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::write(store.root().join("store.json"), r#"{"layout": 1}"#).unwrap();
        let old_writer = store.lock_exclusive(|_| panic!("free")).unwrap();
        std::fs::create_dir_all(store.root().join("tmp/0123abcd.XyZ")).unwrap();
        let upgrade = {
            let store = store.clone();
            std::thread::spawn(move || store.init())
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(read_layout(&store.root().join("store.json")), Some(1));
        drop(old_writer);
        upgrade.join().unwrap().unwrap();
        assert_eq!(
            read_layout(&store.root().join("store.json")),
            Some(u64::from(LAYOUT_VERSION))
        );
        assert!(tmp_is_empty(&store));
        // Opened again, it is a version-2 store like any other.
        store.init().unwrap();
        let _writer = store.lock(|_| panic!("free")).unwrap();
    }

    #[test]
    fn newer_layouts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::write(store.root().join("store.json"), r#"{"layout": 99}"#).unwrap();
        let err = store.init().unwrap_err().to_string();
        assert!(err.contains("layout version 99"), "{err}");
        assert!(err.contains("newer than this rudder's 2"), "{err}");
    }

    /// A version-1 store: writable artifacts whose manifests have no stats. Opening it for
    /// writing makes them read-only; checks hash them once.
    #[test]
    fn layout_1_stores_are_upgraded_in_place() {
        let (_dir, store) = store();
        let key = build(&store, "v1", "old artifact").unwrap();
        let dir = store.object_dir(&key);
        crate::integrity::make_writable(&dir).unwrap();
        let mut m = store.manifest(&key).unwrap().unwrap();
        m.layout = 1;
        for f in &mut m.files {
            f.stat = None;
        }
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        std::fs::write(store.root().join("store.json"), r#"{"layout": 1}"#).unwrap();
        store.init().unwrap();
        let marker: Value =
            serde_json::from_slice(&std::fs::read(store.root().join("store.json")).unwrap())
                .unwrap();
        assert_eq!(marker["layout"], LAYOUT_VERSION);
        let mode = std::fs::metadata(dir.join("out.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0);
        assert_eq!(
            store.check_counting(&key, VerifyMode::Cheap),
            (Health::Intact, 16)
        );
        assert_eq!(
            store.check_counting(&key, VerifyMode::Cheap),
            (Health::Intact, 0)
        );
    }
}
