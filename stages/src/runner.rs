//! What the stage kinds share when the engine runs them: reading the stage's inputs (model
//! directories with their tokenizers, datasets with their format and column renames), turning the
//! recipe's `TrainArgs` into the loop's settings, reporting progress and honouring Ctrl-C, and
//! [`register`], which adds this crate's runners to the engine's registry. The per-kind logic
//! stays in each kind's module.

use std::path::{Path, PathBuf};

use rudder_engine::Registry;
use rudder_engine::runner::{InputKind, StageContext, StageInput};
use rudder_schema::kinds::{LrSchedulerType, TrainArgs};

use crate::backend::BackendKind;
use crate::data::{Format, Rows, read_rows};
use crate::tokenizer::Tokenizer;
use burn::tensor::backend::AutodiffBackend;

use crate::model::{CausalLm, ModelConfig, save_causal_lm};
use crate::train::{
    AdamWConfig, Checkpointing, Hooks, MetricsWriter, Objective, ScheduleKind, StepRecord,
    TrainConfig, TrainError, TrainReport, train,
};

/// The metrics file every training artifact holds.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Adds the runners of every stage kind built on Burn (and of their internal parts) to
/// `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(crate::tokenizer_stage::TokenizerRunner);
    registry.register(crate::pretrain::PretrainRunner);
    registry.register(crate::sft::SftRunner);
    registry.register(crate::reward::RewardRunner);
    registry.register(crate::generate_stage::GenerateRunner);
    registry.register(crate::evaluate::EvaluateRunner);
    registry.register(crate::export_stage::ExportRunner);
    registry.register(crate::dpo::DpoRunner);
    registry.register(crate::cpo::OrpoRunner);
    registry.register(crate::cpo::SimpoRunner);
    registry.register(crate::kto::KtoRunner);
    registry.register(crate::ref_logps::RefLogpsRunner {
        kind: "kto/ref_logps",
    });
    registry.register(crate::ref_logps::RefLogpsRunner {
        kind: "dpo/ref_logps",
    });
    registry.register(crate::iterative_dpo::IterativeDpoRunner {
        kind: "iterative_dpo/round",
    });
    registry.register(crate::iterative_dpo::IterativeDpoRunner {
        kind: "iterative_dpo",
    });
    registry.register(crate::constitutional::ConstitutionalRunner);
    registry.register(crate::ppo::PpoRunner);
    registry.register(crate::rl::group::RlooRunner);
    registry.register(crate::rl::group::GrpoRunner);
}

/// The loop's settings from a recipe's training arguments; checkpoints go under `work_dir`
/// (every `checkpoint_every` steps, and whenever the run is interrupted).
pub fn train_config(
    learning_rate: f64,
    args: &TrainArgs,
    seed: u64,
    work_dir: Option<&Path>,
) -> TrainConfig {
    TrainConfig {
        learning_rate,
        batch_size: args.batch_size as usize,
        epochs: u64::from(args.epochs),
        max_steps: args.max_steps,
        gradient_accumulation_steps: args.gradient_accumulation_steps as usize,
        adamw: AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            epsilon: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
        schedule: match args.lr_scheduler_type {
            LrSchedulerType::Constant => ScheduleKind::Constant,
            LrSchedulerType::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
            LrSchedulerType::Linear => ScheduleKind::Linear,
            LrSchedulerType::Cosine => ScheduleKind::Cosine,
        },
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

/// Trains a causal LM with `objective` (progress, Ctrl-C and checkpoints through the stage's
/// context, `metrics.jsonl` into its output) and saves it there as a Hugging Face directory.
pub fn train_causal_lm<B, O>(
    ctx: &StageContext<'_>,
    model: CausalLm<B>,
    model_cfg: &ModelConfig,
    objective: &O,
    examples: &[O::Example],
    cfg: &TrainConfig,
    device: &B::Device,
) -> Result<TrainReport, TrainError>
where
    B: AutodiffBackend,
    O: Objective<B, Model = CausalLm<B>>,
{
    let mut writer = MetricsWriter::create(&ctx.out_dir.join(METRICS_FILE), cfg.logging_steps)?
        .report_to(&cfg.report_to)?;
    let (model, report) = train(
        objective,
        model,
        examples,
        cfg,
        device,
        Some(&mut writer),
        &mut StageHooks::new(ctx),
    )?;
    save_causal_lm(&model, model_cfg, ctx.out_dir)?;
    Ok(report)
}

/// The stage's typed parameters.
pub fn params<'a, T: 'static>(ctx: &'a StageContext<'_>) -> Result<&'a T, TrainError> {
    ctx.params::<T>().ok_or_else(|| {
        TrainError::Input(format!(
            "the parameters of `{}` are not those of kind `{}`",
            ctx.name, ctx.kind
        ))
    })
}

/// The input bound to `role`.
pub fn input<'a>(ctx: &'a StageContext<'_>, role: &str) -> Result<&'a StageInput, TrainError> {
    ctx.input(role)
        .ok_or_else(|| TrainError::Input(format!("the stage has no `{role}` input")))
}

/// The directory of the `model` input: a Hugging Face directory or an earlier stage's model.
pub fn model_dir(ctx: &StageContext<'_>) -> Result<PathBuf, TrainError> {
    model_dir_of(ctx, "model")
}

/// The directory of the model bound to `role`.
pub fn model_dir_of(ctx: &StageContext<'_>, role: &str) -> Result<PathBuf, TrainError> {
    let model = input(ctx, role)?;
    match (&model.kind, &model.path) {
        (InputKind::FreshModel { .. }, _) => Err(TrainError::Input(format!(
            "model `{}` is a fresh architecture with no weights; train it with a `pretrain` stage first",
            model.node
        ))),
        (_, Some(path)) if path.is_dir() => Ok(path.clone()),
        (_, Some(path)) => Err(TrainError::Input(format!(
            "model `{}`: {} is not a model directory",
            model.node,
            path.display()
        ))),
        (_, None) => Err(TrainError::Input(format!(
            "model `{}` has no directory",
            model.node
        ))),
    }
}

/// The tokenizer stored beside the model's weights.
pub fn model_tokenizer(dir: &Path) -> Result<Tokenizer, TrainError> {
    if !dir.join("tokenizer.json").is_file() {
        return Err(TrainError::Input(format!(
            "no tokenizer.json in model directory {}; a model used for training needs its tokenizer",
            dir.display()
        )));
    }
    Ok(Tokenizer::from_dir(dir)?)
}

/// The tokenizer stored beside a model's weights, checked against the model's vocabulary.
pub fn checked_tokenizer(dir: &Path) -> Result<Tokenizer, TrainError> {
    let tokenizer = model_tokenizer(dir)?;
    check_vocab(dir, &tokenizer)?;
    Ok(tokenizer)
}

/// The `model` input's directory and its checked tokenizer.
pub fn model_with_tokenizer(ctx: &StageContext<'_>) -> Result<(PathBuf, Tokenizer), TrainError> {
    let dir = model_dir(ctx)?;
    let tokenizer = checked_tokenizer(&dir)?;
    Ok((dir, tokenizer))
}

/// Refuses a tokenizer whose ids do not fit the model's embedding table.
pub fn check_vocab(dir: &Path, tokenizer: &Tokenizer) -> Result<(), TrainError> {
    let cfg = crate::model::load_config(dir)?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(TrainError::Input(format!(
            "the tokenizer in {} has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// The rows of the `data` input, read with its declared format and column renames.
pub fn data_rows(ctx: &StageContext<'_>) -> Result<Rows, TrainError> {
    let data = input(ctx, "data")?;
    let path = data
        .path
        .as_ref()
        .ok_or_else(|| TrainError::Input(format!("data `{}` has no file", data.node)))?;
    let (format, columns) = match &data.kind {
        InputKind::Dataset { format, columns } => {
            (Format::from_name(format.as_str()), columns.clone())
        }
        _ => {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            (
                Format::from_name(&ext.to_ascii_lowercase()),
                Default::default(),
            )
        }
    };
    let format = format.ok_or_else(|| {
        TrainError::Input(format!(
            "data `{}`: cannot tell the format of {} (expected jsonl, json, parquet or txt)",
            data.node,
            path.display()
        ))
    })?;
    let rows = read_rows(path, format, &columns)?;
    if rows.rows.is_empty() {
        return Err(TrainError::NoData(format!(" in {}", path.display())));
    }
    Ok(rows)
}

/// The compute backend the recipe asks for.
pub fn backend(ctx: &StageContext<'_>) -> Result<BackendKind, TrainError> {
    Ok(ctx.backend.as_str().parse::<BackendKind>()?)
}

/// Progress bar (loss, tokens/s, ETA) and interruption for the loop.
pub struct StageHooks<'a, 'b> {
    ctx: &'a StageContext<'b>,
    /// When the first step finished, and the tokens counted by then: throughput excludes
    /// start-up (loading, tokenisation, the first step's compilation of kernels).
    first: Option<(std::time::Instant, f64)>,
}

impl<'a, 'b> StageHooks<'a, 'b> {
    pub fn new(ctx: &'a StageContext<'b>) -> Self {
        Self { ctx, first: None }
    }
}

impl Hooks for StageHooks<'_, '_> {
    fn on_step(&mut self, record: &StepRecord, total_steps: u64) {
        if record.step == 1 {
            self.ctx.progress.set_length(total_steps);
        }
        self.ctx.progress.set_position(record.step);
        let tokens = record.metrics.get("num_tokens").copied();
        let mut message = format!("loss {:.4}", record.loss);
        match (self.first, tokens) {
            (None, Some(t)) => self.first = Some((std::time::Instant::now(), t)),
            (Some((since, before)), Some(t)) => {
                let seconds = since.elapsed().as_secs_f64();
                if seconds > 0.0 {
                    message.push_str(&format!(", {:.0} tokens/s", (t - before) / seconds));
                }
            }
            _ => {}
        }
        self.ctx.progress.set_message(message);
    }

    fn interrupted(&self) -> bool {
        self.ctx.is_interrupted()
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
        let cfg = train_config(3e-4, &args, 9, Some(Path::new("/w")));
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
