//! `gc --remote`: remove the artifacts on a remote that no given lockfile references, then the
//! blobs no remaining manifest names. Nothing younger than the grace period goes, since a push
//! running now may be about to name it (its blobs are written before its manifest):
//!
//! ```text
//!   list artifacts/ ─► read every manifest ─► doomed: unreferenced and older than the grace
//!   list blobs/     ─► doomed: named by no manifest that stays, and older than the grace
//!   delete doomed manifests ─► list artifacts/ again: spare the blobs of any new manifest
//!   ─► delete doomed blobs
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt};

use super::{Remote, RemoteError};
use crate::key::Key;
use crate::store::Manifest;

/// What a remote gc removed (or, without `apply`, would remove).
#[derive(Debug, Default)]
pub struct GcReport {
    pub applied: bool,
    /// `(key, kind and name)` of every artifact removed.
    pub artifacts: Vec<(Key, String)>,
    /// Blobs removed and their bytes.
    pub blobs: usize,
    pub bytes: u64,
    /// Artifacts a lockfile references.
    pub referenced: usize,
    /// Unreferenced artifacts and blobs kept because they are younger than the grace period.
    pub young_artifacts: usize,
    pub young_blobs: usize,
    pub warnings: Vec<String>,
}

impl Remote {
    /// Removes (with `apply`; else only reports) what `keep` does not reference and is older
    /// than `grace`.
    pub fn gc(
        &self,
        keep: &BTreeSet<Key>,
        grace: Duration,
        apply: bool,
    ) -> Result<GcReport, RemoteError> {
        self.runtime.block_on(self.gc_async(keep, grace, apply))
    }

    async fn gc_async(
        &self,
        keep: &BTreeSet<Key>,
        grace: Duration,
        apply: bool,
    ) -> Result<GcReport, RemoteError> {
        let mut report = GcReport {
            applied: apply,
            ..GcReport::default()
        };
        if !self.check_layout(false).await? {
            return Ok(report);
        }
        let now = SystemTime::now();
        let old = |meta: &ObjectMeta| age(now, meta) >= grace;
        let artifacts = self.list_artifacts().await?;
        let manifests = self.read_manifests(artifacts.keys().copied()).await;
        let mut doomed: Vec<Key> = Vec::new();
        for (key, meta) in &artifacts {
            if keep.contains(key) {
                report.referenced += 1;
            } else if old(meta) {
                doomed.push(*key);
            } else {
                report.young_artifacts += 1;
            }
        }
        let mut named: BTreeSet<String> = BTreeSet::new();
        let mut blind = false;
        for key in artifacts.keys().filter(|k| !doomed.contains(k)) {
            match &manifests[key] {
                Some(manifest) => named.extend(manifest.files.iter().map(|f| f.blake3.clone())),
                None => blind = true,
            }
        }
        if blind {
            report.warnings.push(
                "a manifest that stays is unreadable, so no blob is removed (the blobs it names are unknown)"
                    .into(),
            );
        }
        let mut doomed_blobs: BTreeMap<String, ObjectMeta> = BTreeMap::new();
        if !blind {
            let listed: Vec<ObjectMeta> = self
                .list(&self.path("blobs"))
                .await
                .map_err(|e| self.request_error("listing", &self.path("blobs"), e))?;
            for meta in listed {
                let Some(name) = meta.location.filename().map(str::to_owned) else {
                    continue;
                };
                if named.contains(&name) {
                    continue;
                }
                if old(&meta) {
                    doomed_blobs.insert(name, meta);
                } else {
                    report.young_blobs += 1;
                }
            }
        }
        for key in &doomed {
            let what = manifests[key].as_ref().map_or_else(
                || "unreadable manifest".to_owned(),
                |m| format!("{} {}", m.kind, m.name),
            );
            report.artifacts.push((*key, what));
        }
        if apply {
            for key in &doomed {
                let path = self.manifest_path(key);
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.request_error("removing", &path, e)),
                }
            }
            // A push may have published a manifest since the listing: its blobs stay.
            let now_listed = self.list_artifacts().await?;
            let new: Vec<Key> = now_listed
                .keys()
                .filter(|k| !artifacts.contains_key(k))
                .copied()
                .collect();
            for (key, manifest) in self.read_manifests(new.into_iter()).await {
                match manifest {
                    Some(manifest) => {
                        for file in &manifest.files {
                            doomed_blobs.remove(&file.blake3);
                        }
                    }
                    None => {
                        report.warnings.push(format!(
                            "artifact {} appeared during gc with an unreadable manifest: no blob was removed",
                            key.short()
                        ));
                        doomed_blobs.clear();
                    }
                }
            }
        }
        report.blobs = doomed_blobs.len();
        report.bytes = doomed_blobs.values().map(|m| m.size).sum();
        if apply {
            let results: Vec<Result<(), RemoteError>> =
                futures::stream::iter(doomed_blobs.values())
                    .map(|meta| async move {
                        match self.store.delete(&meta.location).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(self.request_error("removing", &meta.location, e)),
                        }
                    })
                    .buffer_unordered(self.settings.concurrency * 2)
                    .collect()
                    .await;
            for result in results {
                result?;
            }
        }
        Ok(report)
    }

    async fn list(
        &self,
        prefix: &object_store::path::Path,
    ) -> Result<Vec<ObjectMeta>, object_store::Error> {
        match self.store.list(Some(prefix)).try_collect().await {
            Ok(listed) => Ok(listed),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// The artifacts on the remote, by key.
    async fn list_artifacts(&self) -> Result<BTreeMap<Key, ObjectMeta>, RemoteError> {
        let prefix = self.path("artifacts");
        let listed = self
            .list(&prefix)
            .await
            .map_err(|e| self.request_error("listing", &prefix, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let key = meta
                    .location
                    .filename()
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(Key::from_hex)?;
                Some((key, meta))
            })
            .collect())
    }

    /// Every manifest of `keys`; `None` for one that cannot be read or parsed.
    async fn read_manifests(
        &self,
        keys: impl Iterator<Item = Key>,
    ) -> BTreeMap<Key, Option<Manifest>> {
        futures::stream::iter(keys)
            .map(|key| async move {
                let path = self.manifest_path(&key);
                let manifest = match self.store.get(&path).await {
                    Ok(result) => result
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()),
                    Err(_) => None,
                };
                (key, manifest)
            })
            .buffer_unordered(self.settings.concurrency * 2)
            .collect()
            .await
    }
}

fn age(now: SystemTime, meta: &ObjectMeta) -> Duration {
    let modified = SystemTime::UNIX_EPOCH
        + Duration::from_millis(meta.last_modified.timestamp_millis().max(0) as u64);
    now.duration_since(modified).unwrap_or(Duration::ZERO)
}
