use rudder_engine::Plan;
use rudder_engine::plan::{RemoteIndex, State};

use crate::ExitStatus;
use crate::cli::PlanArgs;
use crate::printer::Printer;

pub fn run(args: &PlanArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let mut project = super::open(&args.recipe, Some(&args.store))?;
    project.verify = args.verify.verify.into();
    let remote = args.remote.as_deref();
    let mode = super::remote_mode(None, remote, &project)?;
    let cache = super::remote_cache(&project, remote, mode, false, printer)?;
    let plan = project.plan_with_remote(
        &super::registry(),
        &super::selection(&args.selection),
        super::backend(args.backend.as_deref())?,
        cache.as_ref().map(|c| c as &dyn RemoteIndex),
    )?;
    warn_about_remote(&plan, printer);
    if args.json {
        printer.data(serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        print(&plan, printer);
    }
    Ok(ExitStatus::Success)
}

/// The plan as a table: state, name, kind, short key, reasons.
pub fn print(plan: &Plan, printer: &Printer) {
    let width = plan.entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let kind_width = plan.entries.iter().map(|e| e.kind.len()).max().unwrap_or(0);
    for entry in &plan.entries {
        let state = match (entry.state, entry.is_source) {
            (_, true) => "source",
            (State::Cached, false) => "cached",
            (State::Run, false) => "run",
            (State::Remote, false) => "remote",
        };
        let reasons = if entry.reasons.is_empty() {
            String::new()
        } else {
            format!(
                "  {}",
                entry
                    .reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        printer.out(format!(
            "{state:<6}  {:<width$}  {:<kind_width$}  {}{reasons}",
            entry.name,
            entry.kind,
            entry.key.short()
        ));
    }
    let runs = plan.to_run().count();
    let fetches = match plan.to_fetch().len() {
        0 => String::new(),
        n => format!(", {n} to fetch from the remote"),
    };
    printer.out(format!(
        "{runs} to run, {} cached{fetches}",
        plan.entries
            .iter()
            .filter(|e| !e.is_source && e.state == State::Cached)
            .count()
    ));
}

/// A remote the plan could not ask is a warning: the plan is the local one.
pub fn warn_about_remote(plan: &Plan, printer: &Printer) {
    if let Some(warning) = &plan.remote_warning {
        printer.status(format!("warning: {warning}; planned without the remote"));
    }
}
