use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rudder_engine::VerifyMode;
use rudder_engine::executor::Executor;

use crate::ExitStatus;
use crate::cli::{RecipeArgs, SelectionArgs, StoreArgs};
use crate::printer::Printer;
use crate::progress::TerminalObserver;

pub fn run(
    recipe: &RecipeArgs,
    selection: &SelectionArgs,
    store: &StoreArgs,
    backend: Option<&str>,
    dry_run: bool,
    verify: VerifyMode,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let mut project = super::open(recipe, Some(store))?;
    project.verify = verify;
    let registry = super::registry();
    let selection = super::selection(selection);
    let backend = super::backend(backend)?;
    if dry_run {
        let plan = project.plan(&registry, &selection, backend)?;
        super::plan::print(&plan, printer);
        return Ok(ExitStatus::Success);
    }
    let observer = TerminalObserver { printer: *printer };
    project.store.init()?;
    let _lock = project.store.lock(|holder| {
        use rudder_engine::executor::Observer;
        observer.waiting_for_lock(holder);
    })?;
    // Planned under the lock, so that what another run just built counts as cached.
    let plan = project.plan(&registry, &selection, backend)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second Ctrl-C while stages wind down is left to the default handling of the terminal.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    let executor = Executor {
        recipe: &project.recipe,
        graph: &project.graph,
        registry: &registry,
        store: &project.store,
        observer: &observer,
        interrupted: &interrupted,
        verify,
    };
    let lock = project.lockfile()?;
    let report = executor.run(&plan, &lock)?;
    printer.status(format!(
        "ran {} stage{}, {} cached; lockfile {}",
        report.ran.len(),
        if report.ran.len() == 1 { "" } else { "s" },
        report.cached,
        project.recipe.lockfile_path().display()
    ));
    Ok(ExitStatus::Success)
}
