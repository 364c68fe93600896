//! `rudder run`: plan under the store lock, fetch what the remote has (with a remote cache),
//! then run the plan's stages on this machine's threads or as Slurm jobs, pushing what they
//! build when the remote cache writes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rudder_engine::executor::{Executor, Observer, Run};
use rudder_engine::live::Recorder;
use rudder_engine::local::LocalExecutor;
use rudder_engine::plan::{Plan, RemoteIndex};
use rudder_engine::remote::cache::{PushAfterBuild, RemoteCache, Uploader, to_fetch};
use rudder_engine::remote::show_bytes;
use rudder_engine::slurm::SlurmExecutor;
use rudder_engine::{EngineError, Project, VerifyMode};
use rudder_schema::{Backend, ExecutorKind, RemoteCache as RemoteCacheMode};

use crate::ExitStatus;
use crate::cli::RunArgs;
use crate::printer::Printer;
use crate::progress::{TerminalObserver, TransferBar};

/// Where and how the stages run, resolved from the command line over the recipe.
struct Settings {
    executor: ExecutorKind,
    /// Stages at once on this machine (`-j`, else `[recipe] jobs`, else the default rule).
    jobs: Option<usize>,
    keep_going: bool,
    backend: Option<Backend>,
    /// How artifacts are checked before use (`--verify`).
    verify: VerifyMode,
    remote_cache: RemoteCacheMode,
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
            remote_cache: super::remote_mode(
                args.remote_cache.as_deref(),
                args.remote.as_deref(),
                project,
            )?,
        })
    }
}

pub fn run(args: &RunArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let mut project = super::open(&args.recipe, Some(&args.store))?;
    let registry = super::registry();
    let selection = super::selection(&args.selection);
    // GPU backends keep their compiled kernels and autotune results in the store.
    rudder_stages::backend::use_kernel_cache(&project.store.root().join("cache").join("cubecl"));
    let settings = Settings::resolve(args, &project)?;
    project.verify = settings.verify;
    let cache = super::remote_cache(
        &project,
        args.remote.as_deref(),
        settings.remote_cache,
        settings.remote_cache.writes() && !args.dry_run,
        printer,
    )?;
    let index = cache.as_ref().map(|c| c as &dyn RemoteIndex);
    if args.dry_run {
        let plan = project.plan_with_remote(&registry, &selection, settings.backend, index)?;
        super::plan::warn_about_remote(&plan, printer);
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
    let mut plan = project.plan_with_remote(&registry, &selection, settings.backend, index)?;
    super::plan::warn_about_remote(&plan, printer);
    let mut pulled = 0;
    if let Some(cache) = &cache
        && !plan.to_fetch().is_empty()
    {
        pulled = fetch(&project, cache, &plan, settings.verify, printer);
        if pulled < plan.to_fetch().len() {
            // What could not be fetched is built here.
            plan = project.plan(&registry, &selection, settings.backend)?;
        }
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second Ctrl-C while stages wind down is left to the default handling of the terminal.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    // A remote that the plan could not reach is not pushed to (each push would wait out its
    // retries).
    let uploader = cache
        .as_ref()
        .filter(|_| settings.remote_cache.writes() && plan.remote_warning.is_none())
        .map(|c| Uploader::start(c.remote.clone(), project.store.clone()));
    let pushing;
    let observer: &dyn Observer = match &uploader {
        Some(uploader) => {
            pushing = PushAfterBuild {
                inner: &observer,
                uploader,
            };
            &pushing
        }
        None => &observer,
    };
    // What `rudder status` reads from another process while this run goes on.
    let recorder = Recorder::start(
        &project.store,
        &project.recipe.file,
        plan.to_run().count(),
        observer,
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
    // Even after a failure: what was built is pushed.
    let pushed = match (&uploader, &cache) {
        (Some(uploader), Some(cache)) => {
            // Every stage the observer may not have seen end (a Slurm job done between two
            // polls); one the remote has by now costs one request.
            for entry in plan.to_run() {
                if project.store.contains(&entry.key) {
                    uploader.push(&entry.name, entry.key);
                }
            }
            let (report, errors) = uploader.finish();
            for error in errors {
                printer.status(format!("warning: not pushed: {error}"));
            }
            (!report.pushed.is_empty() || !report.raced.is_empty()).then(|| {
                rudder_engine::remote::PushReport {
                    present: Vec::new(),
                    ..report
                }
                .summary(&cache.remote.describe())
            })
        }
        _ => None,
    };
    if let Some(pushed) = &pushed {
        printer.status(pushed);
    }
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
    let elsewhere = match (pulled, &cache) {
        (0, _) | (_, None) => elsewhere,
        (n, Some(cache)) => format!("{elsewhere}, {n} pulled from {}", cache.name()),
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

/// Fetches what the plan finds on the remote (also in place of corrupted artifacts, which go
/// to quarantine); returns how many artifacts are now in the store. A remote that fails is a
/// warning: what it did not give is built.
fn fetch(
    project: &Project,
    cache: &RemoteCache,
    plan: &Plan,
    verify: VerifyMode,
    printer: &Printer,
) -> usize {
    let wanted = to_fetch(plan);
    let bar = TransferBar::new(*printer, "pull");
    let result = cache.remote.pull(&project.store, &wanted, verify, &bar);
    drop(bar);
    match result {
        Ok(report) => {
            super::warn_quarantined(&report);
            for error in &report.errors {
                printer.status(format!("warning: {error}; building it here"));
            }
            if !report.missing.is_empty() {
                printer.status(format!(
                    "warning: gone from the remote since the plan: {}; building here",
                    report.missing.join(", ")
                ));
            }
            if !report.pulled.is_empty() {
                printer.status(format!(
                    "pulled {} from {} ({})",
                    report.pulled.join(", "),
                    cache.name(),
                    show_bytes(report.bytes)
                ));
            }
            report.pulled.len() + report.present.len()
        }
        Err(err) => {
            printer.status(format!("warning: {err}; building here"));
            0
        }
    }
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
        precision: super::precision(args.recipe.precision.as_deref())?,
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
