//! Kahneman-Tversky optimisation (the `kto` stage kind) on unpaired `prompt`/`completion`/`label`
//! rows, or on paired data unpaired into its chosen (desirable) and rejected (undesirable)
//! completions, as TRL 1.16's `KTOTrainer` computes it. The KL estimate uses mismatched rows
//! (each prompt with the previous row's completion) run through the policy without a graph; the
//! reference's values for both come from the `kto/ref_logps` part, computed once.
//!
//! Metrics use TRL's names: `kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `logps/chosen`, `logps/rejected` (over the desirable and undesirable rows of each batch).

use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::KtoParams;

use crate::backend::{AutodiffTask, dispatch_autodiff};
use crate::logps::{CompletionBatch, PromptCompletion, completion_logps, vector};
use crate::model::{CausalLm, load_causal_lm};
use crate::preference::loss::{KtoLossConfig, kto_kl, kto_loss, kto_metrics, kto_uses_kl};
use crate::preference_data::{REF_LOGPS_FILE, RefLogps, UnpairedRow, tokenize_unpaired};
use crate::runner::{self};
use crate::train::{Forward, MetricValue, Objective, TrainConfig, TrainError, TrainReport};

/// A tokenised row with the reference's sequence log-probs of it and of its KL row.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    pub row: UnpairedRow,
    pub reference: f32,
    pub reference_kl: f32,
}

/// The KTO objective.
pub struct KtoObjective {
    pub pad_id: u32,
    pub loss: KtoLossConfig,
}

impl<B: AutodiffBackend> Objective<B> for KtoObjective
where
    CausalLm<B>: AutodiffModule<B, InnerModule = CausalLm<B::InnerBackend>>,
{
    type Model = CausalLm<B>;
    type Example = KtoExample;

    fn length(&self, example: &KtoExample) -> usize {
        example.row.sequence.len().max(example.row.kl.len())
    }

    fn weight(&self, examples: &[&KtoExample]) -> f64 {
        examples.len() as f64
    }

    fn forward(
        &self,
        model: &CausalLm<B>,
        examples: &[&KtoExample],
        device: &B::Device,
    ) -> Result<Forward<B>, TrainError> {
        let rows: Vec<&PromptCompletion> = examples.iter().map(|e| &e.row.sequence).collect();
        let batch = CompletionBatch::<B>::new(&rows, self.pad_id, device);
        let policy = completion_logps(model, &batch).sums();
        let reference = vector::<B>(examples.iter().map(|e| e.reference).collect(), device);
        let desirable: Vec<bool> = examples.iter().map(|e| e.row.desirable).collect();
        // The KL estimate carries no gradient (TRL computes it under no_grad).
        let kl = kto_uses_kl(self.loss.loss_type).then(|| {
            let inner = model.valid();
            let kl_rows: Vec<&PromptCompletion> = examples.iter().map(|e| &e.row.kl).collect();
            let kl_batch = CompletionBatch::<B::InnerBackend>::new(&kl_rows, self.pad_id, device);
            let policy_kl = Tensor::<B, 1>::from_inner(completion_logps(&inner, &kl_batch).sums());
            let reference_kl =
                vector::<B>(examples.iter().map(|e| e.reference_kl).collect(), device);
            kto_kl(policy_kl, reference_kl)
        });
        let losses = kto_loss(
            policy.clone(),
            reference,
            &desirable,
            kl.clone(),
            &self.loss,
        );
        let mut metrics: Vec<MetricValue> =
            kto_metrics(losses.rewards.clone(), policy, &desirable, kl)
                .into_iter()
                .map(|(name, value)| MetricValue::mean(name, value, 1.0))
                .collect();
        let real_tokens: usize = rows.iter().map(|r| r.len()).sum();
        metrics.push(MetricValue::cumulative("num_tokens", real_tokens as f64));
        Ok(Forward {
            loss_sum: losses.per_example.sum(),
            metrics,
        })
    }
}

/// Runs `kto` stages.
pub struct KtoRunner;

impl Runner for KtoRunner {
    fn kind(&self) -> &'static str {
        "kto"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_stage(ctx)?)
    }
}

fn run_stage(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<KtoParams>(ctx)?;
    let (dir, tokenizer) = runner::model_with_tokenizer(ctx)?;
    let examples = runner::data_rows(ctx)?.unpaired_examples()?;
    let (rows, dropped) = tokenize_unpaired(&tokenizer, &examples, &params.tokens)?;
    if dropped > 0 {
        ctx.progress.println(&format!(
            "warning: {dropped} of {} examples have no completion token left after truncation \
             to max_length {} and are skipped",
            examples.len(),
            params.tokens.max_length
        ));
    }
    if rows.is_empty() {
        return Err(TrainError::NoData(
            ": every row was truncated to nothing; raise max_length".into(),
        ));
    }
    let cache_path = runner::input(ctx, "ref_logps")?
        .path
        .as_ref()
        .map(|p| p.join(REF_LOGPS_FILE))
        .ok_or_else(|| TrainError::Input("the reference log-probs have no artifact".into()))?;
    let pairs: Vec<_> = rows.iter().map(UnpairedRow::as_pair).collect();
    let reference = RefLogps::load(&cache_path)?
        .for_pairs(&pairs)
        .map_err(TrainError::Input)?;
    let examples: Vec<KtoExample> = rows
        .into_iter()
        .zip(reference)
        .map(|(row, (values, kl))| KtoExample {
            row,
            reference: values.iter().sum(),
            reference_kl: kl.iter().sum(),
        })
        .collect();
    let task = KtoTask {
        ctx,
        dir: &dir,
        examples: &examples,
        objective: KtoObjective {
            pad_id: tokenizer.pad_id().unwrap_or(0),
            loss: KtoLossConfig::from(params),
        },
        cfg: runner::train_config(
            params.learning_rate,
            &params.train,
            ctx.seed,
            Some(ctx.work_dir),
        ),
    };
    let report = dispatch_autodiff(runner::backend(ctx)?, task)??;
    tokenizer.save(ctx.out_dir)?;
    let mut summary = report.summary();
    summary.insert("examples".into(), examples.len() as f64);
    summary.insert("dropped".into(), dropped as f64);
    Ok(StageOutcome { summary })
}

struct KtoTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    dir: &'a Path,
    examples: &'a [KtoExample],
    objective: KtoObjective,
    cfg: TrainConfig,
}

impl AutodiffTask for KtoTask<'_, '_> {
    type Output = Result<TrainReport, TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (model_cfg, model) = load_causal_lm::<B>(self.dir, &device)?;
        runner::train_causal_lm(
            self.ctx,
            model,
            &model_cfg,
            &self.objective,
            self.examples,
            &self.cfg,
            &device,
        )
    }
}
