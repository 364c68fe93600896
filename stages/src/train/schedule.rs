//! Learning-rate schedules as the Hugging Face Trainer's `get_scheduler` computes them: a factor
//! of the base rate from the number of updates already applied (0 for the first update). Written
//! by hand because Burn's schedulers reject a rate of exactly 0, which warm-up starts from.

use std::f64::consts::PI;

/// The shape of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

/// A schedule over `total_steps` updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_steps` wins when positive; otherwise `ceil(warmup_ratio * total_steps)`, as
    /// `TrainingArguments.get_warmup_steps` does.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup_steps: u64,
        warmup_ratio: f64,
        total_steps: u64,
    ) -> Self {
        let warmup_steps = if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as u64
        };
        Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of the update that follows `step` earlier updates.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        let warm = s / w.max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup if warming => warm,
            ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear if warming => warm,
            ScheduleKind::Linear => (0f64).max((t - s) / (t - w).max(1.0)),
            ScheduleKind::Cosine if warming => warm,
            ScheduleKind::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 down to 0.
                let progress = (s - w) / (t - w).max(1.0);
                (0f64).max(0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs(kind: ScheduleKind, warmup: u64, ratio: f64, total: u64) -> Vec<f64> {
        let s = Schedule::new(kind, 1.0, warmup, ratio, total);
        (0..total).map(|k| s.lr(k)).collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn constant_ignores_warmup() {
        close(&lrs(ScheduleKind::Constant, 2, 0.0, 4), &[1.0; 4]);
    }

    #[test]
    fn constant_with_warmup_starts_at_zero() {
        close(
            &lrs(ScheduleKind::ConstantWithWarmup, 2, 0.0, 4),
            &[0.0, 0.5, 1.0, 1.0],
        );
    }

    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        // get_linear_schedule_with_warmup(opt, 2, 6): 0, .5, 1, .75, .5, .25
        close(
            &lrs(ScheduleKind::Linear, 2, 0.0, 6),
            &[0.0, 0.5, 1.0, 0.75, 0.5, 0.25],
        );
    }

    #[test]
    fn cosine_follows_half_a_period() {
        // get_cosine_schedule_with_warmup(opt, 1, 5): 0, 1, cos^2 steps 0.8536, 0.5, 0.1464
        let expect = [
            0.0,
            1.0,
            0.5 * (1.0 + (PI * 0.25).cos()),
            0.5,
            0.5 * (1.0 + (PI * 0.75).cos()),
        ];
        close(&lrs(ScheduleKind::Cosine, 1, 0.0, 5), &expect);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 0, 0.1, 15);
        assert_eq!(s.warmup_steps, 2);
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 3, 0.5, 15);
        assert_eq!(s.warmup_steps, 3);
    }
}
