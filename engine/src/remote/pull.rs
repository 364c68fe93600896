//! `pull`: fetch artifacts into the local store, verified. For each artifact the store lacks:
//! its manifest, then every file it names into `.rudder/cache/pull/<b3>.part`, checked for size
//! and BLAKE3 and renamed to `<b3>` once it matches (a pull that was interrupted finds it there
//! and hashes it again instead of fetching it); when all its files are there, they move into a
//! pending directory of the store that is committed like a stage's output (read-only, with
//! this store's stats in its manifest). An artifact the store holds but that fails its check
//! is fetched as if absent, and moved to quarantine, under its key's lock, just before the
//! fetched one takes its place.
//!
//! ```text
//!   artifacts/<key>.json ──► blobs/… ──► cache/pull/<b3>.part ──verify──► cache/pull/<b3>
//!                                                      store.begin(key) ◄──┘ move or copy
//!                                                      store.commit(pending, manifest)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStoreExt};

use super::push::plural;
use super::{Corruption, Remote, RemoteError, Wanted, pull_cache, show_bytes};
use crate::error::EngineError;
use crate::integrity::{Problem, VerifyMode};
use crate::runner::Progress;
use crate::store::{Health, Manifest, Store};

/// What a pull did.
#[derive(Debug, Default)]
pub struct PullReport {
    /// Artifacts now in the store that were not before.
    pub pulled: Vec<String>,
    /// Artifacts the store had already.
    pub present: Vec<String>,
    /// Artifacts the remote does not have.
    pub missing: Vec<String>,
    /// Files fetched, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Files an earlier, interrupted pull had fetched and verified.
    pub resumed: usize,
    /// Artifacts whose files differ from what the lockfile records (built again elsewhere:
    /// the key is the same, the bytes are not).
    pub differ_from_lockfile: Vec<String>,
    /// Corrupted artifacts of the store that pulled ones replaced: moved to quarantine.
    pub quarantined: Vec<Quarantined>,
    /// What failed; the other artifacts were pulled.
    pub errors: Vec<RemoteError>,
}

impl PullReport {
    pub fn summary(&self, remote: &str) -> String {
        let mut text = format!(
            "pulled {} artifact{} from {remote}: {} file{} fetched ({})",
            self.pulled.len(),
            plural(self.pulled.len()),
            self.files,
            plural(self.files),
            show_bytes(self.bytes)
        );
        if self.resumed > 0 {
            text.push_str(&format!(", {} fetched by an earlier pull", self.resumed));
        }
        if !self.present.is_empty() {
            text.push_str(&format!(
                "; {} artifact{} already in the store",
                self.present.len(),
                plural(self.present.len())
            ));
        }
        text
    }
}

/// A corrupted artifact that a pull moved out of the store before committing the remote's.
#[derive(Debug)]
pub struct Quarantined {
    pub name: String,
    /// Its directory in the store's quarantine.
    pub place: PathBuf,
    pub problems: Vec<Problem>,
}

/// One artifact to fetch, with its manifest.
struct Fetch<'w> {
    wanted: &'w Wanted,
    manifest: Manifest,
}

impl Remote {
    /// Fetches the artifacts of `wanted` that `store` lacks, or holds corrupted (checked as
    /// `verify` says). The caller holds the store's (shared) lock. An artifact enters the store
    /// only whole and verified; what fails is in the report's `errors`, and what did not fail
    /// is pulled all the same.
    pub fn pull(
        &self,
        store: &Store,
        wanted: &[Wanted],
        verify: VerifyMode,
        progress: &dyn Progress,
    ) -> Result<PullReport, RemoteError> {
        self.runtime
            .block_on(self.pull_async(store, wanted, verify, progress))
    }

    async fn pull_async(
        &self,
        store: &Store,
        wanted: &[Wanted],
        verify: VerifyMode,
        progress: &dyn Progress,
    ) -> Result<PullReport, RemoteError> {
        let mut report = PullReport::default();
        let mut absent = Vec::new();
        for item in wanted {
            match store.check(&item.key, verify) {
                Health::Intact => report.present.push(item.name.clone()),
                Health::Missing | Health::Corrupted(_) => absent.push(item),
            }
        }
        if absent.is_empty() {
            return Ok(report);
        }
        if !self.check_layout(false).await? {
            report.missing = absent.iter().map(|w| w.name.clone()).collect();
            return Ok(report);
        }
        let manifests: Vec<Result<Option<Fetch>, RemoteError>> =
            futures::stream::iter(absent.iter().copied())
                .map(|item| self.read_manifest(item))
                .buffered(self.settings.concurrency * 2)
                .collect()
                .await;
        let mut fetches = Vec::new();
        for (item, result) in absent.iter().zip(manifests) {
            match result {
                Ok(Some(fetch)) => fetches.push(fetch),
                Ok(None) => report.missing.push(item.name.clone()),
                Err(err) => report.errors.push(err),
            }
        }
        let cache = pull_cache(store);
        tokio::fs::create_dir_all(&cache)
            .await
            .map_err(|e| EngineError::io(format!("creating {}", cache.display()), e))?;
        // Each distinct content once; with how many files of this pull use it.
        let mut uses: BTreeMap<String, usize> = BTreeMap::new();
        let mut blobs: BTreeMap<String, (u64, String, &Wanted, String)> = BTreeMap::new();
        for fetch in &fetches {
            for file in &fetch.manifest.files {
                *uses.entry(file.blake3.clone()).or_default() += 1;
                blobs.entry(file.blake3.clone()).or_insert((
                    file.size,
                    file.blake3.clone(),
                    fetch.wanted,
                    file.name.clone(),
                ));
            }
        }
        let mut to_fetch = Vec::new();
        for (size, blake3, wanted, name) in blobs.values() {
            // Verified when an earlier pull fetched it, and hashed again now: it has waited on
            // this disk since, and only verified bytes may be committed.
            let kept = cache.join(blake3);
            if kept.is_file() && crate::digest::hash_file(&kept).is_ok_and(|d| d == *blake3) {
                report.resumed += 1;
            } else {
                let _ = std::fs::remove_file(&kept);
                to_fetch.push((*size, blake3.as_str(), *wanted, name.as_str()));
            }
        }
        progress.set_length(to_fetch.iter().map(|f| f.0).sum());
        let done = AtomicU64::new(0);
        let results: Vec<(String, Result<(), RemoteError>)> = futures::stream::iter(to_fetch)
            .map(|(size, blake3, wanted, name)| {
                let cache = &cache;
                let done = &done;
                async move {
                    let result = self
                        .fetch_blob(cache, size, blake3, wanted, name, progress, done)
                        .await;
                    (blake3.to_owned(), result)
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let mut failed_blobs = BTreeSet::new();
        for (blake3, result) in results {
            match result {
                Ok(()) => {
                    report.files += 1;
                    report.bytes += blobs[&blake3].0;
                }
                Err(err) => {
                    failed_blobs.insert(blake3);
                    report.errors.push(err);
                }
            }
        }
        for fetch in fetches {
            if fetch
                .manifest
                .files
                .iter()
                .any(|f| failed_blobs.contains(&f.blake3))
            {
                continue;
            }
            let recorded: BTreeMap<&str, &str> = fetch
                .manifest
                .files
                .iter()
                .map(|f| (f.name.as_str(), f.blake3.as_str()))
                .collect();
            let expected: BTreeMap<&str, &str> = fetch
                .wanted
                .outputs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if !expected.is_empty() && recorded != expected {
                report.differ_from_lockfile.push(fetch.wanted.name.clone());
            }
            match self.commit(store, &cache, &fetch, verify, &mut uses, &mut report) {
                Ok(true) => report.pulled.push(fetch.wanted.name.clone()),
                Ok(false) => report.present.push(fetch.wanted.name.clone()),
                Err(err) => report.errors.push(err),
            }
        }
        Ok(report)
    }

    /// The manifest of an artifact on the remote; `None` when the remote does not have it.
    async fn read_manifest<'w>(&self, item: &'w Wanted) -> Result<Option<Fetch<'w>>, RemoteError> {
        let path = self.manifest_path(&item.key);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(|e| self.request_error("reading", &path, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.request_error("reading", &path, e)),
        };
        let corrupt = |problem: String| {
            RemoteError::Corrupt(Box::new(Corruption {
                remote: self.describe(),
                node: item.name.clone(),
                key: item.key.short(),
                file: "manifest.json".into(),
                object: self.object_name(&path),
                problem,
            }))
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("it is not a manifest ({e})")))?;
        if manifest.key != item.key.to_hex() {
            return Err(corrupt(format!("it is the manifest of {}", manifest.key)));
        }
        for file in &manifest.files {
            if !is_safe_name(&file.name) {
                return Err(corrupt(format!(
                    "it names a file outside the artifact ({:?})",
                    file.name
                )));
            }
            if blake3::Hash::from_hex(&file.blake3).is_err() {
                return Err(corrupt(format!(
                    "`{}` has no valid BLAKE3 ({:?})",
                    file.name, file.blake3
                )));
            }
        }
        Ok(Some(Fetch {
            wanted: item,
            manifest,
        }))
    }

    /// Fetches one blob into the pull cache and verifies it; only a verified file gets its
    /// final name there.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        cache: &Path,
        size: u64,
        blake3: &str,
        wanted: &Wanted,
        name: &str,
        progress: &dyn Progress,
        done: &AtomicU64,
    ) -> Result<(), RemoteError> {
        let path = self.blob_path(blake3);
        let part = cache.join(format!("{blake3}.part"));
        let io = |e: std::io::Error| {
            RemoteError::Engine(EngineError::io(format!("writing {}", part.display()), e))
        };
        let corrupt = |problem: String| {
            RemoteError::Corrupt(Box::new(Corruption {
                remote: self.describe(),
                node: wanted.name.clone(),
                key: wanted.key.short(),
                file: name.to_owned(),
                object: self.object_name(&path),
                problem,
            }))
        };
        progress.set_message(format!("{}: {name}", wanted.name));
        let file = tokio::fs::File::create(&part).await.map_err(io)?;
        file.set_len(size).await.map_err(io)?;
        let file = file.into_std().await;
        // In ranges of one part each, several at once: each range is its own request, retried
        // on its own, and none outlives the request timeout however large the file.
        let part_size = self.settings.part_size_for(size);
        let ranges: Vec<(u64, u64)> = (0..size.div_ceil(part_size).max(1))
            .map(|i| (i * part_size, ((i + 1) * part_size).min(size)))
            .collect();
        let whole = ranges.len() == 1;
        let results: Vec<Result<u64, RemoteError>> = futures::stream::iter(ranges)
            .map(|(start, end)| {
                let file = &file;
                let path = &path;
                async move {
                    let options = if whole {
                        GetOptions::default()
                    } else {
                        GetOptions::default().with_range(Some(GetRange::Bounded(start..end)))
                    };
                    let result = self.store.get_opts(path, options).await.map_err(|e| {
                        match e {
                        object_store::Error::NotFound { .. } => corrupt(
                            "it is missing (the manifest names it, but the remote does not have it)"
                                .into(),
                        ),
                        e => self.request_error("fetching", path, e),
                    }
                    })?;
                    let mut stream = result.into_stream();
                    let mut offset = start;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| self.request_error("fetching", path, e))?;
                        if offset + chunk.len() as u64 > end {
                            return Err(corrupt(format!(
                                "it is larger than the {size} bytes its manifest says"
                            )));
                        }
                        std::os::unix::fs::FileExt::write_all_at(file, &chunk, offset)
                            .map_err(io)?;
                        offset += chunk.len() as u64;
                        let n = chunk.len() as u64;
                        progress.set_position(done.fetch_add(n, Ordering::Relaxed) + n);
                    }
                    Ok(offset - start)
                }
            })
            .buffer_unordered(self.settings.concurrency.div_ceil(2).max(2))
            .collect()
            .await;
        let mut received = 0;
        for result in results {
            match result {
                Ok(n) => received += n,
                Err(err) => {
                    let _ = std::fs::remove_file(&part);
                    return Err(err);
                }
            }
        }
        let verdict = (|| {
            file.sync_all().map_err(io)?;
            drop(file);
            if received != size {
                return Err(corrupt(format!(
                    "it has {received} bytes, its manifest says {size}"
                )));
            }
            let actual = crate::digest::hash_file(&part).map_err(io)?;
            if actual != blake3 {
                return Err(corrupt(format!(
                    "its BLAKE3 is {actual}, its manifest says {blake3}"
                )));
            }
            std::fs::rename(&part, cache.join(blake3)).map_err(io)
        })();
        if verdict.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        verdict
    }

    /// Moves an artifact's verified files from the pull cache into a pending directory and
    /// commits it, after moving a corrupted artifact of the same key to quarantine. `Ok(false)`
    /// when the store has it intact by then (another process built it).
    fn commit(
        &self,
        store: &Store,
        cache: &Path,
        fetch: &Fetch<'_>,
        verify: VerifyMode,
        uses: &mut BTreeMap<String, usize>,
        report: &mut PullReport,
    ) -> Result<bool, RemoteError> {
        let key = fetch.wanted.key;
        let _key_lock = store.lock_key(&key, |_| {})?;
        match store.check(&key, verify) {
            Health::Intact => {
                for file in &fetch.manifest.files {
                    self.release(cache, &file.blake3, uses);
                }
                return Ok(false);
            }
            Health::Missing => {}
            Health::Corrupted(problems) => {
                let place = store.quarantine(&key, &problems)?;
                report.quarantined.push(Quarantined {
                    name: fetch.wanted.name.clone(),
                    place,
                    problems,
                });
            }
        }
        let pending = store.begin(&key)?;
        let placed = (|| -> Result<(), EngineError> {
            for file in &fetch.manifest.files {
                let from = cache.join(&file.blake3);
                let to = pending.dir.join(&file.name);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        EngineError::io(format!("creating {}", parent.display()), e)
                    })?;
                }
                let left = uses.get_mut(&file.blake3).expect("counted");
                *left -= 1;
                // The last file of this pull with this content takes it; the others copy it.
                if *left == 0 {
                    std::fs::rename(&from, &to)
                } else {
                    std::fs::copy(&from, &to).map(|_| ())
                }
                .map_err(|e| EngineError::io(format!("placing {}", to.display()), e))?;
            }
            Ok(())
        })();
        if let Err(err) = placed {
            store.abandon(pending);
            return Err(err.into());
        }
        store.commit(pending, &fetch.manifest)?;
        Ok(true)
    }

    /// One use of a cached blob that is not needed after all; the last one removes it.
    fn release(&self, cache: &Path, blake3: &str, uses: &mut BTreeMap<String, usize>) {
        if let Some(left) = uses.get_mut(blake3) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                let _ = std::fs::remove_file(cache.join(blake3));
            }
        }
    }
}

/// A file name a manifest may give: relative, inside the artifact, not the manifest itself.
fn is_safe_name(name: &str) -> bool {
    name != "manifest.json"
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_cannot_name_files_outside_the_artifact() {
        assert!(is_safe_name("model.safetensors"));
        assert!(is_safe_name("checkpoint/step-1.bin"));
        assert!(!is_safe_name("../../etc/passwd"));
        assert!(!is_safe_name("/etc/passwd"));
        assert!(!is_safe_name("a/./b"));
        assert!(!is_safe_name("manifest.json"));
        assert!(!is_safe_name(""));
    }
}
