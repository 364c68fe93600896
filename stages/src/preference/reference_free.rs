//! The objective of the reference-free preference kinds, `orpo` and `simpo` (SimPO and CPO with
//! its sigmoid, hinge and IPO losses), as TRL 1.16's experimental CPO and ORPO trainers compute
//! them. Pairs are tokenised exactly as for DPO; chosen and rejected go through the policy in
//! one concatenated forward pass. No reference model.
//!
//! Metrics use TRL's names: `rewards/*` and `logps/*` (from the log-probs the loss uses:
//! averages for SimPO, IPO and ORPO), `nll_loss`, and for ORPO `log_odds_ratio` and
//! `log_odds_chosen`.

use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{PreferenceTokens, TrainArgs};

use super::pairs::{TokenizedPair, tokenize_pairs};
use crate::artifacts::save_trained_model;
use crate::kind::Stage;
use crate::logps::{CompletionBatch, PromptCompletion, completion_logps, token_logps};
use crate::losses::{
    CpoLossConfig, cpo_loss, cpo_uses_average_logps, orpo_loss, pair_metrics, token_mean_nll,
};
use crate::model::CausalLm;
use crate::padding::Pad;
use crate::train::{Forward, MetricValue, Objective, TrainError};

/// Which reference-free loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReferenceFreeLoss {
    /// ORPO with its odds-ratio weight `beta` (TRL's lambda).
    Orpo { beta: f64 },
    /// CPO / SimPO.
    Cpo(CpoLossConfig),
}

/// The objective of `orpo` and `simpo` stages.
pub struct ReferenceFreeObjective {
    pub pad: Pad,
    pub loss: ReferenceFreeLoss,
}

/// Each chosen row as a whole sequence: every token after the first is a target. ORPO's NLL
/// covers the prompt too.
fn whole_sequences(pairs: &[&TokenizedPair]) -> Vec<PromptCompletion> {
    pairs
        .iter()
        .map(|p| {
            let tokens: Vec<u32> = p
                .chosen
                .prompt
                .iter()
                .chain(&p.chosen.completion)
                .copied()
                .collect();
            let (first, rest) = tokens.split_at(tokens.len().min(1));
            PromptCompletion {
                prompt: first.to_vec(),
                completion: rest.to_vec(),
            }
        })
        .collect()
}

impl Objective for ReferenceFreeObjective {
    type Model = CausalLm;
    type Example = TokenizedPair;

    fn length(&self, pair: &TokenizedPair) -> usize {
        pair.padded_length()
    }

    fn weight(&self, pairs: &[&TokenizedPair]) -> f64 {
        pairs.len() as f64
    }

    fn forward(
        &self,
        model: &CausalLm,
        pairs: &[&TokenizedPair],
        device: &Device,
    ) -> Result<Forward, TrainError> {
        let n = pairs.len();
        let rows: Vec<&PromptCompletion> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let batch = CompletionBatch::new(&rows, self.pad, device);
        let out = completion_logps(model, &batch);
        let sums = out.sums();
        let lengths = batch.length_tensor(device);
        let averages = sums.clone() / lengths.clone();
        let split = |t: &Tensor<1>| (t.clone().slice(0..n), t.clone().slice(n..2 * n));
        let completion_nll =
            || token_mean_nll(sums.clone().slice(0..n), lengths.clone().slice(0..n));

        let mut metrics = Vec::new();
        let (loss, chosen_rewards, rejected_rewards, (chosen, rejected), nll) = match self.loss {
            ReferenceFreeLoss::Cpo(config) => {
                let used = if cpo_uses_average_logps(config.loss_type) {
                    split(&averages)
                } else {
                    split(&sums)
                };
                let nll = completion_nll();
                let losses = cpo_loss(used.0.clone(), used.1.clone(), Some(nll.clone()), &config);
                (
                    losses.loss,
                    losses.chosen_rewards,
                    losses.rejected_rewards,
                    used,
                    nll,
                )
            }
            ReferenceFreeLoss::Orpo { beta } => {
                let whole = whole_sequences(pairs);
                let whole: Vec<&PromptCompletion> = whole.iter().collect();
                let chosen_batch = CompletionBatch::new(&whole, self.pad, device);
                let [_, seq, d_model] = out.hidden.dims();
                let width = chosen_batch.padding[0].len().min(seq);
                let hidden = out.hidden.clone().slice([0..n, 0..width, 0..d_model]);
                let whole_sums = token_logps(model, hidden, &chosen_batch, 1.0)
                    .sum_dim(1)
                    .reshape([n]);
                let nll = token_mean_nll(whole_sums, chosen_batch.length_tensor(device));
                let used = split(&averages);
                let losses = orpo_loss(used.0.clone(), used.1.clone(), nll.clone(), beta);
                metrics.push(MetricValue::mean(
                    "log_odds_ratio",
                    losses.log_odds_ratio * n as f64,
                    n as f64,
                ));
                metrics.push(MetricValue::mean(
                    "log_odds_chosen",
                    losses.log_odds_chosen * n as f64,
                    n as f64,
                ));
                (
                    losses.loss,
                    losses.chosen_rewards,
                    losses.rejected_rewards,
                    used,
                    nll,
                )
            }
        };
        let pairs_f = n as f64;
        for (name, mean) in pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected) {
            metrics.push(MetricValue::mean(name, mean * pairs_f, pairs_f));
        }
        let nll: f64 = nll.into_scalar::<f64>();
        metrics.push(MetricValue::mean("nll_loss", nll * pairs_f, pairs_f));
        let real_tokens: usize = rows.iter().map(|r| r.len()).sum();
        metrics.push(MetricValue::cumulative("num_tokens", real_tokens as f64));
        Ok(Forward {
            loss_sum: loss.mul_scalar(pairs_f),
            metrics,
        })
    }
}

/// What `orpo` and `simpo` do: tokenise the pairs as for DPO, train with `loss`, save.
pub fn train<P: rudder_schema::StageSpec>(
    stage: &Stage<'_, P>,
    loss: ReferenceFreeLoss,
    learning_rate: f64,
    tokens: &PreferenceTokens,
    train_args: &TrainArgs,
    device: &Device,
) -> Result<StageOutcome, TrainError> {
    let policy = stage.inputs.model("model")?;
    let pairs = stage.inputs.rows("data")?.preference_pairs()?;
    let tokenized = tokenize_pairs(&policy.tokenizer, &pairs, tokens)?;
    if let Some(warning) = tokenized.warning(tokens) {
        stage.progress().println(&warning);
    }
    if tokenized.pairs.is_empty() {
        return Err(TrainError::NoData(
            ": every pair was truncated to nothing; raise max_length".into(),
        ));
    }
    let objective = ReferenceFreeObjective {
        pad: stage.pad(policy.tokenizer.pad_id().unwrap_or(0)),
        loss,
    };
    let cfg = stage.train_config(learning_rate, train_args);
    let (config, model) = stage.trainable_lm(&policy.dir, train_args, device)?;
    let (trained, report) = stage.fit(&objective, model, &tokenized.pairs, &cfg, device)?;
    save_trained_model(
        stage.out_dir(),
        &trained,
        &config.saved_as(train_args.save_dtype),
        &policy.tokenizer,
        train_args.lora.as_ref(),
    )?;
    let mut summary = report.summary();
    summary.insert("pairs".into(), tokenized.pairs.len() as f64);
    summary.insert("dropped".into(), tokenized.dropped as f64);
    Ok(StageOutcome { summary })
}
