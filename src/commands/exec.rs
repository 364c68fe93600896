//! `rudder exec RECIPE NODE --key KEY`: build one node's artifact, as a Slurm job does. The
//! recipe is planned here as `rudder run` planned it; a node whose key differs (the recipe, its
//! data or an input changed since the job was submitted) is refused, so that a job never builds
//! something other than what was planned. Writes no lockfile: the run that submitted the job
//! does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rudder_engine::executor::{Job, JobEnd, Observer, Run};
use rudder_engine::local::available_cores;
use rudder_engine::{EngineError, Key, Selection};

use crate::ExitStatus;
use crate::cli::ExecArgs;
use crate::printer::Printer;
use crate::progress::TerminalObserver;

pub fn run(args: &ExecArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let key = Key::from_hex(&args.key).ok_or_else(|| {
        EngineError::Usage(format!(
            "--key {}: a key is 64 hexadecimal characters",
            args.key
        ))
    })?;
    let mut project = super::open(&args.recipe, Some(&args.store))?;
    project.verify = args.verify.verify.into();
    // GPU backends keep their compiled kernels and autotune results in the store.
    rudder_stages::backend::use_kernel_cache(&project.store.root().join("cache").join("cubecl"));
    let registry = super::registry();
    let backend = super::backend(args.backend.as_deref())?;
    let observer = TerminalObserver::for_job(*printer);
    project.store.init()?;
    let _lock = project
        .store
        .lock(|holder| observer.waiting_for_lock(holder))?;
    let plan = project.plan(&registry, &Selection::default(), backend)?;
    let entry = plan
        .entries
        .iter()
        .find(|e| e.name == args.node)
        .ok_or_else(|| {
            EngineError::Usage(format!("no node named `{}` in the recipe", args.node))
        })?;
    if entry.is_source {
        return Err(EngineError::Usage(format!(
            "`{}` is a {}, not a stage: nothing builds it",
            entry.name, entry.kind
        ))
        .into());
    }
    if entry.key != key {
        return Err(EngineError::Usage(format!(
            "the recipe's plan gives `{}` the key {}, not {}: the recipe, its data or an input changed since this was planned; nothing was built",
            entry.name,
            entry.key,
            key
        ))
        .into());
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // SIGTERM too (Slurm's signal before a time limit, a preemption or scancel): the stage
    // checkpoints, and a requeued job resumes from there.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let run = Run::new(
        &project.recipe,
        &project.graph,
        &registry,
        &project.store,
        &plan,
        &observer,
        &interrupted,
        false,
        project.verify,
    );
    let job = Job {
        entry,
        needs: Vec::new(),
        rerun: args.force,
    };
    let threads = threads();
    printer.status(format!(
        "building `{}` ({}) {} on {} with {threads} thread{}",
        entry.name,
        entry.kind,
        entry.key.short(),
        rudder_engine::fsutil::host_name(),
        if threads == 1 { "" } else { "s" }
    ));
    match run.build(&job, 1, threads) {
        JobEnd::Built { .. } => Ok(ExitStatus::Success),
        JobEnd::Found => {
            printer.status(format!(
                "`{}` ({}) is in the store already",
                entry.name,
                entry.key.short()
            ));
            Ok(ExitStatus::Success)
        }
        JobEnd::Failed(err) => Err(err.into()),
        JobEnd::NotRun => Err(EngineError::Interrupted.into()),
    }
}

/// The job's cores when Slurm says how many (`--cpus-per-task`), else this machine's.
fn threads() -> usize {
    std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(available_cores)
}
