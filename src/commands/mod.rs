//! One module per subcommand; each resolves its arguments, calls the engine, prints.

pub mod dag;
pub mod exec;
pub mod export;
pub mod gc;
pub mod generate;
pub mod metrics;
pub mod plan;
pub mod report;
pub mod run;
pub mod schema;
pub mod show;
pub mod status;
pub mod validate;
pub mod verify;

use rudder_engine::{Project, Registry, Selection};
use rudder_schema::Backend;

use crate::cli::{RecipeArgs, SelectionArgs, StoreArgs};

/// Every stage kind this build can run: the engine's own and the machine-learning kinds.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    rudder_engine::command::register(&mut registry);
    rudder_stages::register(&mut registry);
    registry
}

pub fn open(recipe: &RecipeArgs, store: Option<&StoreArgs>) -> anyhow::Result<Project> {
    Ok(Project::open(
        &recipe.recipe,
        &recipe.set,
        store.and_then(|s| s.store.clone()),
    )?)
}

pub fn selection(args: &SelectionArgs) -> Selection {
    Selection {
        only: args.only.clone(),
        until: args.until.clone(),
        force: args.force.clone(),
        force_all: args.force_all,
    }
}

pub fn backend(name: Option<&str>) -> anyhow::Result<Option<Backend>> {
    name.map(|n| {
        n.parse::<Backend>()
            .map_err(|e| rudder_engine::EngineError::Usage(e).into())
    })
    .transpose()
}

/// Refuses to read an artifact that the plan found corrupted: `rudder run` quarantines and
/// rebuilds it.
pub fn refuse_corrupted(entry: &rudder_engine::plan::PlanEntry) -> anyhow::Result<()> {
    for reason in &entry.reasons {
        if let rudder_engine::plan::Reason::Corrupted(problems) = reason {
            anyhow::bail!(
                "the artifact of `{}` is corrupted ({problems}); `rudder run` moves it to quarantine and builds it again",
                entry.name
            );
        }
    }
    Ok(())
}
