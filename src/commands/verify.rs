//! `rudder verify`: hashes every file of the artifacts a recipe uses (or of every artifact in
//! the store) and compares them with their manifests. It only reports: `rudder run` is what
//! moves a corrupted artifact to quarantine and builds it again.

use std::path::{Path, PathBuf};

use rudder_engine::store::Health;
use rudder_engine::{EngineError, Key, Project, Selection, Store, VerifyMode};

use crate::ExitStatus;
use crate::printer::Printer;

pub fn run(
    recipe: Option<&Path>,
    all: bool,
    overrides: &[String],
    store: Option<PathBuf>,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let (store, keys) = match recipe {
        Some(recipe) => {
            let project = Project::open(recipe, overrides, store)?;
            let keys = if all {
                project.store.objects()?
            } else {
                let plan = project.plan(&super::registry(), &Selection::default(), None)?;
                let mut keys: Vec<Key> = plan
                    .keyed
                    .values()
                    .filter(|k| !k.is_source)
                    .map(|k| k.key)
                    .filter(|k| project.store.contains(k))
                    .collect();
                keys.sort();
                keys.dedup();
                keys
            };
            (project.store, keys)
        }
        None => {
            let store = Store::new(store.unwrap_or_else(|| PathBuf::from(".rudder")));
            let keys = store.objects()?;
            (store, keys)
        }
    };
    if !store.exists() {
        return Err(EngineError::Usage(format!(
            "{} is not a rudder store",
            store.root().display()
        ))
        .into());
    }
    let mut corrupted = 0usize;
    let mut files = 0usize;
    let mut bytes = 0u64;
    for key in &keys {
        let (health, hashed) = store.check_counting(key, VerifyMode::Full);
        bytes += hashed;
        let manifest = store.manifest(key).ok().flatten();
        files += manifest.as_ref().map_or(0, |m| m.files.len());
        let what = manifest
            .map(|m| format!("{} ({})", m.name, m.kind))
            .unwrap_or_default();
        match health {
            Health::Intact => printer.out(format!("ok         {}  {what}", key.short())),
            Health::Missing => {}
            Health::Corrupted(problems) => {
                corrupted += 1;
                for problem in problems {
                    printer.data(format!("corrupted  {}  {what}  {problem}", key.short()));
                }
            }
        }
    }
    printer.status(format!(
        "verified {} artifact{} ({files} files, {:.1} MB hashed): {}",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" },
        bytes as f64 / 1e6,
        if corrupted == 0 {
            "all intact".to_owned()
        } else {
            format!(
                "{corrupted} corrupted; `rudder run` moves {} to {} and builds {} again",
                if corrupted == 1 { "it" } else { "them" },
                store.quarantine_dir().display(),
                if corrupted == 1 { "it" } else { "them" },
            )
        }
    ));
    Ok(if corrupted == 0 {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}
