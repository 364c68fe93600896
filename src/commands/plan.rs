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
        let mut json = plan.to_json();
        if let Some(object) = json.as_object_mut() {
            let memory: serde_json::Map<String, serde_json::Value> =
                rudder_engine::memory::recipe_estimates(&project.recipe)
                    .into_iter()
                    .map(|(name, e)| {
                        let value = serde_json::json!({
                            "weights": e.weights,
                            "gradients": e.gradients,
                            "optimizer": e.optimizer,
                            "activations": e.activations,
                            "total": e.total(),
                        });
                        (name, value)
                    })
                    .collect();
            object.insert("memory".into(), memory.into());
        }
        printer.data(serde_json::to_string_pretty(&json)?);
    } else {
        print(&plan, printer);
        print_memory(&project.recipe, printer);
    }
    Ok(ExitStatus::Success)
}

/// Each training stage's estimated peak memory (engine::memory), with a warning when it exceeds
/// the memory of the stage's device: this machine's for `cpu`, the first GPU's for `cuda` (where
/// the driver can say; `wgpu`'s is not known before the stage runs).
fn print_memory(recipe: &rudder_schema::Recipe, printer: &Printer) {
    use rudder_engine::memory::{gib, recipe_estimates};
    let estimates = recipe_estimates(recipe);
    if estimates.is_empty() {
        return;
    }
    let width = estimates.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    printer.out("estimated peak memory (weights + gradients + optimizer + activations):");
    let ram = machine_memory();
    for (name, e) in &estimates {
        printer.out(format!(
            "  {name:<width$}  {:>9}  = {} + {} + {} + {}",
            gib(e.total()),
            gib(e.weights),
            gib(e.gradients),
            gib(e.optimizer),
            gib(e.activations),
        ));
        let backend = match recipe.node(name).map(|n| &n.body) {
            Some(rudder_schema::NodeBody::Stage(s)) => s.backend,
            _ => continue,
        };
        let (device, memory) = match backend {
            rudder_schema::Backend::Cpu => ("this machine", ram),
            other => ("its GPU", rudder_stages::backend::device_memory(other)),
        };
        if let Some(memory) = memory
            && e.total() > memory
        {
            printer.status(format!(
                "warning: stage `{name}` may need {} but {device} has {}; consider `lora`, \
                 `gradient_checkpointing = true` or a smaller `batch_size`",
                gib(e.total()),
                gib(memory)
            ));
        }
    }
}

/// This machine's memory (`MemTotal` of /proc/meminfo), when it can be read.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
