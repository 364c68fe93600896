use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rudder_engine::lockfile::Lockfile;
use rudder_engine::{Key, Store};

use crate::ExitStatus;
use crate::printer::Printer;

pub fn run(
    lockfiles: &[PathBuf],
    store_dir: &Path,
    dry_run: bool,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let store = Store::new(store_dir);
    if !store.exists() {
        return Err(rudder_engine::EngineError::Usage(format!(
            "{} is not a rudder store",
            store_dir.display()
        ))
        .into());
    }
    let lockfiles = if lockfiles.is_empty() {
        recorded_lockfiles(&store)
    } else {
        lockfiles.to_vec()
    };
    if lockfiles.is_empty() {
        return Err(rudder_engine::EngineError::Usage(
            "no lockfile given, and the store records none that still exists".into(),
        )
        .into());
    }
    let _lock = store.lock_exclusive(|_| {
        printer.status("waiting for running rudder processes to release the store...")
    })?;
    let mut keep: BTreeSet<Key> = BTreeSet::new();
    for path in &lockfiles {
        if !path.exists() {
            return Err(rudder_engine::EngineError::Usage(format!(
                "lockfile {} does not exist",
                path.display()
            ))
            .into());
        }
        let lock = Lockfile::read(path)?;
        keep.extend(lock.nodes.iter().filter_map(|n| Key::from_hex(&n.key)));
        printer.status(format!("keeping what {} references", path.display()));
    }
    let mut removed = 0u64;
    let mut bytes = 0u64;
    for key in store.objects()? {
        if keep.contains(&key) {
            continue;
        }
        let size = store
            .manifest(&key)
            .ok()
            .flatten()
            .map_or(0, |m| Store::size_of(&m));
        let kind = store
            .manifest(&key)
            .ok()
            .flatten()
            .map(|m| format!("{} {}", m.kind, m.name))
            .unwrap_or_default();
        printer.out(format!(
            "{} {} {kind}",
            if dry_run { "would remove" } else { "removed" },
            key.short()
        ));
        if !dry_run {
            store.remove_object(&key)?;
        }
        removed += 1;
        bytes += size;
    }
    printer.status(format!(
        "{} {removed} artifact{} ({:.1} MB)",
        if dry_run { "would remove" } else { "removed" },
        if removed == 1 { "" } else { "s" },
        bytes as f64 / 1e6
    ));
    Ok(ExitStatus::Success)
}

/// Lockfiles of the recipes that ran on this store (from its run records) that still exist.
fn recorded_lockfiles(store: &Store) -> Vec<PathBuf> {
    let mut found = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(store.runs_dir()) {
        for entry in entries.flatten() {
            let record: Option<serde_json::Value> = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(path) = record.as_ref().and_then(|r| r["lockfile"].as_str()) {
                let path = PathBuf::from(path);
                if path.exists() {
                    found.insert(path);
                }
            }
        }
    }
    found.into_iter().collect()
}
