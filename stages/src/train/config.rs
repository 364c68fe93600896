//! The loop's settings from a recipe's [`TrainArgs`]: the optimiser's and the schedule's by
//! `From`, the whole [`TrainConfig`] with the stage's learning rate, seed and checkpoints.

use std::path::Path;

use rudder_schema::kinds::{LrSchedulerType, TrainArgs};

use super::{AdamWConfig, Checkpointing, Schedule, ScheduleKind, TrainConfig};

impl From<&TrainArgs> for AdamWConfig {
    fn from(args: &TrainArgs) -> Self {
        Self {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            epsilon: args.adam_epsilon,
            weight_decay: args.weight_decay,
        }
    }
}

impl From<LrSchedulerType> for ScheduleKind {
    fn from(kind: LrSchedulerType) -> Self {
        match kind {
            LrSchedulerType::Constant => ScheduleKind::Constant,
            LrSchedulerType::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
            LrSchedulerType::Linear => ScheduleKind::Linear,
            LrSchedulerType::Cosine => ScheduleKind::Cosine,
        }
    }
}

impl Schedule {
    /// The recipe's schedule from `learning_rate` over `total` steps.
    pub fn from_args(args: &TrainArgs, learning_rate: f64, total: u64) -> Self {
        Schedule::new(
            args.lr_scheduler_type.into(),
            learning_rate,
            args.warmup_steps,
            args.warmup_ratio,
            total,
        )
    }
}

impl TrainConfig {
    /// The loop's settings for a stage; checkpoints go under `work_dir` (every
    /// `checkpoint_every` steps, and whenever the run is interrupted) when it is given.
    pub fn new(learning_rate: f64, args: &TrainArgs, seed: u64, work_dir: Option<&Path>) -> Self {
        Self {
            learning_rate,
            batch_size: args.batch_size as usize,
            epochs: u64::from(args.epochs),
            max_steps: args.max_steps,
            gradient_accumulation_steps: args.gradient_accumulation_steps as usize,
            adamw: args.into(),
            schedule: args.lr_scheduler_type.into(),
            warmup_steps: args.warmup_steps,
            warmup_ratio: args.warmup_ratio,
            max_grad_norm: args.max_grad_norm,
            shuffle: args.shuffle,
            group_by_length: args.group_by_length,
            seed,
            logging_steps: args.logging_steps,
            report_to: args.report_to.clone(),
            checkpoint: work_dir.map(|dir| Checkpointing {
                dir: dir.join("checkpoint"),
                every: args.checkpoint_every,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_args_map_onto_the_loop() {
        let args = TrainArgs {
            lr_scheduler_type: LrSchedulerType::Cosine,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            ..TrainArgs::default()
        };
        let cfg = TrainConfig::new(3e-4, &args, 9, Some(Path::new("/w")));
        assert_eq!(cfg.learning_rate, 3e-4);
        assert_eq!(cfg.schedule, ScheduleKind::Cosine);
        assert_eq!(cfg.warmup_ratio, 0.1);
        assert_eq!(cfg.adamw.weight_decay, 0.01);
        assert_eq!(cfg.batch_size, args.batch_size as usize);
        assert_eq!(cfg.max_grad_norm, args.max_grad_norm);
        assert_eq!(cfg.seed, 9);
        assert!(cfg.shuffle);
        let ck = cfg.checkpoint.unwrap();
        assert_eq!(ck.dir, Path::new("/w/checkpoint"));
        assert_eq!(ck.every, args.checkpoint_every);
    }
}
