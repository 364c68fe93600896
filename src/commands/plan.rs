use rudder_engine::plan::State;
use rudder_engine::{Plan, VerifyMode};

use crate::ExitStatus;
use crate::cli::{RecipeArgs, SelectionArgs, StoreArgs};
use crate::printer::Printer;

pub fn run(
    recipe: &RecipeArgs,
    selection: &SelectionArgs,
    store: &StoreArgs,
    backend: Option<&str>,
    json: bool,
    verify: VerifyMode,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let mut project = super::open(recipe, Some(store))?;
    project.verify = verify;
    let plan = project.plan(
        &super::registry(),
        &super::selection(selection),
        super::backend(backend)?,
    )?;
    if json {
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
    printer.out(format!(
        "{runs} to run, {} cached",
        plan.entries
            .iter()
            .filter(|e| !e.is_source && e.state == State::Cached)
            .count()
    ));
}
