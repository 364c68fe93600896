//! The DPO objective, shared by `dpo` and the rounds of `iterative_dpo`: chosen and rejected
//! completions go through the policy in one concatenated forward pass (`[chosen...;
//! rejected...]`, right-padded); the frozen reference's log-probs come with each pair (cached
//! by a `ref_logps` part), or, for TR-DPO (`sync_ref_model`), from a reference that moves
//! towards the policy and is run on every batch.
//!
//! Metrics use TRL's names: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (strict
//! `>`), `rewards/margins`, `logps/chosen`, `logps/rejected` (means over pairs), `entropy` (over
//! every completion token), `mean_token_accuracy` (over chosen completion tokens) and the
//! running `num_tokens`.

use std::cell::RefCell;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Device;
use burn::tensor::{Tensor, TensorData};

use super::pairs::TokenizedPair;
use crate::logps::{
    CompletionBatch, PromptCompletion, completion_predictions, prediction_stats, sequence_logps,
    vector,
};
use crate::losses::{DpoLossConfig, PairLogps, dpo_loss, ld_logps, wpo_weights};
use crate::model::CausalLm;
use crate::padding::Pad;
use crate::train::{Forward, MetricValue, Objective, TrainError};

/// A tokenised pair with its reference's per-token log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoExample {
    pub pair: TokenizedPair,
    pub reference_chosen: Vec<f32>,
    pub reference_rejected: Vec<f32>,
}

/// The DPO objective.
pub struct DpoObjective {
    pub pad: Pad,
    pub loss: DpoLossConfig,
    pub ld_alpha: Option<f64>,
    pub use_weighting: bool,
}

/// Per-row values, left-aligned and zero-padded into `[rows, longest]` with a 0/1 mask.
fn ragged(rows: &[&[f32]], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let n = rows.len();
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut values = vec![0f32; n * width];
    let mut mask = vec![0f32; n * width];
    for (i, row) in rows.iter().enumerate() {
        values[i * width..i * width + row.len()].copy_from_slice(row);
        mask[i * width..i * width + row.len()].fill(1.0);
    }
    (
        Tensor::from_data(TensorData::new(values, [n, width]), device),
        Tensor::from_data(TensorData::new(mask, [n, width]), device),
    )
}

fn host(t: Tensor<1>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .expect("a float vector")
}

impl Objective for DpoObjective {
    type Model = CausalLm;
    type Example = DpoExample;

    fn length(&self, example: &DpoExample) -> usize {
        example.pair.padded_length()
    }

    fn weight(&self, examples: &[&DpoExample]) -> f64 {
        examples.len() as f64
    }

    fn forward(
        &self,
        model: &CausalLm,
        examples: &[&DpoExample],
        device: &Device,
    ) -> Result<Forward, TrainError> {
        let n = examples.len();
        let rows: Vec<&PromptCompletion> = examples
            .iter()
            .map(|e| &e.pair.chosen)
            .chain(examples.iter().map(|e| &e.pair.rejected))
            .collect();
        let batch = CompletionBatch::new(&rows, self.pad, device);
        let out = completion_predictions(model, &batch, true);
        let values = out.values.as_ref().expect("the values were asked for");
        let [_, width] = out.token_logps.dims();
        let sums = out.sums();
        let lengths = batch.length_tensor(device);
        let plain_chosen = sums.clone().slice(0..n);
        let reference_sums = |side: fn(&DpoExample) -> &Vec<f32>| {
            let values = examples
                .iter()
                .map(|e| side(e).iter().sum::<f32>())
                .collect();
            vector(values, device)
        };
        let (policy_chosen, policy_rejected, reference_chosen, reference_rejected) =
            match self.ld_alpha {
                None => (
                    plain_chosen.clone(),
                    sums.clone().slice(n..2 * n),
                    reference_sums(|e| &e.reference_chosen),
                    reference_sums(|e| &e.reference_rejected),
                ),
                Some(alpha) => {
                    let tokens = |range| out.token_logps.clone().slice([range, 0..width]);
                    let mask = |range| batch.mask.clone().slice([range, 0..width]);
                    let (pc, pr) = ld_logps(
                        tokens(0..n),
                        mask(0..n),
                        tokens(n..2 * n),
                        mask(n..2 * n),
                        alpha,
                    );
                    let chosen: Vec<&[f32]> =
                        examples.iter().map(|e| &e.reference_chosen[..]).collect();
                    let rejected: Vec<&[f32]> =
                        examples.iter().map(|e| &e.reference_rejected[..]).collect();
                    let (rc, rc_mask) = ragged(&chosen, device);
                    let (rr, rr_mask) = ragged(&rejected, device);
                    let (rc, rr) = ld_logps(rc, rc_mask, rr, rr_mask, alpha);
                    (pc, pr, rc, rr)
                }
            };
        let logps = PairLogps {
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_tokens: lengths.clone().slice(0..n),
            rejected_tokens: lengths.slice(n..2 * n),
            sft_chosen: self.ld_alpha.map(|_| plain_chosen.clone()),
        };
        let pair_weights = self.use_weighting.then(|| {
            let log_sum_p2 = Tensor::from_data(
                TensorData::new(values.log_sum_p2.clone(), [2 * n, width]),
                &out.token_logps.device(),
            );
            let w = wpo_weights(out.token_logps.clone(), log_sum_p2, batch.mask.clone());
            w.clone().slice(0..n) * w.slice(n..2 * n)
        });
        let losses = dpo_loss(&logps, &self.loss, pair_weights);

        // Metrics, from values only.
        let chosen_rewards = host(losses.chosen_rewards.clone().inner());
        let rejected_rewards = host(losses.rejected_rewards.clone().inner());
        let policy_sums = host(sums.inner());
        let stats = prediction_stats(values, &batch);
        let wins = chosen_rewards
            .iter()
            .zip(&rejected_rewards)
            .filter(|(c, r)| c > r)
            .count() as f64;
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let margins = sum(&chosen_rewards) - sum(&rejected_rewards);
        let all_tokens: f64 = stats.iter().map(|s| s.tokens).sum();
        let entropy: f64 = stats.iter().map(|s| s.entropy).sum();
        let chosen_tokens: f64 = stats[..n].iter().map(|s| s.tokens).sum();
        let chosen_correct: f64 = stats[..n].iter().map(|s| s.correct).sum();
        let real_tokens: usize = rows.iter().map(|r| r.len()).sum();
        let pairs = n as f64;
        Ok(Forward {
            loss_sum: losses.per_example.sum(),
            metrics: vec![
                MetricValue::mean("rewards/chosen", sum(&chosen_rewards), pairs),
                MetricValue::mean("rewards/rejected", sum(&rejected_rewards), pairs),
                MetricValue::mean("rewards/accuracies", wins, pairs),
                MetricValue::mean("rewards/margins", margins, pairs),
                MetricValue::mean("logps/chosen", sum(&policy_sums[..n]), pairs),
                MetricValue::mean("logps/rejected", sum(&policy_sums[n..]), pairs),
                MetricValue::mean("entropy", entropy, all_tokens),
                MetricValue::mean("mean_token_accuracy", chosen_correct, chosen_tokens),
                MetricValue::cumulative("num_tokens", real_tokens as f64),
            ],
        })
    }
}

/// TR-DPO: the reference moves towards the policy every `sync_steps` updates
/// (`reference = alpha * policy + (1 - alpha) * reference`, TRL's `SyncRefModelCallback`), so its
/// log-probs cannot be cached and are computed for every batch, without a graph. The moving
/// reference is saved with every checkpoint, so a resumed run continues from the same one.
pub struct SyncedReferenceDpo {
    pub base: DpoObjective,
    pub reference: RefCell<CausalLm>,
    pub mixup_alpha: f64,
    pub sync_steps: u64,
}

const REFERENCE_CHECKPOINT: &str = "reference.bpk";

impl Objective for SyncedReferenceDpo {
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
        let rows: Vec<&PromptCompletion> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let mut chosen = sequence_logps(&self.reference.borrow(), &rows, self.base.pad, rows.len());
        let rejected = chosen.split_off(pairs.len());
        let examples: Vec<DpoExample> = pairs
            .iter()
            .zip(chosen.into_iter().zip(rejected))
            .map(
                |(pair, (reference_chosen, reference_rejected))| DpoExample {
                    pair: (*pair).clone(),
                    reference_chosen,
                    reference_rejected,
                },
            )
            .collect();
        let examples: Vec<&DpoExample> = examples.iter().collect();
        Objective::forward(&self.base, model, &examples, device)
    }

    fn after_update(&self, model: &CausalLm, step: u64) {
        if step.is_multiple_of(self.sync_steps) {
            let policy = model.valid();
            let mut reference = self.reference.borrow_mut();
            *reference = mix_parameters(reference.clone(), &policy, self.mixup_alpha);
        }
    }

    fn save_state(&self, dir: &Path) -> Result<(), TrainError> {
        let path = dir.join(REFERENCE_CHECKPOINT);
        self.reference
            .borrow()
            .clone()
            .save_file(&path)
            .map_err(|e| TrainError::Checkpoint {
                path,
                message: e.to_string(),
            })
    }

    fn load_state(&self, dir: &Path, _device: &Device) -> Result<(), TrainError> {
        let path = dir.join(REFERENCE_CHECKPOINT);
        let loaded = self
            .reference
            .borrow()
            .clone()
            .try_load_file(&path)
            .map_err(|e| TrainError::Checkpoint {
                path,
                message: e.to_string(),
            })?;
        *self.reference.borrow_mut() = loaded;
        Ok(())
    }
}

/// `alpha * source + (1 - alpha) * target`, parameter by parameter; both modules have the same
/// structure, so their parameters are visited in the same order.
pub fn mix_parameters<M: Module>(target: M, source: &M, alpha: f64) -> M {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let numel = value.shape().num_elements();
            self.0.push(value.reshape([numel]));
        }
    }
    struct Mix {
        sources: std::vec::IntoIter<Tensor<1>>,
        alpha: f64,
    }
    impl ModuleMapper for Mix {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let source = self
                .sources
                .next()
                .expect("modules of the same structure")
                .reshape(tensor.shape());
            // In fp32: under bf16 the reference (inference only) holds bf16 weights, the
            // policy fp32 ones; the mix is rounded once, to the reference's dtype.
            let dtype = tensor.dtype();
            let fp32 = |t: Tensor<D>| crate::precision::cast(t, burn::tensor::DType::F32);
            let mixed =
                fp32(source).mul_scalar(self.alpha) + fp32(tensor).mul_scalar(1.0 - self.alpha);
            Param::from_mapped_value(id, crate::precision::cast(mixed, dtype), mapper)
        }
    }
    let mut collect = Collect(Vec::new());
    source.visit(&mut collect);
    target.map(&mut Mix {
        sources: collect.0.into_iter(),
        alpha,
    })
}
