//! The loop's hooks for a stage the engine runs: a progress bar (loss, tokens/s) and Ctrl-C.

use std::time::Instant;

use rudder_engine::runner::Progress;

use super::{Hooks, StepRecord};

/// Progress bar (loss, tokens/s) and interruption for the loop.
pub struct StageHooks<'a> {
    progress: &'a dyn Progress,
    interrupted: &'a dyn Fn() -> bool,
    /// When the first step finished, and the tokens counted by then: throughput excludes
    /// start-up (loading, tokenisation, the first step's compilation of kernels).
    first: Option<(Instant, f64)>,
}

impl<'a> StageHooks<'a> {
    pub fn new(progress: &'a dyn Progress, interrupted: &'a dyn Fn() -> bool) -> Self {
        Self {
            progress,
            interrupted,
            first: None,
        }
    }
}

impl Hooks for StageHooks<'_> {
    fn on_step(&mut self, record: &StepRecord, total_steps: u64) {
        if record.step == 1 {
            self.progress.set_length(total_steps);
        }
        self.progress.set_position(record.step);
        let tokens = record.metrics.get("num_tokens").copied();
        let mut message = format!("loss {:.4}", record.loss);
        match (self.first, tokens) {
            (None, Some(t)) => self.first = Some((Instant::now(), t)),
            (Some((since, before)), Some(t)) => {
                let seconds = since.elapsed().as_secs_f64();
                if seconds > 0.0 {
                    message.push_str(&format!(", {:.0} tokens/s", (t - before) / seconds));
                }
            }
            _ => {}
        }
        self.progress.set_message(message);
    }

    fn interrupted(&self) -> bool {
        (self.interrupted)()
    }
}
