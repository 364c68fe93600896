//! Remote stores: a second, shared store of artifacts behind an object store (S3, GCS, Azure,
//! or a directory on a shared filesystem, through the `object_store` crate), that `push`
//! uploads to, `pull` and `run`'s remote cache fetch from, and `gc --remote` cleans.
//!
//! Layout under the remote's URL (version [`REMOTE_LAYOUT`]):
//!
//! ```text
//! rudder-remote.json             {"layout": 1}: created by the first push, read by every command
//! blobs/<b3[..2]>/<b3>           one object per file content, named by its BLAKE3 (so a file
//!                                that several artifacts hold is stored once)
//! artifacts/<key>.json           an artifact's manifest.json (its files with sizes and BLAKE3;
//!                                not their stats, which are the pushing store's), written
//!                                after every blob it names
//! ```
//!
//! Everything is immutable and content-addressed. An artifact is on the remote when its
//! manifest is: a push writes the blobs first and the manifest last, so an interrupted push
//! leaves no artifact, only blobs that the next push reuses. Objects are created, never
//! replaced (`PutMode::Create`, S3's conditional writes): when two pushes race, the first
//! manifest of a key stays and the second push takes it as done. A file larger than one part
//! is uploaded in parts, several at once; `object_store` cannot make the completion of a
//! multipart upload conditional, so two racing uploads of one large blob may both complete, and
//! since the name is the content's digest, the second writes the bytes the first did.
//!
//! Reading verifies: `pull` checks every file's size and BLAKE3 against the manifest before
//! it enters the local store, through the store's own commit (read-only files, their stats
//! recorded, a pending directory renamed into place), so a corrupt remote object never becomes
//! a local artifact and a pulled one passes the store's checks as a built one does. Writing
//! verifies too: `push` refuses an artifact that fails the store's check and hashes every file
//! it uploads, so a file corrupted in the local store is never published. A local artifact
//! that fails its check is pulled again, the corrupted one quarantined. Files fetched and verified wait in
//! `.rudder/cache/pull/<b3>` until their artifact is complete, so an interrupted pull does
//! not fetch them again.
//!
//! Failures: every request is retried with exponential backoff ([`Settings`]), then the
//! command fails naming the object. Credentials and endpoints come from the environment only
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`, read by `object_store`); which remote a command uses is
//! [`config`]'s.

pub mod cache;
pub mod config;
mod gc;
mod pull;
mod push;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig};
use serde_json::json;

use crate::error::EngineError;
use crate::key::Key;
use crate::lockfile::Lockfile;
use crate::project::Project;

pub use config::{RemoteTarget, Remotes};
pub use gc::GcReport;
pub use pull::{PullReport, Quarantined};
pub use push::PushReport;

/// Version of the remote layout.
pub const REMOTE_LAYOUT: u32 = 1;

/// The object that marks a remote and says its layout.
const MARKER: &str = "rudder-remote.json";

/// Errors of a remote store.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A request failed after its retries.
    #[error("remote {remote}: {action} {object}: {source}")]
    Request {
        remote: String,
        action: &'static str,
        object: String,
        #[source]
        source: Box<object_store::Error>,
    },
    /// An object on the remote is not what its manifest says.
    #[error("{0}")]
    Corrupt(Box<Corruption>),
    #[error("remote {remote}: {message}")]
    Remote { remote: String, message: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A corrupt object on a remote: which artifact and file it is, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error(
    "remote {remote}: `{file}` of {node} ({key}) is corrupt on the remote ({object}): {problem}; it was not added to the store"
)]
pub struct Corruption {
    pub remote: String,
    pub node: String,
    pub key: String,
    pub file: String,
    pub object: String,
    pub problem: String,
}

/// Transfer settings, from the environment (`RUDDER_REMOTE_RETRIES`, `RUDDER_REMOTE_TIMEOUT`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Retries of a failed request, with exponential backoff from 100 ms up to 15 s.
    pub retries: usize,
    /// Time limit of one request (one part of a large file).
    pub timeout: Duration,
    /// Requests at once.
    pub concurrency: usize,
    /// Files up to this size go in one request; larger ones in parts of this size (or more,
    /// to stay within S3's 10,000 parts).
    pub part_size: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retries: 5,
            timeout: Duration::from_secs(300),
            concurrency: 8,
            part_size: 16 << 20,
        }
    }
}

impl Settings {
    pub fn from_env() -> Result<Settings, EngineError> {
        let mut settings = Settings::default();
        if let Ok(value) = std::env::var("RUDDER_REMOTE_RETRIES") {
            settings.retries = value.trim().parse().map_err(|_| {
                EngineError::Usage(format!(
                    "RUDDER_REMOTE_RETRIES={value}: expected a whole number"
                ))
            })?;
        }
        if let Ok(value) = std::env::var("RUDDER_REMOTE_TIMEOUT") {
            settings.timeout = humantime::parse_duration(value.trim()).map_err(|e| {
                EngineError::Usage(format!(
                    "RUDDER_REMOTE_TIMEOUT={value}: {e} (for example 30s or 5m)"
                ))
            })?;
        }
        Ok(settings)
    }

    fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: self.retries,
            retry_timeout: Duration::from_secs(180).max(self.timeout),
        }
    }

    /// The part size for a file of `size` bytes.
    fn part_size_for(&self, size: u64) -> u64 {
        self.part_size.max(size.div_ceil(9_000))
    }
}

/// One artifact a lockfile names: what `push` and `pull` act on.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub name: String,
    pub key: Key,
    /// The lockfile's digests of its files, by name.
    pub outputs: std::collections::BTreeMap<String, String>,
}

/// The artifacts `lock` names (stages and their parts; not datasets and models, which are
/// files beside the recipe): all of them, or those of `nodes` and the nodes they depend on.
pub fn wanted(
    project: &Project,
    lock: &Lockfile,
    nodes: &[String],
) -> Result<Vec<Wanted>, EngineError> {
    let artifacts = lock
        .nodes
        .iter()
        .filter(|e| e.implementation.is_some() && e.kind != "dataset" && e.kind != "model");
    let mut chosen: Option<BTreeSet<String>> = None;
    if !nodes.is_empty() {
        let mut names = BTreeSet::new();
        for node in nodes {
            match project.graph.index(node) {
                Some(index) => {
                    for vertex in project.graph.ancestors(index) {
                        names.insert(project.graph.vertex(vertex).name.clone());
                    }
                    for part in project.graph.with_parts(index) {
                        for vertex in project.graph.ancestors(part) {
                            names.insert(project.graph.vertex(vertex).name.clone());
                        }
                    }
                }
                None if lock.entry(node).is_some() => {
                    names.insert(node.clone());
                }
                None => {
                    let known = lock.nodes.iter().map(|e| e.name.as_str());
                    let hint = rudder_schema::diagnostic::did_you_mean(node, known)
                        .map(|h| format!(" ({h})"))
                        .unwrap_or_default();
                    return Err(EngineError::Usage(format!(
                        "no node named `{node}` in the recipe or its lockfile{hint}"
                    )));
                }
            }
        }
        chosen = Some(names);
    }
    let mut seen = BTreeSet::new();
    let mut wanted = Vec::new();
    for entry in artifacts {
        if chosen
            .as_ref()
            .is_some_and(|names| !names.contains(&entry.name))
        {
            continue;
        }
        let key = Key::from_hex(&entry.key).ok_or_else(|| EngineError::Lockfile {
            path: project.recipe.lockfile_path(),
            message: format!("`{}` has a malformed key {}", entry.name, entry.key),
        })?;
        // The same stage under two names is one artifact.
        if seen.insert(key) {
            wanted.push(Wanted {
                name: entry.name.clone(),
                key,
                outputs: entry.outputs.clone(),
            });
        }
    }
    Ok(wanted)
}

/// An open remote store.
pub struct Remote {
    target: RemoteTarget,
    store: Arc<dyn ObjectStore>,
    /// Where the layout starts in the object store.
    prefix: ObjectPath,
    settings: Settings,
    /// `object_store` is asynchronous; the engine is not: every call blocks on this.
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// Opens a remote; nothing is sent yet. A directory that does not exist is created when
    /// `create` (a push), and an error otherwise.
    pub fn open(target: &RemoteTarget, create: bool) -> Result<Remote, RemoteError> {
        let settings = Settings::from_env()?;
        let fail = |message: String| RemoteError::Remote {
            remote: target.to_string(),
            message,
        };
        // rustls is built without a default crypto provider (to keep one crypto stack): this
        // process's is ring. An error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match target.location() {
            config::Location::Directory(dir) => {
                if !dir.is_dir() {
                    if create {
                        std::fs::create_dir_all(&dir).map_err(|e| {
                            fail(format!("creating the directory {}: {e}", dir.display()))
                        })?;
                    } else {
                        return Err(fail(format!(
                            "the directory {} does not exist (a push creates it)",
                            dir.display()
                        )));
                    }
                }
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| fail(format!("opening {}: {e}", dir.display())))?
                    .with_fsync(true);
                (Arc::new(local), ObjectPath::default())
            }
            config::Location::Url(url) => {
                let parsed = url::Url::parse(&url).map_err(|e| fail(format!("{url}: {e}")))?;
                let prefix = ObjectPath::from_url_path(parsed.path())
                    .map_err(|e| fail(format!("{url}: {e}")))?;
                let timeout = humantime::format_duration(settings.timeout).to_string();
                let store: Arc<dyn ObjectStore> = match parsed.scheme() {
                    "s3" | "s3a" => {
                        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                        Arc::new(
                            AmazonS3Builder::from_env()
                                .with_url(url.clone())
                                .with_retry(settings.retry())
                                .with_config(
                                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                                    timeout,
                                )
                                .build()
                                .map_err(|e| fail(e.to_string()))?,
                        )
                    }
                    "gs" => {
                        use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                        Arc::new(
                            GoogleCloudStorageBuilder::from_env()
                                .with_url(url.clone())
                                .with_retry(settings.retry())
                                .with_config(
                                    GoogleConfigKey::Client(ClientConfigKey::Timeout),
                                    timeout,
                                )
                                .build()
                                .map_err(|e| fail(e.to_string()))?,
                        )
                    }
                    "az" | "azure" | "abfs" | "abfss" => {
                        use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                        Arc::new(
                            MicrosoftAzureBuilder::from_env()
                                .with_url(url.clone())
                                .with_retry(settings.retry())
                                .with_config(
                                    AzureConfigKey::Client(ClientConfigKey::Timeout),
                                    timeout,
                                )
                                .build()
                                .map_err(|e| fail(e.to_string()))?,
                        )
                    }
                    other => return Err(fail(format!("unsupported scheme `{other}://`"))),
                };
                (store, prefix)
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rudder-remote")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting its I/O threads: {e}")))?;
        Ok(Remote {
            target: target.clone(),
            store,
            prefix,
            settings,
            runtime,
        })
    }

    /// The same remote with other transfer settings.
    pub fn with_settings(mut self, settings: Settings) -> Remote {
        self.settings = settings;
        self
    }

    pub fn target(&self) -> &RemoteTarget {
        &self.target
    }

    /// How messages name it: `team (s3://bucket/prefix)`.
    pub fn describe(&self) -> String {
        self.target.to_string()
    }

    fn path(&self, relative: &str) -> ObjectPath {
        relative
            .split('/')
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn blob_path(&self, blake3: &str) -> ObjectPath {
        self.path(&format!(
            "blobs/{}/{blake3}",
            &blake3[..2.min(blake3.len())]
        ))
    }

    fn manifest_path(&self, key: &Key) -> ObjectPath {
        self.path(&format!("artifacts/{}.json", key.to_hex()))
    }

    /// An object's full name, for messages.
    fn object_name(&self, path: &ObjectPath) -> String {
        let relative = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        format!("{}/{relative}", self.target.url().trim_end_matches('/'))
    }

    fn request_error(
        &self,
        action: &'static str,
        path: &ObjectPath,
        source: object_store::Error,
    ) -> RemoteError {
        RemoteError::Request {
            remote: self.describe(),
            action,
            object: self.object_name(path),
            source: Box::new(source),
        }
    }

    fn error(&self, message: impl Into<String>) -> RemoteError {
        RemoteError::Remote {
            remote: self.describe(),
            message: message.into(),
        }
    }

    /// Reads the layout marker: `Ok(false)` when the remote has none (nothing was pushed).
    /// With `create`, writes it when missing.
    async fn check_layout(&self, create: bool) -> Result<bool, RemoteError> {
        let path = self.path(MARKER);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(|e| self.request_error("reading", &path, e))?,
            Err(object_store::Error::NotFound { .. }) if create => {
                let body = json!({ "layout": REMOTE_LAYOUT }).to_string();
                let options = object_store::PutOptions::from(object_store::PutMode::Create);
                match self
                    .store
                    .put_opts(&path, body.into_bytes().into(), options)
                    .await
                {
                    Ok(_) => return Ok(true),
                    // Another push created it meanwhile: read theirs.
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        return Box::pin(self.check_layout(false)).await;
                    }
                    Err(object_store::Error::NotImplemented { .. }) => {
                        let options =
                            object_store::PutOptions::from(object_store::PutMode::Overwrite);
                        let body = json!({ "layout": REMOTE_LAYOUT }).to_string();
                        self.store
                            .put_opts(&path, body.into_bytes().into(), options)
                            .await
                            .map_err(|e| self.request_error("creating", &path, e))?;
                        return Ok(true);
                    }
                    Err(e) => return Err(self.request_error("creating", &path, e)),
                }
            }
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.request_error("reading", &path, e)),
        };
        let layout = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("layout").and_then(serde_json::Value::as_u64));
        match layout {
            Some(v) if v >= 1 && v <= u64::from(REMOTE_LAYOUT) => Ok(true),
            Some(v) => Err(self.error(format!(
                "layout version {v}, but this rudder reads version {REMOTE_LAYOUT}"
            ))),
            None => Err(self.error(format!("{MARKER} is unreadable"))),
        }
    }

    /// Which of `keys` the remote has an artifact of.
    pub fn has(&self, keys: &[Key]) -> Result<BTreeSet<Key>, RemoteError> {
        self.runtime.block_on(async {
            if !self.check_layout(false).await? {
                return Ok(BTreeSet::new());
            }
            self.has_async(keys).await
        })
    }

    async fn has_async(&self, keys: &[Key]) -> Result<BTreeSet<Key>, RemoteError> {
        let results: Vec<Result<Option<Key>, RemoteError>> =
            futures::stream::iter(keys.iter().copied())
                .map(|key| async move {
                    let path = self.manifest_path(&key);
                    match self.store.head(&path).await {
                        Ok(_) => Ok(Some(key)),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(self.request_error("looking up", &path, e)),
                    }
                })
                .buffer_unordered(self.settings.concurrency * 2)
                .collect()
                .await;
        let mut held = BTreeSet::new();
        for result in results {
            if let Some(key) = result? {
                held.insert(key);
            }
        }
        Ok(held)
    }
}

/// Where a pull keeps files it fetched and verified until their artifact is complete.
fn pull_cache(store: &crate::store::Store) -> PathBuf {
    store.root().join("cache").join("pull")
}

/// Removes what interrupted pulls left (`rudder gc` calls it while it holds the store alone).
pub fn clear_pull_cache(store: &crate::store::Store) {
    let _ = std::fs::remove_dir_all(pull_cache(store));
}

/// Sizes for messages: `12.3 MB`.
pub fn show_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}
