//! The loop's hooks for a stage the engine runs: a progress bar (loss, tokens/s), Ctrl-C, and
//! on GPU backends a line that separates the first step's kernel compilation from step time.

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
    /// When the loop started and how long its first step took, while the compile time is
    /// still to be reported (GPU backends only).
    compile_report: Option<(Instant, Option<f64>)>,
}

/// Steps after the first whose mean time the first is compared with.
const STEADY_STEPS: u64 = 2;

impl<'a> StageHooks<'a> {
    /// `compiles_kernels`: the backend compiles and tunes kernels for new shapes (the GPU
    /// backends), so the first step's time is reported apart.
    pub fn new(
        progress: &'a dyn Progress,
        interrupted: &'a dyn Fn() -> bool,
        compiles_kernels: bool,
    ) -> Self {
        Self {
            progress,
            interrupted,
            first: None,
            compile_report: compiles_kernels.then(|| (Instant::now(), None)),
        }
    }

    /// Once `STEADY_STEPS` steps have followed the first: prints the first step's time beyond
    /// theirs (kernel compilation and autotuning, with anything else the first step does once).
    fn report_compile_time(&mut self, step: u64) {
        let Some((started, first)) = self.compile_report else {
            return;
        };
        let elapsed = started.elapsed().as_secs_f64();
        match first {
            None => self.compile_report = Some((started, Some(elapsed))),
            Some(first) if step == 1 + STEADY_STEPS => {
                let per_step = (elapsed - first) / STEADY_STEPS as f64;
                self.progress.println(&format!(
                    "first step {first:.2} s, then {per_step:.3} s/step: {:.2} s of kernel compilation and autotuning",
                    (first - per_step).max(0.0)
                ));
                self.compile_report = None;
            }
            Some(_) => {}
        }
    }
}

impl Hooks for StageHooks<'_> {
    fn on_step(&mut self, record: &StepRecord, total_steps: u64) {
        if record.step == 1 {
            self.progress.set_length(total_steps);
        }
        self.report_compile_time(record.step);
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl Progress for Lines {
        fn set_length(&self, _: u64) {}
        fn set_position(&self, _: u64) {}
        fn set_message(&self, _: String) {}
        fn println(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_owned());
        }
    }

    fn steps(compiles_kernels: bool, n: u64) -> Vec<String> {
        let lines = Lines::default();
        let never = || false;
        let mut hooks = StageHooks::new(&lines, &never, compiles_kernels);
        for step in 1..=n {
            let record = StepRecord {
                step,
                epoch: 0.0,
                loss: 1.0,
                learning_rate: 1e-3,
                grad_norm: 1.0,
                metrics: Default::default(),
                cumulative: Vec::new(),
            };
            hooks.on_step(&record, n);
        }
        lines.0.into_inner().unwrap()
    }

    #[test]
    fn the_first_steps_compile_time_is_printed_once_on_gpu_backends() {
        let lines = steps(true, 6);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("first step "), "{lines:?}");
        assert!(lines[0].contains("kernel compilation"), "{lines:?}");
        // Too few steps to compare with: nothing.
        assert!(steps(true, 2).is_empty());
        // `cpu` compiles nothing.
        assert!(steps(false, 6).is_empty());
    }
}
