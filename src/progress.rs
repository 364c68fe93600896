//! Progress bars on stderr (hidden when it is not a terminal) and per-stage status lines.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rudder_engine::executor::Observer;
use rudder_engine::integrity::Problem;
use rudder_engine::plan::PlanEntry;
use rudder_engine::runner::{Progress, StageOutcome};

use crate::printer::Printer;

pub struct TerminalObserver {
    pub printer: Printer,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_length(&self, length: u64) {
        self.0.set_length(length);
        self.0.set_style(
            ProgressStyle::with_template("  {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
    }
    fn set_position(&self, position: u64) {
        self.0.set_position(position);
    }
    fn set_message(&self, message: String) {
        self.0.set_message(message);
    }
    fn println(&self, line: &str) {
        // A hidden bar (stderr is not a terminal) drops its printed lines; warnings must not be.
        if self.0.is_hidden() {
            eprintln!("{line}");
        } else {
            self.0.println(line);
        }
    }
}

impl Observer for TerminalObserver {
    fn quarantined(&self, node: &str, place: &std::path::Path, problems: &[Problem]) {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        // A warning, shown even with --quiet: something changed an artifact behind rudder's back.
        eprintln!(
            "warning: the artifact of `{node}` is corrupted ({}): moved to {}",
            problems.join(", "),
            place.display()
        );
    }

    fn waiting_for_lock(&self, holder: Option<u32>) {
        let who = holder.map_or_else(
            || "another rudder process".to_owned(),
            |pid| format!("rudder process {pid}"),
        );
        self.printer
            .status(format!("waiting for {who} to release the store lock..."));
    }

    fn stage_started(&self, entry: &PlanEntry, position: usize, total: usize) -> Box<dyn Progress> {
        self.printer.status(format!(
            "[{position}/{total}] {} ({})",
            entry.name, entry.kind
        ));
        let target = if self.printer.is_quiet() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {elapsed} {msg}").expect("valid template"),
        );
        bar.set_prefix(entry.name.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(Bar(bar))
    }

    fn stage_finished(&self, entry: &PlanEntry, result: Result<&StageOutcome, &str>, seconds: f64) {
        match result {
            Ok(outcome) => {
                let metrics: Vec<String> = outcome
                    .summary
                    .iter()
                    .map(|(k, v)| format!("{k}={}", show_number(*v)))
                    .collect();
                // A long list (an evaluation of many models) belongs to `rudder metrics`.
                let metrics = match metrics.len() {
                    0 => String::new(),
                    1..=MAX_INLINE_METRICS => format!("  {}", metrics.join(" ")),
                    n => format!("  {n} metrics (rudder metrics shows them)"),
                };
                self.printer.status(format!(
                    "      done in {seconds:.1}s -> {}{metrics}",
                    entry.key.short()
                ));
            }
            Err(_) => self
                .printer
                .status(format!("      failed after {seconds:.1}s")),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// The most summary metrics printed on a stage's status line.
const MAX_INLINE_METRICS: usize = 16;

/// Counts as integers, everything else with four decimals.
fn show_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.4}")
    }
}
