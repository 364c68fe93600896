//! `rudder run`: plan under the store lock, then run the plan's stages on this machine's
//! threads or as Slurm jobs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rudder_engine::executor::{Executor, Observer, Run};
use rudder_engine::live::Recorder;
use rudder_engine::local::LocalExecutor;
use rudder_engine::slurm::SlurmExecutor;
use rudder_engine::{EngineError, Project, VerifyMode};
use rudder_schema::{Backend, ExecutorKind};

use crate::ExitStatus;
use crate::cli::RunArgs;
use crate::printer::Printer;
use crate::progress::TerminalObserver;

/// Where and how the stages run, resolved from the command line over the recipe.
struct Settings {
    executor: ExecutorKind,
    /// Stages at once on this machine (`-j`, else `[recipe] jobs`, else the default rule).
    jobs: Option<usize>,
    keep_going: bool,
    backend: Option<Backend>,
    /// How artifacts are checked before use (`--verify`).
    verify: VerifyMode,
}

impl Settings {
    fn resolve(args: &RunArgs, project: &Project) -> anyhow::Result<Settings> {
        let executor = match &args.executor {
            Some(name) => name.parse().map_err(EngineError::Usage)?,
            None => project.recipe.executor.kind,
        };
        Ok(Settings {
            executor,
            jobs: args.jobs.or(project.recipe.meta.jobs).map(|j| j as usize),
            keep_going: args.keep_going,
            backend: super::backend(args.backend.as_deref())?,
            verify: args.verify.verify.into(),
        })
    }
}

pub fn run(args: &RunArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let mut project = super::open(&args.recipe, Some(&args.store))?;
    let registry = super::registry();
    let selection = super::selection(&args.selection);
    let settings = Settings::resolve(args, &project)?;
    project.verify = settings.verify;
    if args.dry_run {
        let plan = project.plan(&registry, &selection, settings.backend)?;
        super::plan::print(&plan, printer);
        return Ok(ExitStatus::Success);
    }
    let local = LocalExecutor::new(settings.jobs);
    let slurm;
    let executor: &dyn Executor = match settings.executor {
        ExecutorKind::Local => &local,
        ExecutorKind::Slurm => {
            slurm = slurm_executor(&project, args)?;
            &slurm
        }
    };
    let parallel = settings.executor == ExecutorKind::Slurm || local.jobs > 1;
    let observer = TerminalObserver::new(*printer, parallel);
    project.store.init()?;
    let _lock = project
        .store
        .lock(|holder| observer.waiting_for_lock(holder))?;
    // Planned under the lock, so that what another run just built counts as cached.
    let plan = project.plan(&registry, &selection, settings.backend)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second Ctrl-C while stages wind down is left to the default handling of the terminal.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    // What `rudder status` reads from another process while this run goes on.
    let recorder = Recorder::start(
        &project.store,
        &project.recipe.file,
        plan.to_run().count(),
        &observer,
    )?;
    let run = Run::new(
        &project.recipe,
        &project.graph,
        &registry,
        &project.store,
        &plan,
        &recorder,
        &interrupted,
        settings.keep_going,
        settings.verify,
    );
    let lock = project.lockfile()?;
    let result = run.run(&lock, executor);
    recorder.finish();
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            if let EngineError::RunFailed { not_run, .. } = &err
                && !not_run.is_empty()
                && !settings.keep_going
            {
                printer.status("hint: `--keep-going` runs the stages that need no failed one");
            }
            return Err(err.into());
        }
    };
    let elsewhere = match report.built_elsewhere {
        0 => String::new(),
        n => format!(", {n} built meanwhile by another run"),
    };
    printer.status(format!(
        "ran {} stage{}, {} cached{elsewhere}; lockfile {}",
        report.ran.len(),
        if report.ran.len() == 1 { "" } else { "s" },
        report.cached,
        project.recipe.lockfile_path().display()
    ));
    Ok(ExitStatus::Success)
}

/// The Slurm executor: jobs run `rudder exec` with the arguments that make them plan what this
/// run planned.
fn slurm_executor(project: &Project, args: &RunArgs) -> anyhow::Result<SlurmExecutor> {
    for tool in ["sbatch", "squeue", "scancel"] {
        if which(tool).is_none() {
            return Err(EngineError::Usage(format!(
                "the slurm executor needs `{tool}` on PATH (run on a Slurm login node, or use --executor local)"
            ))
            .into());
        }
    }
    let spec = &project.recipe.executor;
    let program = match &spec.rudder {
        Some(path) => project.recipe.dir.join(path),
        None => std::env::current_exe()?,
    };
    Ok(SlurmExecutor {
        program,
        recipe: std::path::absolute(&project.recipe.file)?,
        overrides: args.recipe.set.clone(),
        backend: super::backend(args.backend.as_deref())?,
        verify: args.verify.verify.into(),
        poll: Duration::from_secs_f64(spec.poll_seconds),
    })
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}
