//! Direct preference optimisation (`dpo`) with every TRL 1.16 loss type, MPO mixes,
//! f-divergences, LD-DPO and WPO (the objective is `preference::dpo`'s). The frozen
//! reference's log-probs come from the stage's `ref_logps` part, computed once and cached; with
//! `sync_ref_model` (TR-DPO) the reference moves during training and is run on every batch.
//! The artifact is the model directory with its tokenizer and `metrics.jsonl`.

use std::cell::RefCell;

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{DpoParams, REF_LOGPS_PART};

use crate::artifacts::save_trained_model;
use crate::inputs::check_vocab;
use crate::kind::{Stage, StageKind};
use crate::losses::DpoLossConfig;
use crate::model::load_causal_lm;
use crate::preference::{DpoExample, DpoObjective, SyncedReferenceDpo, reference, tokenize_pairs};
use crate::train::TrainError;

pub struct Dpo;

impl StageKind for Dpo {
    type Params = DpoParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, DpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let policy = stage.inputs.model("model")?;
        let pairs = stage.inputs.rows("data")?.preference_pairs()?;
        let tokenized = tokenize_pairs(&policy.tokenizer, &pairs, &p.tokens)?;
        if let Some(warning) = tokenized.warning(&p.tokens) {
            stage.progress().println(&warning);
        }
        if tokenized.pairs.is_empty() {
            return Err(TrainError::NoData(
                ": every pair was truncated to nothing; raise max_length".into(),
            ));
        }
        let objective = DpoObjective {
            pad: stage.pad(policy.tokenizer.pad_id().unwrap_or(0)),
            loss: DpoLossConfig::new(&p.loss, p.loss.beta),
            ld_alpha: p.loss.ld_alpha,
            use_weighting: p.loss.use_weighting,
        };
        let cfg = stage.train_config(p.learning_rate, &p.train);
        let pairs = tokenized.pairs.len();
        let (config, (trained, report)) = if p.sync_ref_model {
            // TR-DPO: the reference moves towards the policy, so it is run on every batch.
            let reference_dir = stage.inputs.model_dir("reference")?;
            check_vocab(&reference_dir, &policy.tokenizer)?;
            let (config, model) = load_causal_lm(&policy.dir, device)?;
            let (_, reference) = load_causal_lm(&reference_dir, &device.clone().inner())?;
            let objective = SyncedReferenceDpo {
                base: objective,
                reference: RefCell::new(reference),
                mixup_alpha: p.ref_model_mixup_alpha,
                sync_steps: p.ref_model_sync_steps,
            };
            (
                config,
                stage.fit(&objective, model, &tokenized.pairs, &cfg, device)?,
            )
        } else {
            let cached =
                reference::load_for(&stage.inputs.artifact(REF_LOGPS_PART)?, &tokenized.pairs)?;
            let examples: Vec<DpoExample> = tokenized
                .pairs
                .into_iter()
                .zip(cached)
                .map(
                    |(pair, (reference_chosen, reference_rejected))| DpoExample {
                        pair,
                        reference_chosen,
                        reference_rejected,
                    },
                )
                .collect();
            let (config, model) = stage.trainable_lm(&policy.dir, &p.train, device)?;
            (
                config,
                stage.fit(&objective, model, &examples, &cfg, device)?,
            )
        };
        save_trained_model(
            stage.out_dir(),
            &trained,
            &config.saved_as(p.train.save_dtype),
            &policy.tokenizer,
            p.train.lora.as_ref(),
        )?;
        let mut summary = report.summary();
        summary.insert("pairs".into(), pairs as f64);
        summary.insert("dropped".into(), tokenized.dropped as f64);
        Ok(StageOutcome { summary })
    }
}

/// The `dpo/ref_logps` part: the frozen reference's log-probs of every pair, computed once.
pub struct DpoRefLogps;

impl StageKind for DpoRefLogps {
    type Params = DpoParams;
    const PART: Option<&'static str> = Some(REF_LOGPS_PART);
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, DpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let tokens = &stage.params.tokens;
        reference::run_part(
            stage,
            tokens,
            |tokenizer, rows| tokenize_pairs(tokenizer, &rows.preference_pairs()?, tokens),
            &device.clone().inner(),
        )
    }
}
