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
    /// The first step's compile time, while it is still to be reported (GPU backends only).
    compile_time: Option<CompileTime>,
}

/// Reports, once `STEADY_STEPS` steps have followed the first one a run takes (a resumed run
/// counts from its own first), the first step's time beyond theirs: kernel compilation and
/// autotuning on GPU backends, with anything else the first step does once.
pub struct CompileTime {
    started: Instant,
    steps: u64,
    first: f64,
}

/// Steps after the first whose mean time the first is compared with.
const STEADY_STEPS: u64 = 2;

impl CompileTime {
    /// From now (or from [`CompileTime::restart`], where the loop starts), on a backend that
    /// compiles kernels (`None` on `cpu`).
    pub fn on(device: &burn::tensor::Device) -> Option<Self> {
        (!crate::backend::is_cpu(device)).then(|| Self {
            started: Instant::now(),
            steps: 0,
            first: 0.0,
        })
    }

    /// Starts the clock again: the loop starts now (after loading and resuming).
    pub fn restart(&mut self) {
        self.started = Instant::now();
    }

    /// After each step: `true` once the line is printed (the report is then done).
    pub fn step_done(&mut self, progress: &dyn Progress) -> bool {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.steps += 1;
        if self.steps == 1 {
            self.first = elapsed;
            return false;
        }
        if self.steps < 1 + STEADY_STEPS {
            return false;
        }
        let per_step = (elapsed - self.first) / STEADY_STEPS as f64;
        progress.println(&format!(
            "first step {:.2} s, then {per_step:.3} s/step: {:.2} s of kernel compilation and autotuning",
            self.first,
            (self.first - per_step).max(0.0)
        ));
        true
    }
}

impl<'a> StageHooks<'a> {
    /// `compile_time`: where the backend compiles and tunes kernels for new shapes (the GPU
    /// backends, [`CompileTime::on`]), the first step's time is reported apart.
    pub fn new(
        progress: &'a dyn Progress,
        interrupted: &'a dyn Fn() -> bool,
        compile_time: Option<CompileTime>,
    ) -> Self {
        Self {
            progress,
            interrupted,
            first: None,
            compile_time,
        }
    }
}

impl Hooks for StageHooks<'_> {
    fn on_start(&mut self) {
        if let Some(compile_time) = &mut self.compile_time {
            compile_time.restart();
        }
    }

    fn on_step(&mut self, record: &StepRecord, total_steps: u64) {
        if record.step == 1 {
            self.progress.set_length(total_steps);
        }
        if let Some(compile_time) = &mut self.compile_time
            && compile_time.step_done(self.progress)
        {
            self.compile_time = None;
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

    /// Steps `from..from + n` through the hooks; the lines printed.
    fn steps(compiles_kernels: bool, from: u64, n: u64) -> Vec<String> {
        let lines = Lines::default();
        let never = || false;
        let compile_time = compiles_kernels.then(|| CompileTime {
            started: Instant::now(),
            steps: 0,
            first: 0.0,
        });
        let mut hooks = StageHooks::new(&lines, &never, compile_time);
        for step in from..from + n {
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
        let lines = steps(true, 1, 6);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("first step "), "{lines:?}");
        assert!(lines[0].contains("kernel compilation"), "{lines:?}");
        // A resumed run counts from its own first step.
        assert_eq!(steps(true, 5, 3).len(), 1);
        // Too few steps to compare with: nothing.
        assert!(steps(true, 1, 2).is_empty());
        // `cpu` compiles nothing.
        assert!(steps(false, 1, 6).is_empty());
    }
}
