use rudder_engine::Selection;
use serde_json::json;

use crate::ExitStatus;
use crate::cli::{RecipeArgs, StoreArgs};
use crate::printer::Printer;

pub fn run(
    recipe: &RecipeArgs,
    store: &StoreArgs,
    json: bool,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let project = super::open(recipe, Some(store))?;
    let plan = project.plan(&super::registry(), &Selection::default(), None)?;
    let mut rows = Vec::new();
    for entry in plan.entries.iter().filter(|e| !e.is_source) {
        if let Some(manifest) = project.store.manifest(&entry.key)? {
            rows.push((entry, manifest.summary));
        }
    }
    if json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(e, summary)| json!({"name": e.name, "kind": e.kind, "key": e.key.to_hex(), "metrics": summary}))
            .collect();
        printer.data(serde_json::to_string_pretty(&json!({ "nodes": nodes }))?);
        return Ok(ExitStatus::Success);
    }
    if rows.is_empty() {
        printer.out("no stage of this recipe is in the store yet");
    }
    for (entry, summary) in rows {
        let metrics: Vec<String> = summary.iter().map(|(k, v)| format!("{k}={v:.6}")).collect();
        printer.out(format!(
            "{:<20} {:<16} {}",
            entry.name,
            entry.kind,
            if metrics.is_empty() {
                "-".into()
            } else {
                metrics.join("  ")
            }
        ));
    }
    Ok(ExitStatus::Success)
}
