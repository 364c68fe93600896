//! Completion log-probabilities: the quantity every preference loss, the reference cache, the
//! evaluation KL and the RL stages are built from. A row is a tokenised prompt followed by a
//! completion; its log-prob is the sum over completion tokens `j` of `log_softmax(logits[j-1])[x_j]`
//! (prompt and padding excluded, the final EOS included), as TRL computes it.
//!
//! Rows are right-padded, so padding never shifts positions and a row's values do not depend on
//! what it is batched with.

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::CausalLm;
use crate::model::head::PositionValues;
use crate::padding::Pad;

/// A tokenised prompt and completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCompletion {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl PromptCompletion {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A right-padded batch of prompt + completion rows.
pub struct CompletionBatch {
    /// `[rows, seq]`
    pub ids: Tensor<2, Int>,
    /// Per row: 1 on real tokens, 0 on padding.
    pub padding: Vec<Vec<u8>>,
    /// `[rows, seq - 1]`: token `j + 1` of each row.
    pub targets: Tensor<2, Int>,
    /// `[rows, seq - 1]`: 1.0 where token `j + 1` belongs to the completion.
    pub mask: Tensor<2>,
    /// Completion tokens per row.
    pub lengths: Vec<usize>,
}

impl CompletionBatch {
    /// The batch of `rows`, as long as the longest rounded up to `pad`'s multiple.
    pub fn new(rows: &[&PromptCompletion], pad: Pad, device: &Device) -> Self {
        let n = rows.len();
        let pad_id = pad.id;
        let seq = pad.length(rows.iter().map(|r| r.len()).max().unwrap_or(0), 2);
        let mut ids = Vec::with_capacity(n * seq);
        let mut padding = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n * (seq - 1));
        let mut mask = Vec::with_capacity(n * (seq - 1));
        for row in rows {
            let tokens: Vec<u32> = row.prompt.iter().chain(&row.completion).copied().collect();
            ids.extend(tokens.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - tokens.len()));
            padding.push((0..seq).map(|j| u8::from(j < tokens.len())).collect());
            for j in 1..seq {
                let in_completion = j >= row.prompt.len() && j < tokens.len();
                mask.push(if in_completion { 1.0f32 } else { 0.0 });
                targets.push(tokens.get(j).map_or(0, |&t| i64::from(t)));
            }
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [n, seq]), device),
            padding,
            targets: Tensor::from_data(TensorData::new(targets, [n, seq - 1]), device),
            mask: Tensor::from_data(TensorData::new(mask, [n, seq - 1]), device),
            lengths: rows.iter().map(|r| r.completion.len()).collect(),
        }
    }

    /// Completion tokens per row as a tensor.
    ///
    /// # Shapes
    /// - output: `[rows]`
    pub fn length_tensor(&self, device: &Device) -> Tensor<1> {
        let lengths: Vec<f32> = self.lengths.iter().map(|&l| l as f32).collect();
        let n = lengths.len();
        Tensor::from_data(TensorData::new(lengths, [n]), device)
    }
}

/// A host vector as a tensor.
///
/// # Shapes
/// - output: `[values.len()]`
pub fn vector(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Per-token completion log-probs of a batch, with the hidden states they came from.
pub struct CompletionLogps {
    /// `[rows, seq - 1]`: log-prob of token `j + 1`, zero outside completions.
    pub token_logps: Tensor<2>,
    /// `[rows, seq, d_model]`: the final-norm hidden states, for other targets over the same
    /// forward pass (ORPO's whole-sequence NLL).
    pub hidden: Tensor<3>,
    /// Row-major over `[rows, seq - 1]`, zero outside completions; when asked for.
    pub values: Option<PositionValues>,
}

impl CompletionLogps {
    /// Sequence log-probs: the sum over each row's completion tokens.
    ///
    /// # Shapes
    /// - output: `[rows]`
    pub fn sums(&self) -> Tensor<1> {
        let [n, _] = self.token_logps.dims();
        self.token_logps.clone().sum_dim(1).reshape([n])
    }
}

/// Runs `model` over the batch and takes the log-prob of every completion token.
pub fn completion_logps(model: &CausalLm, batch: &CompletionBatch) -> CompletionLogps {
    completion_predictions(model, batch, false)
}

/// [`completion_logps`], with the [`PositionValues`] of every completion position when `values`
/// is set (the fused head on `cpu` reads them in the same pass; elsewhere they cost a few
/// passes over the vocabulary).
pub fn completion_predictions(
    model: &CausalLm,
    batch: &CompletionBatch,
    values: bool,
) -> CompletionLogps {
    let hidden = model
        .model
        .forward(batch.ids.clone(), Some(&batch.padding), None);
    let predictions = model.predictions(hidden.clone(), &batch.targets, &batch.mask, 1.0, values);
    CompletionLogps {
        token_logps: predictions.logps,
        hidden,
        values: predictions.values,
    }
}

/// `log_softmax(logits[j] / temperature)[target_j]` on the batch's completion positions, zero
/// elsewhere, from `model`'s final-norm hidden states.
///
/// # Shapes
/// - hidden: `[rows, seq, d_model]`
/// - output: `[rows, seq - 1]`
pub fn token_logps(
    model: &CausalLm,
    hidden: Tensor<3>,
    batch: &CompletionBatch,
    temperature: f64,
) -> Tensor<2> {
    model
        .predictions(hidden, &batch.targets, &batch.mask, temperature, false)
        .logps
}

/// Argmax hits and predictive entropy of one row, summed over its completion positions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PredictionStats {
    pub correct: f64,
    pub entropy: f64,
    pub tokens: f64,
}

/// Per-row [`PredictionStats`] from a batch's [`PositionValues`]: TRL's `mean_token_accuracy`
/// and `entropy`.
pub fn prediction_stats(values: &PositionValues, batch: &CompletionBatch) -> Vec<PredictionStats> {
    let width = batch.padding.first().map_or(1, |row| row.len() - 1).max(1);
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    values
        .hits
        .chunks(width)
        .zip(values.entropy.chunks(width))
        .zip(&batch.lengths)
        .map(|((hits, entropy), &len)| PredictionStats {
            correct: sum(hits),
            entropy: sum(entropy),
            tokens: len as f64,
        })
        .collect()
}

/// Per-token completion log-probs of `rows` under `model`, `batch_size` rows per forward pass: the frozen
/// reference's values, computed without building a graph.
pub fn sequence_logps(
    model: &CausalLm,
    rows: &[&PromptCompletion],
    pad: Pad,
    batch_size: usize,
) -> Vec<Vec<f32>> {
    let device = &model.device();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        let batch = CompletionBatch::new(chunk, pad, device);
        let logps = completion_logps(model, &batch);
        let [_, width] = logps.token_logps.dims();
        let values: Vec<f32> = logps
            .token_logps
            .into_data()
            .try_to_vec::<f32>()
            .expect("log-probs are f32");
        for (i, row) in chunk.iter().enumerate() {
            // Token 0 is never predicted, so a row without a prompt loses its first token.
            let first = row.prompt.len().max(1);
            let count = row.len().saturating_sub(first);
            let start = i * width + first - 1;
            out.push(values[start..start + count].to_vec());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_covers_exactly_the_completion() {
        let device = crate::test_device();
        let a = PromptCompletion {
            prompt: vec![1, 5],
            completion: vec![6, 2],
        };
        let b = PromptCompletion {
            prompt: vec![1],
            completion: vec![7],
        };
        let batch = CompletionBatch::new(&[&a, &b], Pad::exact(0), &device);
        let mask: Vec<f32> = batch.mask.clone().into_data().try_to_vec().unwrap();
        // Targets are tokens 1..4: a = [5, 6, 2] (completion 6, 2); b = [7, pad, pad].
        assert_eq!(mask, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        let targets: Vec<i64> = batch
            .targets
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        assert_eq!(targets, vec![5, 6, 2, 7, 0, 0]);
        assert_eq!(batch.lengths, vec![2, 1]);
        assert_eq!(batch.padding, vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
    }

    #[test]
    fn token_logps_pick_the_target_under_log_softmax() {
        let device = crate::test_device();
        let row = PromptCompletion {
            prompt: vec![0],
            completion: vec![1, 0],
        };
        let batch = CompletionBatch::new(&[&row], Pad::exact(0), &device);
        // The head is the identity, so the hidden states are the logits.
        // Position 0: logits [0, ln 3] -> p(1) = 3/4; position 1: [0, 0] -> p(0) = 1/2.
        let model = crate::model::head::identity_head(2, &device);
        let hidden = Tensor::<3>::from_data(
            TensorData::new(vec![0.0, 3f32.ln(), 0.0, 0.0, 9.0, 9.0], [1, 3, 2]),
            &device,
        );
        for temperature in [1.0, 0.5] {
            let got: Vec<f32> = token_logps(&model, hidden.clone(), &batch, temperature)
                .into_data()
                .try_to_vec()
                .unwrap();
            // At temperature 1/2 the logits double: p(1) = 9/10 at position 0.
            let p0 = if temperature == 1.0 { 0.75f32 } else { 0.9 };
            assert!((got[0] - p0.ln()).abs() < 1e-6, "{got:?}");
            assert!((got[1] - 0.5f32.ln()).abs() < 1e-6, "{got:?}");
        }
        let values = completion_predictions_from(&model, hidden, &batch);
        let stats = prediction_stats(&values, &batch);
        // Argmax at position 0 is 1 (the target); at position 1 a tie resolves to 0 (the target).
        assert_eq!(stats[0].correct, 2.0);
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        assert!((stats[0].entropy - h(0.75) - h(0.5)).abs() < 1e-5);
        assert_eq!(stats[0].tokens, 2.0);
    }

    fn completion_predictions_from(
        model: &CausalLm,
        hidden: Tensor<3>,
        batch: &CompletionBatch,
    ) -> PositionValues {
        model
            .predictions(hidden, &batch.targets, &batch.mask, 1.0, true)
            .values
            .unwrap()
    }
}
