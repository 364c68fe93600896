//! One module per subcommand; each resolves its arguments, calls the engine, prints.

pub mod bench;
pub mod dag;
pub mod exec;
pub mod export;
pub mod gc;
pub mod generate;
pub mod metrics;
pub mod plan;
pub mod pull;
pub mod push;
pub mod report;
pub mod run;
pub mod schema;
pub mod show;
pub mod status;
pub mod validate;
pub mod verify;

use rudder_engine::lockfile::Lockfile;
use rudder_engine::remote::cache::RemoteCache;
use rudder_engine::remote::{Remote, RemoteTarget, Remotes};
use rudder_engine::{EngineError, Project, Registry, Selection};
use rudder_schema::{Backend, Precision, RemoteCache as RemoteCacheMode};

use crate::cli::{RecipeArgs, SelectionArgs, StoreArgs};
use crate::printer::Printer;

/// Every stage kind this build can run: the engine's own and the machine-learning kinds.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    rudder_engine::command::register(&mut registry);
    rudder_stages::register(&mut registry);
    registry
}

pub fn open(recipe: &RecipeArgs, store: Option<&StoreArgs>) -> anyhow::Result<Project> {
    let mut project = Project::open(
        &recipe.recipe,
        &recipe.set,
        store.and_then(|s| s.store.clone()),
    )?;
    if let Some(precision) = precision(recipe.precision.as_deref())? {
        project.recipe.force_precision(precision);
    }
    Ok(project)
}

pub fn precision(name: Option<&str>) -> anyhow::Result<Option<Precision>> {
    name.map(|n| {
        n.parse::<Precision>()
            .map_err(|e| rudder_engine::EngineError::Usage(e).into())
    })
    .transpose()
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

/// The remote a command names (or the default one), among the recipe's and the configuration
/// file's; a command that needs one fails without.
pub fn remote_target(project: &Project, asked: Option<&str>) -> anyhow::Result<RemoteTarget> {
    Ok(Remotes::load(&[&project.recipe])?.require(asked)?)
}

/// Opens the remote a push or a pull uses, saying which it is.
pub fn open_remote(
    project: &Project,
    asked: Option<&str>,
    create: bool,
    printer: &Printer,
) -> anyhow::Result<Remote> {
    let target = remote_target(project, asked)?;
    printer.status(format!("remote {target}, from {}", target.origin));
    Ok(Remote::open(&target, create)?)
}

/// The recipe's lockfile, which `push` and `pull` act on; it must exist.
pub fn existing_lockfile(project: &Project) -> anyhow::Result<Lockfile> {
    let path = project.recipe.lockfile_path();
    if !path.is_file() {
        anyhow::bail!(
            "no lockfile {}: push and pull act on the artifacts a lockfile names (run the recipe, or get its lockfile, first)",
            path.display()
        );
    }
    Ok(project.lockfile()?)
}

/// A usage error (exit code 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    EngineError::Usage(message.into()).into()
}

/// How a plan or a run uses a remote: `--remote-cache`, else the recipe's `remote_cache`, else
/// `read-write` when a remote is named (`--remote`, `RUDDER_REMOTE`), else off.
pub fn remote_mode(
    flag: Option<&str>,
    asked: Option<&str>,
    project: &Project,
) -> anyhow::Result<RemoteCacheMode> {
    if let Some(flag) = flag {
        return Ok(flag.parse().map_err(EngineError::Usage)?);
    }
    let recipe = project.recipe.meta.remote_cache;
    Ok(if recipe.reads() {
        recipe
    } else if asked.is_some_and(|a| !a.trim().is_empty()) {
        RemoteCacheMode::ReadWrite
    } else {
        RemoteCacheMode::Off
    })
}

/// The remote a plan or a run looks missing artifacts up on, when `mode` reads one (a missing
/// directory is created when `create`). A remote that cannot be opened is a warning: the store
/// works without it.
pub fn remote_cache(
    project: &Project,
    asked: Option<&str>,
    mode: RemoteCacheMode,
    create: bool,
    printer: &Printer,
) -> anyhow::Result<Option<RemoteCache>> {
    if !mode.reads() {
        return Ok(None);
    }
    let Some(target) = Remotes::load(&[&project.recipe])?.choose(asked)? else {
        printer.status(format!(
            "warning: remote_cache is `{}`, but no remote is named (--remote, RUDDER_REMOTE) or marked `default = true`; going on without one",
            mode.as_str()
        ));
        return Ok(None);
    };
    match Remote::open(&target, create) {
        Ok(remote) => Ok(Some(RemoteCache::new(std::sync::Arc::new(remote)))),
        Err(err) => {
            printer.status(format!("warning: {err}; going on without the remote"));
            Ok(None)
        }
    }
}

/// Says which corrupted artifacts a pull moved to quarantine (shown even with --quiet, as a
/// run's quarantine warnings are).
pub fn warn_quarantined(report: &rudder_engine::remote::PullReport) {
    for moved in &report.quarantined {
        let problems: Vec<String> = moved.problems.iter().map(ToString::to_string).collect();
        eprintln!(
            "warning: the artifact of `{}` is corrupted ({}): moved to {} and pulled again",
            moved.name,
            problems.join(", "),
            moved.place.display()
        );
    }
}
