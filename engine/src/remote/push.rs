//! `push`: upload artifacts of the local store that the remote lacks. Each of those is checked
//! against its manifest first (cheaply: what changed since its commit is hashed), and a
//! corrupted one stops the push before anything is uploaded. Then per artifact, every blob it
//! names (each hashed as it is read and compared with its manifest's BLAKE3, so a file whose
//! bytes changed in the store, even without a trace in its stat, is never published), then the
//! manifest, created only if absent. The manifest uploaded is the local one without the files'
//! stats, which describe this machine's disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use super::{Remote, RemoteError, Wanted, show_bytes};
use crate::integrity::VerifyMode;
use crate::key::Key;
use crate::runner::Progress;
use crate::store::{Health, Store};

/// What a push did.
#[derive(Debug, Default)]
pub struct PushReport {
    /// Artifacts this push published.
    pub pushed: Vec<String>,
    /// Artifacts the remote had already.
    pub present: Vec<String>,
    /// Artifacts another push published while this one ran (theirs stays).
    pub raced: Vec<String>,
    /// Files uploaded, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Files the remote had already (from other artifacts, or an interrupted push).
    pub reused: usize,
}

impl PushReport {
    pub fn summary(&self, remote: &str) -> String {
        if self.pushed.is_empty() && self.raced.is_empty() {
            let n = self.present.len();
            return format!(
                "nothing to push: {} {n} artifact{} {} on {remote} already",
                if n == 1 { "the" } else { "all" },
                plural(n),
                if n == 1 { "is" } else { "are" }
            );
        }
        let mut text = format!(
            "pushed {} artifact{} to {remote}: {} file{} uploaded ({})",
            self.pushed.len(),
            plural(self.pushed.len()),
            self.files,
            plural(self.files),
            show_bytes(self.bytes)
        );
        if self.reused > 0 {
            text.push_str(&format!(", {} already there", self.reused));
        }
        if !self.present.is_empty() {
            text.push_str(&format!(
                "; {} artifact{} already on the remote",
                self.present.len(),
                plural(self.present.len())
            ));
        }
        if !self.raced.is_empty() {
            text.push_str(&format!(
                "; {} pushed meanwhile by another push ({})",
                self.raced.len(),
                self.raced.join(", ")
            ));
        }
        text
    }
}

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One file to upload: where it is locally and what it must hash to.
#[derive(Debug, Clone)]
struct Blob {
    blake3: String,
    size: u64,
    local: PathBuf,
    /// `sft: model.safetensors`, for messages.
    label: String,
}

impl Remote {
    /// Uploads the artifacts of `wanted` that the remote lacks, from `store`. Every artifact
    /// must be in the store.
    pub fn push(
        &self,
        store: &Store,
        wanted: &[Wanted],
        progress: &dyn Progress,
    ) -> Result<PushReport, RemoteError> {
        let mut missing_locally = Vec::new();
        let mut manifests = Vec::new();
        for item in wanted {
            match store.manifest(&item.key)? {
                Some(manifest) => manifests.push((item, manifest)),
                None => missing_locally.push(format!("{} ({})", item.name, item.key.short())),
            }
        }
        if !missing_locally.is_empty() {
            return Err(self.error(format!(
                "not in the local store, so not pushed: {} (run the recipe first; nothing was uploaded)",
                missing_locally.join(", ")
            )));
        }
        self.runtime
            .block_on(self.push_async(store, &manifests, progress))
    }

    async fn push_async(
        &self,
        store: &Store,
        manifests: &[(&Wanted, crate::store::Manifest)],
        progress: &dyn Progress,
    ) -> Result<PushReport, RemoteError> {
        let mut report = PushReport::default();
        self.check_layout(true).await?;
        let keys: Vec<Key> = manifests.iter().map(|(w, _)| w.key).collect();
        let held = self.has_async(&keys).await?;
        let mut to_push = Vec::new();
        for (item, manifest) in manifests {
            if held.contains(&item.key) {
                report.present.push(item.name.clone());
            } else {
                to_push.push((*item, manifest));
            }
        }
        if to_push.is_empty() {
            return Ok(report);
        }
        let mut corrupted = Vec::new();
        for (item, _) in &to_push {
            if let Health::Corrupted(problems) = store.check(&item.key, VerifyMode::Cheap) {
                let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
                corrupted.push(format!(
                    "{} ({}): {}",
                    item.name,
                    item.key.short(),
                    shown.join(", ")
                ));
            }
        }
        if !corrupted.is_empty() {
            let it = if corrupted.len() == 1 { "it" } else { "them" };
            return Err(self.error(format!(
                "corrupted in the local store, so not pushed: {} (nothing was uploaded; `rudder run` moves {it} to quarantine and builds {it} again)",
                corrupted.join("; "),
            )));
        }
        // Each distinct content once, even when several files or artifacts hold it.
        let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
        for (item, manifest) in &to_push {
            for file in &manifest.files {
                blobs.entry(file.blake3.clone()).or_insert_with(|| Blob {
                    blake3: file.blake3.clone(),
                    size: file.size,
                    local: store.object_dir(&item.key).join(&file.name),
                    label: format!("{}: {}", item.name, file.name),
                });
            }
        }
        let present = self.present_blobs(blobs.values()).await?;
        report.reused = present.len();
        let uploads: Vec<&Blob> = blobs
            .values()
            .filter(|b| !present.contains(&b.blake3))
            .collect();
        progress.set_length(uploads.iter().map(|b| b.size).sum());
        let done = AtomicU64::new(0);
        let results: Vec<Result<(), RemoteError>> = futures::stream::iter(uploads.iter())
            .map(|blob| self.upload(blob, progress, &done))
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        for result in results {
            result?;
        }
        report.files = uploads.len();
        report.bytes = uploads.iter().map(|b| b.size).sum();
        // A blob found on the remote may belong to an artifact that `gc` is removing right
        // now: make sure each is still there before a manifest names it.
        let reused: Vec<&Blob> = blobs
            .values()
            .filter(|b| present.contains(&b.blake3))
            .collect();
        let still = self.present_blobs(reused.iter().copied()).await?;
        for blob in reused.iter().filter(|b| !still.contains(&b.blake3)) {
            self.upload(blob, progress, &done).await?;
            report.files += 1;
            report.bytes += blob.size;
        }
        // Manifests last: an artifact appears only once all its files are there.
        for (item, manifest) in &to_push {
            let mut shared = (*manifest).clone();
            for file in &mut shared.files {
                file.stat = None;
            }
            let bytes = serde_json::to_vec_pretty(&shared).expect("manifest serialises");
            let path = self.manifest_path(&item.key);
            match self.create(&path, bytes.into()).await {
                Ok(true) => report.pushed.push(item.name.clone()),
                Ok(false) => report.raced.push(item.name.clone()),
                Err(e) => return Err(self.request_error("writing", &path, e)),
            }
        }
        Ok(report)
    }

    /// The blobs among `blobs` that the remote has, with the expected size.
    async fn present_blobs<'b>(
        &self,
        blobs: impl Iterator<Item = &'b Blob>,
    ) -> Result<BTreeSet<String>, RemoteError> {
        let results: Vec<Result<Option<String>, RemoteError>> = futures::stream::iter(blobs)
            .map(|blob| async move {
                let path = self.blob_path(&blob.blake3);
                match self.store.head(&path).await {
                    Ok(meta) if meta.size == blob.size => Ok(Some(blob.blake3.clone())),
                    // A blob of the wrong size is not this content: upload it (again).
                    Ok(_) => Ok(None),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.request_error("looking up", &path, e)),
                }
            })
            .buffer_unordered(self.settings.concurrency * 2)
            .collect()
            .await;
        let mut present = BTreeSet::new();
        for result in results {
            if let Some(blake3) = result? {
                present.insert(blake3);
            }
        }
        Ok(present)
    }

    /// Creates `path` with `payload` unless it exists: `Ok(false)` when it did. A store without
    /// conditional writes (`AWS_CONDITIONAL_PUT=disabled`) is asked first and written then.
    async fn create(
        &self,
        path: &ObjectPath,
        payload: PutPayload,
    ) -> Result<bool, object_store::Error> {
        match self
            .store
            .put_opts(path, payload.clone(), PutOptions::from(PutMode::Create))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                match self.store.head(path).await {
                    Ok(_) => return Ok(false),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.store.put(path, payload).await.map(|_| true)
            }
            Err(e) => Err(e),
        }
    }

    /// Uploads one blob: in one request, or in parts when large. The content is hashed as it
    /// is read, and nothing is published unless it hashes to the name.
    async fn upload(
        &self,
        blob: &Blob,
        progress: &dyn Progress,
        done: &AtomicU64,
    ) -> Result<(), RemoteError> {
        let path = self.blob_path(&blob.blake3);
        let io = |e: std::io::Error| {
            RemoteError::Engine(crate::EngineError::io(
                format!("reading {}", blob.local.display()),
                e,
            ))
        };
        let changed = |actual: &str| {
            self.error(format!(
                "{} in the local store ({}) no longer matches its manifest (BLAKE3 {actual}, the manifest says {}): it was not pushed; `rudder run --verify full` moves its artifact to quarantine and builds it again",
                blob.label,
                blob.local.display(),
                blob.blake3
            ))
        };
        progress.set_message(blob.label.clone());
        let part_size = self.settings.part_size_for(blob.size);
        if blob.size <= part_size {
            let bytes = tokio::fs::read(&blob.local).await.map_err(io)?;
            let actual = blake3::hash(&bytes).to_hex().to_string();
            if actual != blob.blake3 || bytes.len() as u64 != blob.size {
                return Err(changed(&actual));
            }
            let created = self
                .create(&path, bytes.into())
                .await
                .map_err(|e| self.request_error("uploading", &path, e))?;
            if !created {
                // Another push created it meanwhile; the name is the content's digest, so it
                // is this content if it has this size.
                let meta = self
                    .store
                    .head(&path)
                    .await
                    .map_err(|e| self.request_error("looking up", &path, e))?;
                if meta.size != blob.size {
                    return Err(self.error(format!(
                        "{} exists with {} bytes instead of {}: it is corrupt; remove it and push again",
                        self.object_name(&path),
                        meta.size,
                        blob.size
                    )));
                }
            }
            progress.set_position(done.fetch_add(blob.size, Ordering::Relaxed) + blob.size);
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.request_error("starting the upload of", &path, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size as usize);
        let result: Result<(), RemoteError> = async {
            let mut file = tokio::fs::File::open(&blob.local).await.map_err(io)?;
            let mut hasher = blake3::Hasher::new();
            let mut buffer = vec![0u8; 1 << 20];
            let mut read = 0u64;
            loop {
                let n = file.read(&mut buffer).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                writer
                    .wait_for_capacity(self.settings.concurrency.div_ceil(2).max(2))
                    .await
                    .map_err(|e| self.request_error("uploading", &path, e))?;
                writer.write(&buffer[..n]);
                read += n as u64;
                progress.set_position(done.fetch_add(n as u64, Ordering::Relaxed) + n as u64);
            }
            let actual = hasher.finalize().to_hex().to_string();
            if actual != blob.blake3 || read != blob.size {
                return Err(changed(&actual));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| self.request_error("completing the upload of", &path, e))?;
                Ok(())
            }
            Err(err) => {
                // Best effort: parts of an aborted upload are otherwise kept by S3 until a
                // lifecycle rule removes them.
                let _ = writer.abort().await;
                Err(err)
            }
        }
    }
}
