//! `rudder push RECIPE [NODE...]`: upload the artifacts the lockfile names (all, or the nodes
//! and what they depend on) that the remote lacks.

use rudder_engine::remote;

use crate::ExitStatus;
use crate::cli::TransferArgs;
use crate::printer::Printer;
use crate::progress::TransferBar;

pub fn run(args: &TransferArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(&args.recipe, Some(&args.store))?;
    let lock = super::existing_lockfile(&project)?;
    let wanted = remote::wanted(&project, &lock, &args.nodes)?;
    if wanted.is_empty() {
        printer.status("the lockfile names no artifact: nothing to push");
        return Ok(ExitStatus::Success);
    }
    if !project.store.exists() {
        anyhow::bail!(
            "{} is not a rudder store: run the recipe before pushing it",
            project.store.root().display()
        );
    }
    let remote = super::open_remote(&project, args.remote.as_deref(), true, printer)?;
    // Shared: `gc` cannot remove an artifact while it is read.
    let _lock = project.store.lock(|_| {
        printer.status("waiting for `rudder gc` to release the store...");
    })?;
    let bar = TransferBar::new(*printer, "push");
    let report = remote.push(&project.store, &wanted, &bar)?;
    drop(bar);
    for name in &report.pushed {
        printer.out(format!("pushed   {name}"));
    }
    for name in &report.raced {
        printer.out(format!(
            "present  {name}  (pushed meanwhile by another push)"
        ));
    }
    for name in &report.present {
        printer.out(format!("present  {name}"));
    }
    printer.status(report.summary(&remote.describe()));
    Ok(ExitStatus::Success)
}
