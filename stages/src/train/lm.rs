//! The causal language model's training objective, shared by `sft` and `pretrain`: tokenised
//! sequences with a per-token training mask, right-padded batches, and the token-mean negative
//! log-likelihood over the masked tokens of the whole batch, with TRL's metrics
//! (`mean_token_accuracy`, `entropy`, the running `num_tokens`).
//!
//! Token `j` is predicted from position `j - 1` (labels are unshifted, as in transformers). A
//! packed row carries segment ids, so each of its examples attends only to itself.

use burn::tensor::Device;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use super::{Forward, MetricValue, Objective, TrainError};
use crate::model::CausalLm;
use crate::padding::Pad;

/// A tokenised training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftSequence {
    pub input_ids: Vec<u32>,
    /// `true` where the token is a training target (label != -100 in transformers' terms).
    pub target: Vec<bool>,
    /// For a packed row, the segment (1, 2, ...) each token belongs to; `None` for one example.
    pub segments: Option<Vec<u8>>,
}

impl SftSequence {
    /// The number of trained tokens (position 0 is never predicted).
    pub fn num_targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }

    /// transformers' `labels`: the token where it is trained on, -100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids
            .iter()
            .zip(&self.target)
            .map(|(&id, &t)| if t { i64::from(id) } else { -100 })
            .collect()
    }
}

/// The SFT objective over a causal LM.
pub struct SftObjective {
    /// Right-padding (never trained on, never attended to).
    pub pad: Pad,
}

impl Objective for SftObjective {
    type Model = CausalLm;
    type Example = SftSequence;

    fn length(&self, example: &SftSequence) -> usize {
        example.input_ids.len()
    }

    fn weight(&self, examples: &[&SftSequence]) -> f64 {
        examples.iter().map(|s| s.num_targets()).sum::<usize>() as f64
    }

    fn forward(
        &self,
        model: &CausalLm,
        examples: &[&SftSequence],
        device: &Device,
    ) -> Result<Forward, TrainError> {
        let batch = Batch::new(examples, self.pad, device);
        let hidden = model
            .model
            .forward(batch.ids.clone(), Some(&batch.padding), None);
        let stats = head_token_stats(model, hidden, &batch);
        let real: usize = examples.iter().map(|s| s.input_ids.len()).sum();
        Ok(Forward {
            loss_sum: stats.nll_sum,
            metrics: vec![
                MetricValue::mean("mean_token_accuracy", stats.correct, stats.targets),
                MetricValue::mean("entropy", stats.entropy_sum, stats.targets),
                MetricValue::cumulative("num_tokens", real as f64),
            ],
        })
    }
}

/// A right-padded batch of sequences.
pub struct Batch {
    pub ids: Tensor<2, Int>,
    /// 1 on real tokens, 0 on padding.
    pub padding: Vec<Vec<u8>>,
    /// `[batch, seq - 1]`: 1.0 where token `j + 1` is trained on.
    pub target_mask: Tensor<2>,
    /// `[batch, seq - 1]`: token `j + 1`.
    pub targets: Tensor<2, Int>,
    pub seq: usize,
}

impl Batch {
    /// The batch of `examples`, as long as the longest rounded up to `pad`'s multiple.
    pub fn new(examples: &[&SftSequence], pad: Pad, device: &Device) -> Self {
        let n = examples.len();
        let pad_id = pad.id;
        let longest = examples.iter().map(|s| s.input_ids.len()).max();
        let seq = pad.length(longest.unwrap_or(0), 2);
        let mut ids = Vec::with_capacity(n * seq);
        let mut padding = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n * (seq - 1));
        let mut targets = Vec::with_capacity(n * (seq - 1));
        for s in examples {
            let len = s.input_ids.len();
            ids.extend(s.input_ids.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - len));
            padding.push(match &s.segments {
                Some(segments) => segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, seq - len))
                    .collect(),
                None => (0..seq).map(|j| u8::from(j < len)).collect(),
            });
            for j in 1..seq {
                let trained = j < len && s.target[j];
                mask.push(if trained { 1.0f32 } else { 0.0 });
                targets.push(if j < len {
                    i64::from(s.input_ids[j])
                } else {
                    0
                });
            }
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [n, seq]), device),
            padding,
            target_mask: Tensor::from_data(TensorData::new(mask, [n, seq - 1]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, seq - 1]), device),
            seq,
        }
    }
}

/// Per-batch token statistics of next-token prediction.
pub struct TokenStats {
    /// Sum of the NLL over trained tokens (differentiable).
    pub nll_sum: Tensor<1>,
    pub correct: f64,
    pub targets: f64,
    /// Sum over the positions that predict a trained token of the predictive entropy.
    pub entropy_sum: f64,
}

/// NLL, accuracy and entropy of `model`'s head over final-norm hidden states
/// (`[batch, seq, d_model]`) against the batch's targets, through [`CausalLm::predictions`] (the
/// fused head on `cpu`: the `[batch, seq, vocab]` logits are never built).
pub fn head_token_stats(model: &CausalLm, hidden: Tensor<3>, batch: &Batch) -> TokenStats {
    let predictions = model.predictions(hidden, &batch.targets, &batch.target_mask, 1.0, true);
    let values = predictions.values.expect("the values were asked for");
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    // The log-probs are zero off the mask already.
    let nll_sum = predictions.logps.neg().sum();
    TokenStats {
        nll_sum,
        correct: sum(&values.hits),
        targets: batch.target_mask.clone().sum().into_scalar::<f64>(),
        // TRL 1.16 averages the predictive entropy over the trained positions.
        entropy_sum: sum(&values.entropy),
    }
}

/// NLL, accuracy and entropy of `logits` (`[batch, seq, vocab]`) against the batch's targets.
pub fn token_stats(logits: Tensor<3>, batch: &Batch) -> TokenStats {
    let [n, seq, vocab] = logits.dims();
    let logp = log_softmax(logits.clone(), 2);
    let shifted = logp.slice([0..n, 0..seq - 1, 0..vocab]);
    let targets = crate::backend::lift(batch.targets.clone(), &shifted);
    let mask = crate::backend::lift(batch.target_mask.clone(), &shifted);
    let picked = shifted
        .clone()
        .gather(2, targets.clone().unsqueeze_dim(2))
        .reshape([n, seq - 1]);
    let nll_sum = crate::losses::masked_nll_sum(picked, mask);

    // Metrics need no gradient.
    let logits_inner = logits.inner();
    let argmax = logits_inner
        .clone()
        .slice([0..n, 0..seq - 1, 0..vocab])
        .argmax(2)
        .reshape([n, seq - 1]);
    let correct: f64 = (argmax.equal(batch.targets.clone()).float() * batch.target_mask.clone())
        .sum()
        .into_scalar::<f64>();
    let targets_count: f64 = batch.target_mask.clone().sum().into_scalar::<f64>();
    // TRL 1.16 averages the predictive entropy over the trained positions.
    // The trained log-softmax's values, read without its graph (not a second log-softmax).
    let logp_inner = shifted.inner();
    let entropy = (logp_inner.clone().exp() * logp_inner)
        .sum_dim(2)
        .reshape([n, seq - 1])
        .neg();
    let entropy_sum: f64 = (entropy * batch.target_mask.clone())
        .sum()
        .into_scalar::<f64>();
    TokenStats {
        nll_sum,
        correct,
        targets: targets_count,
        entropy_sum,
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn nll_accuracy_and_entropy_on_hand_computed_logits() {
        let device = crate::test_device();
        // Sequence [1, 0, 1] over a vocabulary of 2: tokens 0 and 1 at positions 1 and 2 are
        // trained.
        let seq = SftSequence {
            input_ids: vec![1, 0, 1],
            target: vec![false, true, true],
            segments: None,
        };
        let batch = Batch::new(&[&seq], Pad::exact(0), &device);
        // Position 0 predicts token 0 with logits [ln 3, 0] -> p = [0.75, 0.25];
        // position 1 predicts token 1 with logits [0, 0] -> p = [0.5, 0.5].
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![3f32.ln(), 0.0, 0.0, 0.0, 5.0, 5.0], [1, 3, 2]),
            &device,
        );
        // The same logits as hidden states under an identity head: through the LM head's
        // predictions (the fused head on `cpu`).
        let model = crate::model::head::identity_head(2, &device);
        let through_head = head_token_stats(&model, logits.clone(), &batch);
        for stats in [token_stats(logits, &batch), through_head] {
            let nll: f64 = stats.nll_sum.into_scalar::<f64>();
            let expect = -(0.75f64.ln()) - 0.5f64.ln();
            assert!((nll - expect).abs() < 1e-6, "{nll} vs {expect}");
            // argmax at position 0 is 0 (correct); at position 1 a tie resolves to 0 (wrong).
            assert_eq!(stats.correct, 1.0);
            assert_eq!(stats.targets, 2.0);
            let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
            let expect_h = h(0.75) + h(0.5);
            assert!((stats.entropy_sum - expect_h).abs() < 1e-5);
        }
    }

    #[test]
    fn padding_and_untrained_tokens_do_not_count() {
        let device = crate::test_device();
        let a = SftSequence {
            input_ids: vec![1, 1],
            target: vec![false, false],
            segments: None,
        };
        let b = SftSequence {
            input_ids: vec![1, 0, 1],
            target: vec![false, false, true],
            segments: None,
        };
        assert_eq!(a.num_targets() + b.num_targets(), 1);
        assert_eq!(b.labels(), vec![-100, -100, 1]);
        let batch = Batch::new(&[&a, &b], Pad::exact(0), &device);
        assert_eq!(batch.padding, vec![vec![1, 1, 0], vec![1, 1, 1]]);
        let mask: Vec<f32> = batch.target_mask.clone().into_data().try_to_vec().unwrap();
        assert_eq!(mask, vec![0.0, 0.0, 0.0, 1.0]);
        let logits = Tensor::<3>::zeros([2, 3, 2], &device);
        let stats = token_stats(logits, &batch);
        let nll: f64 = stats.nll_sum.into_scalar::<f64>();
        assert!((nll - 2f64.ln()).abs() < 1e-6);
    }
}
