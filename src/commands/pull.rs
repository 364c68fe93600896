//! `rudder pull RECIPE [NODE...]`: fetch the artifacts the lockfile names (all, or the nodes
//! and what they depend on) into the store, each file verified against its manifest. An
//! artifact of the store that fails its check is fetched again, and the corrupted one moved to
//! quarantine.

use rudder_engine::{VerifyMode, remote};

use crate::ExitStatus;
use crate::cli::TransferArgs;
use crate::printer::Printer;
use crate::progress::TransferBar;

pub fn run(args: &TransferArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(&args.recipe, Some(&args.store))?;
    let lock = super::existing_lockfile(&project)?;
    let wanted = remote::wanted(&project, &lock, &args.nodes)?;
    if wanted.is_empty() {
        printer.status("the lockfile names no artifact: nothing to pull");
        return Ok(ExitStatus::Success);
    }
    let remote = super::open_remote(&project, args.remote.as_deref(), false, printer)?;
    project.store.init()?;
    let _lock = project.store.lock(|_| {
        printer.status("waiting for `rudder gc` to release the store...");
    })?;
    let bar = TransferBar::new(*printer, "pull");
    let report = remote.pull(&project.store, &wanted, VerifyMode::Cheap, &bar)?;
    drop(bar);
    super::warn_quarantined(&report);
    for name in &report.pulled {
        printer.out(format!("pulled   {name}"));
    }
    for name in &report.present {
        printer.out(format!("present  {name}"));
    }
    for name in &report.differ_from_lockfile {
        printer.status(format!(
            "warning: the remote's `{name}` has the lockfile's key but other bytes than the lockfile records (it was built again elsewhere); it was pulled as the remote has it"
        ));
    }
    printer.status(report.summary(&remote.describe()));
    let mut failures: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    if !report.missing.is_empty() {
        failures.push(format!(
            "not on remote {}: {} (push it from a store that has it)",
            remote.describe(),
            report.missing.join(", ")
        ));
    }
    match failures.len() {
        0 => Ok(ExitStatus::Success),
        _ => anyhow::bail!("{}", failures.join("\n")),
    }
}
