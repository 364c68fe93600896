//! Progress on stderr: one bar per running stage on a terminal (an indicatif `MultiProgress`),
//! plain status lines otherwise. When stages may run at once, every line says which stage it
//! is about: status lines name it, and lines a stage prints are prefixed with its name when
//! stderr is not a terminal (on a terminal they appear above the bars, where its bar names it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rudder_engine::executor::Observer;
use rudder_engine::integrity::Problem;
use rudder_engine::plan::PlanEntry;
use rudder_engine::runner::{Progress, StageOutcome};

use crate::printer::Printer;

/// How often a stage's position is printed as a line when stderr is not a terminal (a CI or
/// Slurm log), where there is no bar to show it.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(30);

pub struct TerminalObserver {
    printer: Printer,
    /// Several stages may run at once.
    parallel: bool,
    /// Print `[3/10] name (kind)` when a stage starts, and its key and metrics when it ends
    /// (not in a Slurm job's log: it says what it builds itself, and the run that submitted
    /// the job prints the rest).
    numbered: bool,
    bars: MultiProgress,
}

impl TerminalObserver {
    pub fn new(printer: Printer, parallel: bool) -> Self {
        let target = if printer.is_quiet() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        TerminalObserver {
            printer,
            parallel,
            numbered: true,
            bars: MultiProgress::with_draw_target(target),
        }
    }

    /// For `rudder exec`: one stage, whose start the caller announces.
    pub fn for_job(printer: Printer) -> Self {
        TerminalObserver {
            numbered: false,
            ..Self::new(printer, false)
        }
    }

    /// A status line, above the bars on a terminal.
    fn line(&self, text: String) {
        if self.bars.is_hidden() {
            self.printer.status(text);
        } else {
            let _ = self.bars.println(text);
        }
    }

    /// `name ` when stages run at once, so that an end names the stage it ends.
    fn who(&self, entry: &PlanEntry) -> String {
        if self.parallel {
            format!("{} ", entry.name)
        } else {
            String::new()
        }
    }
}

struct Bar {
    bar: ProgressBar,
    /// Prefix of the stage's own lines when stderr is not a terminal.
    prefix: Option<String>,
    name: String,
    /// When the position was last printed as a line; `None` under `--quiet`.
    last_plain: Option<Mutex<Instant>>,
}

impl Progress for Bar {
    fn set_length(&self, length: u64) {
        self.bar.set_length(length);
        self.bar.set_style(
            ProgressStyle::with_template("  {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
    }
    fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        if let Some(last) = &self.last_plain
            && self.bar.is_hidden()
        {
            let mut last = last.lock().expect("progress lock");
            if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                *last = Instant::now();
                let length = self
                    .bar
                    .length()
                    .map_or_else(String::new, |l| format!("/{l}"));
                eprintln!("  {}: {position}{length} {}", self.name, self.bar.message());
            }
        }
    }
    fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }
    fn println(&self, line: &str) {
        // A hidden bar (stderr is not a terminal) drops its printed lines; warnings must not be.
        if self.bar.is_hidden() {
            match &self.prefix {
                Some(prefix) => eprintln!("{prefix}{line}"),
                None => eprintln!("{line}"),
            }
        } else {
            self.bar.println(line);
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
        self.line(format!("waiting for {who} to release the store lock..."));
    }

    fn waiting_for_key(&self, entry: &PlanEntry, holder: Option<&str>) {
        let who = holder.unwrap_or("another rudder process");
        self.line(format!(
            "      waiting for {who}, which is building `{}` ({})...",
            entry.name,
            entry.key.short()
        ));
    }

    fn stage_queued(&self, entry: &PlanEntry, detail: &str) {
        self.line(format!(
            "      queued {} ({}): {detail}",
            entry.name, entry.kind
        ));
    }

    fn stage_started(&self, entry: &PlanEntry, position: usize, total: usize) -> Box<dyn Progress> {
        if self.numbered {
            self.line(format!(
                "[{position}/{total}] {} ({})",
                entry.name, entry.kind
            ));
        }
        let bar = self.bars.add(ProgressBar::no_length());
        bar.set_style(
            ProgressStyle::with_template("  {prefix} {spinner} {elapsed} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(entry.name.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(Bar {
            bar,
            prefix: self.parallel.then(|| format!("{}: ", entry.name)),
            name: entry.name.clone(),
            last_plain: (!self.printer.is_quiet()).then(|| Mutex::new(Instant::now())),
        })
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
                if self.numbered {
                    self.line(format!(
                        "      {}done in {seconds:.1}s -> {}{metrics}",
                        self.who(entry),
                        entry.key.short()
                    ));
                } else {
                    // A job's log: the run that submitted it prints the key and metrics.
                    self.line(format!("      done in {seconds:.1}s"));
                }
            }
            Err(_) => self.line(format!(
                "      {}failed after {seconds:.1}s",
                self.who(entry)
            )),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
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

/// A bar of bytes for a push or a pull, on stderr when it is a terminal.
pub struct TransferBar {
    bar: ProgressBar,
}

impl TransferBar {
    pub fn new(printer: Printer, prefix: &str) -> Self {
        let target = if printer.is_quiet() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ({eta}) {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_owned());
        TransferBar { bar }
    }
}

impl Progress for TransferBar {
    fn set_length(&self, length: u64) {
        self.bar.set_length(length);
    }
    fn set_position(&self, position: u64) {
        // Transfers run at once and report out of order: the bar only moves forward.
        if position > self.bar.position() {
            self.bar.set_position(position);
        }
    }
    fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }
    fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Drop for TransferBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
