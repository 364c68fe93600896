use rudder_engine::Selection;
use rudder_engine::memory::gib;
use rudder_engine::peak::PeakScope;
use rudder_engine::plan::State;
use rudder_schema::NodeBody;
use serde_json::Value;

use crate::ExitStatus;
use crate::cli::{RecipeArgs, StoreArgs};
use crate::printer::Printer;

pub fn run(
    recipe: &RecipeArgs,
    node: &str,
    store: &StoreArgs,
    path_only: bool,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let project = super::open(recipe, Some(store))?;
    let plan = project.plan(&super::registry(), &Selection::default(), None)?;
    let Some(entry) = plan.entries.iter().find(|e| e.name == node) else {
        return Err(rudder_engine::EngineError::Usage(format!(
            "no node named `{node}` in the recipe"
        ))
        .into());
    };
    let keyed = &plan.keyed[&entry.index];
    let in_store = !entry.is_source && project.store.contains(&entry.key);
    let artifact = project.store.object_dir(&entry.key);
    if path_only {
        if !in_store {
            return Ok(ExitStatus::Failure);
        }
        printer.data(std::path::absolute(&artifact)?.display().to_string());
        return Ok(ExitStatus::Success);
    }
    printer.out(format!("{} ({})", entry.name, entry.kind));
    printer.out(format!("  key       {}", entry.key));
    let state = match (entry.is_source, entry.state) {
        (true, _) => "source".to_owned(),
        (false, State::Cached) => "cached".to_owned(),
        (false, State::Run | State::Remote) => format!(
            "not built ({})",
            entry
                .reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    printer.out(format!("  state     {state}"));
    if in_store {
        printer.out(format!(
            "  artifact  {}",
            std::path::absolute(&artifact)?.display()
        ));
    }
    let vertex = project.graph.vertex(entry.index);
    let recipe_node = &project.recipe.nodes[vertex.node];
    if let Value::Object(params) = &keyed.entry.params {
        printer.out("  params");
        for (name, value) in params {
            // Where each setting came from: the recipe, `--set`, or the kind's default.
            let origin = if vertex.part.is_some() {
                ""
            } else {
                match project.recipe.spans.get(&recipe_node.path.key(name)) {
                    Some(spans) if spans.value.source == 0 => "recipe",
                    Some(_) => "--set",
                    None => "default",
                }
            };
            printer.out(format!("    {name} = {value}  {origin}"));
        }
    }
    if let NodeBody::Stage(stage) = &recipe_node.body {
        printer.out(format!(
            "  seed {}, backend {}, precision {}",
            stage.seed,
            keyed.backend.as_str(),
            stage.precision.as_str()
        ));
    }
    if !vertex.inputs.is_empty() {
        printer.out("  inputs");
        for (role, key) in &keyed.entry.inputs {
            let from = vertex
                .inputs
                .iter()
                .find(|i| &i.role == role)
                .map(|i| match &i.source {
                    rudder_engine::graph::Source::Vertex { index, .. } => {
                        project.graph.vertex(*index).name.clone()
                    }
                    rudder_engine::graph::Source::File(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            printer.out(format!(
                "    {role} = {from}  {}",
                &key[..12.min(key.len())]
            ));
        }
    }
    if in_store && let Some(manifest) = project.store.manifest(&entry.key)? {
        if !manifest.summary.is_empty() {
            printer.out("  metrics");
            for (name, value) in &manifest.summary {
                printer.out(format!("    {name} = {value}"));
            }
        }
        printer.out(format!(
            "  built {} in {:.1}s, {} files",
            manifest.started,
            manifest.seconds,
            manifest.files.len()
        ));
        if let Some(peak) = &manifest.peak_memory {
            // The plan's estimate beside what was measured, for training stages.
            let estimate = rudder_engine::memory::recipe_estimates(&project.recipe)
                .into_iter()
                .find(|(name, _)| *name == entry.name)
                .map(|(_, e)| format!(", estimated {}", gib(e.total())))
                .unwrap_or_default();
            let scope = match peak.scope {
                PeakScope::Stage => "while it ran alone",
                PeakScope::Process => "the process's, other stages running at the same time",
            };
            printer.out(format!(
                "  memory    peak {} measured ({scope}){estimate}",
                gib(peak.bytes)
            ));
        }
        if let Some(sandbox) = &manifest.sandbox {
            let how = if sandbox.enforced {
                format!(
                    "confined (Landlock ABI {}), network {}",
                    sandbox.landlock_abi,
                    if sandbox.network { "allowed" } else { "off" }
                )
            } else {
                "not confined".to_owned()
            };
            let note = sandbox
                .note
                .as_ref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            printer.out(format!("  sandbox   {}, {how}{note}", sandbox.mode));
        }
    }
    Ok(ExitStatus::Success)
}
