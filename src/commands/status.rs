use rudder_engine::live::{self, LiveStatus, RunRecord, StageState};

use crate::ExitStatus;
use crate::cli::{RecipeArgs, StoreArgs};
use crate::printer::Printer;

pub fn run(
    recipe: &RecipeArgs,
    store: &StoreArgs,
    json: bool,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let project = super::open(recipe, Some(store))?;
    let status = live::status(&project.store, &project.recipe.file)?;
    if json {
        printer.data(serde_json::to_string_pretty(&status)?);
        return Ok(ExitStatus::Success);
    }
    let name = &project.recipe.name;
    if let Some(live) = &status.live {
        print_live(name, live, printer);
    }
    match &status.last {
        Some(record) => print_last(name, record, status.live.is_some(), printer),
        None if status.live.is_none() => {
            printer.out(format!("{name}: no run of this recipe on this store yet"));
        }
        None => {}
    }
    Ok(ExitStatus::Success)
}

fn print_live(name: &str, live: &LiveStatus, printer: &Printer) {
    let run = &live.run;
    let done = run
        .stages
        .iter()
        .filter(|s| s.state == StageState::Done)
        .count();
    let started = ago(live::seconds_since(&run.started));
    if live.alive {
        printer.out(format!(
            "{name}: running (pid {}, started {started}), {done} of {} stages done",
            run.pid, run.total
        ));
    } else {
        printer.out(format!(
            "{name}: the run of pid {} (started {started}) ended without finishing: it was killed; \
             `rudder run` resumes a training stage from its last checkpoint",
            run.pid
        ));
    }
    let width = run.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let kinds = run.stages.iter().map(|s| s.kind.len()).max().unwrap_or(0);
    // Lines under a stage start below its kind.
    let indent = " ".repeat(2 + 9 + width + 2 + kinds + 2);
    for stage in &run.stages {
        let mut line = match (stage.state, live.alive) {
            (StageState::Done, _) => format!(
                "  done     {:<width$}  {:<kinds$}  {}",
                stage.name,
                stage.kind,
                seconds(stage.seconds.unwrap_or(0.0))
            ),
            (StageState::Failed, _) => format!(
                "  failed   {:<width$}  {:<kinds$}  {}",
                stage.name,
                stage.kind,
                stage.error.as_deref().unwrap_or("")
            ),
            (StageState::Running, true) => format!(
                "  running  {:<width$}  {:<kinds$}  for {}",
                stage.name,
                stage.kind,
                seconds(live::seconds_since(&stage.started))
            ),
            (StageState::Running, false) => {
                format!("  stopped  {:<width$}  {:<kinds$}", stage.name, stage.kind)
            }
        };
        if stage.state != StageState::Done
            && let Some(p) = live.progress.get(&stage.name)
        {
            if let Some(length) = p.length.filter(|&l| l > 0) {
                line.push_str(&format!(
                    "  step {}/{length} ({:.0}%)",
                    p.position,
                    100.0 * p.position as f64 / length as f64
                ));
            }
            if !p.message.is_empty() {
                line.push_str(&format!("  {}", p.message));
            }
            if live.alive
                && let Some(eta) = p.eta_seconds
            {
                // The ETA was computed when the status was written.
                let left = (eta - live::seconds_since(&p.updated)).max(0.0);
                line.push_str(&format!("  ETA {}", seconds(left)));
            }
        }
        printer.out(line);
        if let Some(metrics) = live.metrics.get(&stage.name) {
            let shown: Vec<String> = ["step", "loss", "learning_rate", "grad_norm"]
                .iter()
                .filter_map(|k| {
                    Some(format!(
                        "{k}={}",
                        crate::report::number(metrics.get(*k)?.as_f64()?)
                    ))
                })
                .collect();
            printer.out(format!("{indent}last logged: {}", shown.join(" ")));
        }
        if let Some(dir) = live.pending.get(&stage.name) {
            printer.out(format!("{indent}writing to {}", dir.display()));
        }
    }
}

fn print_last(name: &str, record: &RunRecord, after_live: bool, printer: &Printer) {
    let total: f64 = record.ran.iter().map(|r| r.seconds).sum();
    printer.out(format!(
        "{}{name}: last finished run started {}: {}; ran {} stage{} in {}, {} cached",
        if after_live { "\n" } else { "" },
        ago(live::seconds_since(&record.started)),
        record.outcome,
        record.ran.len(),
        if record.ran.len() == 1 { "" } else { "s" },
        seconds(total),
        record.cached
    ));
    let width = record.ran.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for ran in &record.ran {
        printer.out(format!(
            "  {:<width$}  {:>8}  {}",
            ran.name,
            seconds(ran.seconds),
            ran.key.as_deref().map_or("", |k| &k[..12.min(k.len())])
        ));
    }
}

fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn ago(s: f64) -> String {
    format!("{} ago", seconds(s))
}
