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
    let source = project.store.object_dir(&entry.key);
    for file in &manifest.files {
        let target = dir.join(&file.name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source.join(&file.name), &target)?;
    }
    printer.status(format!(
        "exported {} files of `{stage}` to {}",
        manifest.files.len(),
        dir.display()
    ));
    Ok(ExitStatus::Success)
}
