//! Kahneman-Tversky optimisation (the `kto` stage kind) on unpaired `prompt`/`completion`/`label`
//! rows, or on paired data unpaired into its chosen (desirable) and rejected (undesirable)
//! completions, as TRL 1.16's `KTOTrainer` computes it. The KL estimate uses mismatched rows
//! (each prompt with the previous row's completion) run through the policy without a graph; the
//! reference's values for both come from the `kto/ref_logps` part, computed once.
//!
//! Metrics use TRL's names: `kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `logps/chosen`, `logps/rejected` (over the desirable and undesirable rows of each batch).

use burn::module::Module;
use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{KtoParams, REF_LOGPS_PART};

use crate::artifacts::save_trained_model;
use crate::kind::{Stage, StageKind};
use crate::logps::{CompletionBatch, PromptCompletion, completion_logps, vector};
use crate::losses::{KtoLossConfig, kto_kl, kto_loss, kto_metrics, kto_uses_kl};
use crate::model::CausalLm;
use crate::padding::Pad;
use crate::preference::{TokenizedPairs, UnpairedRow, reference, tokenize_unpaired};
use crate::train::{Forward, MetricValue, Objective, TrainError};

pub struct Kto;

impl StageKind for Kto {
    type Params = KtoParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, KtoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let policy = stage.inputs.model("model")?;
        let examples = stage.inputs.rows("data")?.unpaired_examples()?;
        let (rows, dropped) = tokenize_unpaired(&policy.tokenizer, &examples, &p.tokens)?;
        if dropped > 0 {
            stage.progress().println(&format!(
                "warning: {dropped} of {} examples have no completion token left after \
                 truncation to max_length {} and are skipped",
                examples.len(),
                p.tokens.max_length
            ));
        }
        if rows.is_empty() {
            return Err(TrainError::NoData(
                ": every row was truncated to nothing; raise max_length".into(),
            ));
        }
        let pairs: Vec<_> = rows.iter().map(UnpairedRow::as_pair).collect();
        let cached = reference::load_for(&stage.inputs.artifact(REF_LOGPS_PART)?, &pairs)?;
        let examples: Vec<KtoExample> = rows
            .into_iter()
            .zip(cached)
            .map(|(row, (values, kl))| KtoExample {
                row,
                reference: values.iter().sum(),
                reference_kl: kl.iter().sum(),
            })
            .collect();
        let objective = KtoObjective {
            pad: stage.pad(policy.tokenizer.pad_id().unwrap_or(0)),
            loss: KtoLossConfig::from(p),
        };
        let cfg = stage.train_config(p.learning_rate, &p.train);
        let (config, model) = stage.trainable_lm(&policy.dir, &p.train, device)?;
        let (trained, report) = stage.fit(&objective, model, &examples, &cfg, device)?;
        save_trained_model(
            stage.out_dir(),
            &trained,
            &config.saved_as(p.train.save_dtype),
            &policy.tokenizer,
            p.train.lora.as_ref(),
        )?;
        let mut summary = report.summary();
        summary.insert("examples".into(), examples.len() as f64);
        summary.insert("dropped".into(), dropped as f64);
        Ok(StageOutcome { summary })
    }
}

/// The `kto/ref_logps` part: the reference's log-probs of every row and of its KL row, cached
/// in the two slots a pair's chosen and rejected use.
pub struct KtoRefLogps;

impl StageKind for KtoRefLogps {
    type Params = KtoParams;
    const PART: Option<&'static str> = Some(REF_LOGPS_PART);
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, KtoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let tokens = &stage.params.tokens;
        reference::run_part(
            stage,
            tokens,
            |tokenizer, rows| {
                let (rows, dropped) =
                    tokenize_unpaired(tokenizer, &rows.unpaired_examples()?, tokens)?;
                Ok(TokenizedPairs {
                    pairs: rows.iter().map(UnpairedRow::as_pair).collect(),
                    dropped,
                })
            },
            &device.clone().inner(),
        )
    }
}

/// A tokenised row with the reference's sequence log-probs of it and of its KL row.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    pub row: UnpairedRow,
    pub reference: f32,
    pub reference_kl: f32,
}

/// The KTO objective.
pub struct KtoObjective {
    pub pad: Pad,
    pub loss: KtoLossConfig,
}

impl Objective for KtoObjective {
    type Model = CausalLm;
    type Example = KtoExample;

    fn length(&self, example: &KtoExample) -> usize {
        example.row.sequence.len().max(example.row.kl.len())
    }

    fn weight(&self, examples: &[&KtoExample]) -> f64 {
        examples.len() as f64
    }

    fn forward(
        &self,
        model: &CausalLm,
        examples: &[&KtoExample],
        device: &Device,
    ) -> Result<Forward, TrainError> {
        let rows: Vec<&PromptCompletion> = examples.iter().map(|e| &e.row.sequence).collect();
        let batch = CompletionBatch::new(&rows, self.pad, device);
        let policy = completion_logps(model, &batch).sums();
        let reference = vector(examples.iter().map(|e| e.reference).collect(), device);
        let desirable: Vec<bool> = examples.iter().map(|e| e.row.desirable).collect();
        // The KL estimate carries no gradient (TRL computes it under no_grad).
        let kl = kto_uses_kl(self.loss.loss_type).then(|| {
            let inner = model.valid();
            let kl_rows: Vec<&PromptCompletion> = examples.iter().map(|e| &e.row.kl).collect();
            let kl_batch = CompletionBatch::new(&kl_rows, self.pad, &inner.device());
            let policy_kl =
                crate::backend::lift(completion_logps(&inner, &kl_batch).sums(), &policy);
            let reference_kl = vector(examples.iter().map(|e| e.reference_kl).collect(), device);
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
