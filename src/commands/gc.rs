//! `rudder gc`: remove the artifacts no given lockfile references, from the store or (with
//! `--remote`) from a remote store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rudder_engine::lockfile::Lockfile;
use rudder_engine::remote::{Remote, Remotes, show_bytes};
use rudder_engine::{Key, Store};
use rudder_schema::Recipe;

use crate::ExitStatus;
use crate::cli::GcArgs;
use crate::printer::Printer;

pub fn run(args: &GcArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    match &args.remote {
        Some(remote) => remote_gc(args, remote, printer),
        None => local_gc(&args.lockfiles, &args.store, args.dry_run, printer),
    }
}

fn local_gc(
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
    let keep = referenced(&lockfiles, printer)?;
    if !dry_run {
        // Alone in the store: no pull is running, so what interrupted pulls left goes too.
        rudder_engine::remote::clear_pull_cache(&store);
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

/// Every key the lockfiles name.
fn referenced(lockfiles: &[PathBuf], printer: &Printer) -> anyhow::Result<BTreeSet<Key>> {
    let mut keep: BTreeSet<Key> = BTreeSet::new();
    for path in lockfiles {
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
    Ok(keep)
}

/// `gc --remote`: only the given lockfiles count (a remote serves many machines' recipes), and
/// only `--yes` removes anything.
fn remote_gc(args: &GcArgs, asked: &str, printer: &Printer) -> anyhow::Result<ExitStatus> {
    if args.lockfiles.is_empty() {
        return Err(super::usage(
            "gc --remote needs the lockfiles whose artifacts to keep: every recipe that shares the remote (rudder gc --remote R a.lock b.lock ...)",
        ));
    }
    // The remotes declared by the recipes beside the lockfiles, and the configuration's.
    let mut recipes = Vec::new();
    for lockfile in &args.lockfiles {
        let recipe = lockfile.with_extension("toml");
        if recipe.is_file() {
            recipes.push(Recipe::load(&recipe, &[])?);
        }
    }
    let target = Remotes::load(&recipes.iter().collect::<Vec<_>>())?.require(Some(asked))?;
    let remote = Remote::open(&target, false)?;
    let keep = referenced(&args.lockfiles, printer)?;
    let apply = args.yes && !args.dry_run;
    let report = remote.gc(&keep, args.grace, apply)?;
    for warning in &report.warnings {
        printer.status(format!("warning: {warning}"));
    }
    let verb = if apply { "removed" } else { "would remove" };
    for (key, what) in &report.artifacts {
        printer.out(format!("{verb} {} {what}", key.short()));
    }
    let grace = humantime::format_duration(args.grace);
    printer.status(format!(
        "{verb} {} artifact{} and {} file{} ({}) from {}; kept {} referenced, and {} artifact{} and {} file{} younger than {grace}",
        report.artifacts.len(),
        if report.artifacts.len() == 1 { "" } else { "s" },
        report.blobs,
        if report.blobs == 1 { "" } else { "s" },
        show_bytes(report.bytes),
        remote.describe(),
        report.referenced,
        report.young_artifacts,
        if report.young_artifacts == 1 { "" } else { "s" },
        report.young_blobs,
        if report.young_blobs == 1 { "" } else { "s" },
    ));
    if !apply && (!report.artifacts.is_empty() || report.blobs > 0) {
        printer.status("nothing was removed: pass --yes to remove them");
    }
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
