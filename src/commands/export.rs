use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rudder_engine::Selection;

use crate::ExitStatus;
use crate::cli::{RecipeArgs, StoreArgs};
use crate::printer::Printer;

/// Copies a stage's model artifact (every file but the store's manifest) into `dir`.
pub fn run(
    recipe: &RecipeArgs,
    stage: &str,
    dir: &Path,
    store: &StoreArgs,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let project = super::open(recipe, Some(store))?;
    let plan = project.plan(&super::registry(), &Selection::default(), None)?;
    let Some(entry) = plan.entries.iter().find(|e| e.name == stage) else {
        return Err(rudder_engine::EngineError::Usage(format!(
            "no node named `{stage}` in the recipe"
        ))
        .into());
    };
    if entry.is_source {
        return Err(rudder_engine::EngineError::Usage(format!("`{stage}` is not a stage")).into());
    }
    let Some(manifest) = project.store.manifest(&entry.key)? else {
        anyhow::bail!(
            "`{stage}` is not in the store; run it first (rudder run {} --until {stage})",
            recipe.recipe.display()
        );
    };
    super::refuse_corrupted(entry)?;
    let source = project.store.object_dir(&entry.key);
    for file in &manifest.files {
        let target = dir.join(&file.name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A copy out of the store is the user's: writable, unlike the read-only artifact.
        // Written beside the target and renamed, so a read-only earlier export is replaced.
        let partial = dir.join(format!("{}.partial", file.name));
        std::fs::copy(source.join(&file.name), &partial)?;
        let mut permissions = std::fs::metadata(&partial)?.permissions();
        permissions.set_mode(permissions.mode() | 0o200);
        std::fs::set_permissions(&partial, permissions)?;
        std::fs::rename(&partial, &target)?;
    }
    printer.status(format!(
        "exported {} files of `{stage}` to {}",
        manifest.files.len(),
        dir.display()
    ));
    Ok(ExitStatus::Success)
}
