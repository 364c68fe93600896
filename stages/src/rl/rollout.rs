//! Rollouts of the online-RL kinds: which prompts each iteration takes, sampling and scoring
//! the responses, cutting a rollout into minibatches, and the per-token log-probs of a rollout
//! under a model, laid out per row (`ragged`) or as a padded tensor (`dense`).
//!
//! Every random choice is a function of the seed and the iteration number (prompt order, the
//! sampler's seed, the minibatch permutation), so a resumed run needs no generator state to
//! continue exactly as an uninterrupted one. Log-probs come from one function,
//! [`policy_token_logps`], over right-padded [`CompletionBatch`]es.

use std::path::PathBuf;

use burn::tensor::Device;
use burn::tensor::{Tensor, TensorData};
use rudder_schema::kinds::RolloutArgs;

use crate::data::{Rows, Turns};
use crate::generate::{FinishReason, GenerateOptions, generate_ids, generation_config_eos};
use crate::inputs::Inputs;
use crate::judge::{Sample, Scorer};
use crate::logps::{CompletionBatch, PromptCompletion, token_logps};
use crate::model::CausalLm;
use crate::padding::Pad;
use crate::seeds::{mix, permutation};
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

use super::LoopSettings;

/// The prompts of iteration `iteration` (0-based): the data are visited in consecutive seeded
/// permutations (one per pass) and cut into batches of `size`, as a repeating shuffled data
/// loader would.
pub fn prompt_batch(n: usize, size: usize, seed: u64, iteration: u64) -> Vec<usize> {
    let start = iteration as usize * size;
    let mut cached: Option<(usize, Vec<usize>)> = None;
    (start..start + size)
        .map(|p| {
            let pass = p / n;
            if cached.as_ref().is_none_or(|(e, _)| *e != pass) {
                cached = Some((pass, permutation(n, mix(seed, pass as u64))));
            }
            cached.as_ref().expect("just set").1[p % n]
        })
        .collect()
}

/// Rollout rows cut into `num_mini_batches` minibatches (one optimiser step each) of
/// micro-batches of at most `micro` rows (one forward pass each), after a seeded shuffle.
pub fn minibatches(
    rows: usize,
    num_mini_batches: usize,
    micro: usize,
    seed: u64,
) -> Vec<Vec<Vec<usize>>> {
    let order = permutation(rows, seed);
    let per = rows.div_ceil(num_mini_batches.max(1)).max(1);
    order
        .chunks(per)
        .map(|mb| mb.chunks(micro.max(1)).map(<[usize]>::to_vec).collect())
        .collect()
}

/// The seed of the minibatch permutation of `epoch` at `iteration`.
pub fn epoch_seed(seed: u64, iteration: u64, epoch: u32) -> u64 {
    mix(mix(seed, 0x5EED_0000 + iteration), u64::from(epoch))
}

/// The minibatches of update epoch `epoch` at `iteration`. Epoch 0's are also the order in which
/// the rollout's log-probs are computed, so that the first update sees the same batches.
pub fn epoch_minibatches(
    rows: usize,
    num_mini_batches: usize,
    micro: usize,
    seed: u64,
    iteration: u64,
    epoch: u32,
) -> Vec<Vec<Vec<usize>>> {
    minibatches(
        rows,
        num_mini_batches,
        micro,
        epoch_seed(seed, iteration, epoch),
    )
}

/// Per-token log-probs of the completion tokens under the sampling distribution
/// (`logits / temperature`, as TRL scores its rollouts): `[rows, seq - 1]`, zero outside
/// completions. The rollout and the update both call this, on identical batches.
pub fn policy_token_logps(
    model: &CausalLm,
    batch: &CompletionBatch,
    temperature: f64,
) -> Tensor<2> {
    let hidden = model
        .model
        .forward(batch.ids.clone(), Some(&batch.padding), None);
    token_logps(model, hidden, batch, temperature)
}

/// Where row `i`'s completion tokens sit in a `[rows, seq - 1]` layout: from
/// `prompt.len() - 1`, `completion.len()` positions.
fn completion_span(row: &PromptCompletion) -> usize {
    row.prompt.len().max(1) - 1
}

/// Reads each row's completion values out of a flat `[rows, width]` buffer.
pub fn ragged(values: &[f32], width: usize, rows: &[&PromptCompletion]) -> Vec<Vec<f32>> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let start = i * width + completion_span(row);
            values[start..start + row.completion.len()].to_vec()
        })
        .collect()
}

/// Places each row's completion values into a zeroed `[rows, width]` tensor, the layout of
/// [`CompletionBatch::mask`] (`width` is its second dimension: the batch's padded length - 1).
pub fn dense(
    rows: &[&PromptCompletion],
    per_row: &[&[f32]],
    width: usize,
    device: &Device,
) -> Tensor<2> {
    let n = rows.len();
    let mut out = vec![0f32; n * width];
    for (i, (row, values)) in rows.iter().zip(per_row).enumerate() {
        let start = i * width + completion_span(row);
        out[start..start + values.len()].copy_from_slice(values);
    }
    Tensor::from_data(TensorData::new(out, [n, width]), device)
}

/// A float tensor's values on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("converted to f32")
}

/// Per-token log-probs of `rows` under `model`, evaluated micro-batch by micro-batch in the
/// order of `partition` (each row exactly once); returned in row order.
pub fn rollout_logps(
    model: &CausalLm,
    rows: &[PromptCompletion],
    partition: &[Vec<Vec<usize>>],
    pad: Pad,
    temperature: f64,
) -> Vec<Vec<f32>> {
    let device = &model.device();
    let mut out = vec![Vec::new(); rows.len()];
    for micro in partition.iter().flatten() {
        let batch_rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &rows[i]).collect();
        let batch = CompletionBatch::new(&batch_rows, pad, device);
        let [_, width] = batch.mask.dims();
        let values = host(policy_token_logps(model, &batch, temperature));
        for (&i, v) in micro.iter().zip(ragged(&values, width, &batch_rows)) {
            out[i] = v;
        }
    }
    out
}

/// A rollout's per-token log-probs under the policy before the update (and the reference),
/// evaluated over the first update epoch's micro-batches, whose partition is returned too.
pub struct OldLogps {
    pub partition: Vec<Vec<Vec<usize>>>,
    pub policy: Vec<Vec<f32>>,
    /// Empty without a reference.
    pub reference: Vec<Vec<f32>>,
}

/// [`OldLogps`] of `rows` at `iteration`. `policy` must be on the update's (autodiff) backend,
/// untracked: Burn's autodiff backend computes some operations (attention among them)
/// differently from its inner backend, which would make the first ratio differ from 1 in the
/// last bits.
pub fn old_logps(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    rows: &[PromptCompletion],
    s: &LoopSettings,
    iteration: u64,
) -> OldLogps {
    let partition = epoch_minibatches(
        rows.len(),
        s.num_mini_batches,
        s.micro_batch,
        s.seed,
        iteration,
        0,
    );
    let policy = rollout_logps(policy, rows, &partition, s.pad, s.temperature);
    let reference = match reference {
        Some(r) => rollout_logps(r, rows, &partition, s.pad, s.temperature),
        None => Vec::new(),
    };
    OldLogps {
        partition,
        policy,
        reference,
    }
}

/// What every RL stage reads before training: the policy's directory and tokenizer, the
/// prompts (text, token ids and their data rows), the stop tokens.
pub struct RlData {
    pub policy_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub rows: Rows,
    pub prompts: Vec<String>,
    /// The prompts as the data gave them (strings or conversations).
    pub turns: Vec<Turns>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

impl RlData {
    pub fn load(inputs: &Inputs) -> Result<Self, TrainError> {
        let policy = inputs.model("model")?;
        let (policy_dir, tokenizer, config) = (policy.dir, policy.tokenizer, policy.config);
        let rows = inputs.rows("data")?;
        let turns = rows.prompts()?;
        let prompts = turns
            .iter()
            .map(|p| tokenizer.prompt_text(p))
            .collect::<Result<Vec<_>, _>>()?;
        let prompt_ids = turns
            .iter()
            .map(|p| tokenizer.prompt_ids(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(i) = prompt_ids.iter().position(Vec::is_empty) {
            return Err(TrainError::Input(format!(
                "prompt {i} encodes to no tokens"
            )));
        }
        let mut eos_ids = config.eos_token_ids.clone();
        eos_ids.extend(generation_config_eos(&policy_dir)?);
        eos_ids.extend(tokenizer.eos_id());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if eos_ids.is_empty() {
            return Err(TrainError::Input(format!(
                "model {}: neither config.json nor the tokenizer names an EOS token to stop responses at",
                policy_dir.display()
            )));
        }
        let pad_id = tokenizer
            .pad_id()
            .or(config.pad_token_id)
            .unwrap_or(eos_ids[0]);
        Ok(Self {
            policy_dir,
            tokenizer,
            rows,
            prompts,
            turns,
            prompt_ids,
            eos_ids,
            pad_id,
        })
    }

    /// Whether the `reference` role is the policy itself: unbound, or bound to the policy's own
    /// input. A LoRA policy's reference is then its starting weights with the adapter frozen.
    /// Decided by the inputs' keys, never by their directories: a model node with an adapter
    /// reads its base's directory, which a `reference` naming the bare base shares.
    pub fn reference_is_policy(inputs: &Inputs) -> Result<bool, TrainError> {
        Ok(!inputs.has("reference") || inputs.key("reference")? == inputs.key("model")?)
    }

    /// The directory of the role's model, or the policy's when the role is not bound.
    pub fn model_or_policy(&self, inputs: &Inputs, role: &str) -> Result<PathBuf, TrainError> {
        match inputs.has(role) {
            true => {
                let dir = inputs.model_dir(role)?;
                let cfg = crate::model::load_config(&dir)?;
                // The sampler draws over the policy's whole logit width, which may be padded
                // past its tokenizer: every id it can draw must exist in this model.
                let policy = crate::model::load_config(&self.policy_dir)?.vocab_size;
                let ids = policy.max(self.tokenizer.vocab_size());
                if ids > cfg.vocab_size {
                    return Err(TrainError::Input(format!(
                        "`{role}` model {} has a vocabulary of {} ids, smaller than the policy's {}",
                        dir.display(),
                        cfg.vocab_size,
                        ids
                    )));
                }
                Ok(dir)
            }
            false => Ok(self.policy_dir.clone()),
        }
    }
}

/// One iteration's samples: which prompt each row answers, its tokens, text and score.
pub struct Samples {
    pub prompt_index: Vec<usize>,
    pub rows: Vec<PromptCompletion>,
    pub responses: Vec<String>,
    pub eos: Vec<bool>,
    /// The judge's score, less `missing_eos_penalty` for responses without EOS.
    pub scores: Vec<f64>,
}

impl Samples {
    /// Generated tokens in the rollout.
    pub fn tokens(&self) -> usize {
        self.rows.iter().map(|r| r.completion.len()).sum()
    }
}

/// Generates one response per entry of `prompt_index` with the KV-cache sampler (seeded from
/// `seed`) and scores it.
#[allow(clippy::too_many_arguments)]
pub fn sample_and_score(
    policy: &CausalLm,
    data: &RlData,
    scorer: &Scorer,
    prompt_index: Vec<usize>,
    rollout: &RolloutArgs,
    seed: u64,
    _device: &Device,
) -> Result<Samples, TrainError> {
    let prompts: Vec<Vec<u32>> = prompt_index
        .iter()
        .map(|&i| data.prompt_ids[i].clone())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: rollout.response_length as usize,
        temperature: rollout.temperature,
        top_k: 0,
        top_p: 1.0,
        seed,
        batch_size: prompts.len().max(1),
        use_cache: true,
    };
    let generated = generate_ids(policy, &prompts, &data.eos_ids, data.pad_id, &opts)?;
    let mut rows = Vec::with_capacity(generated.len());
    let mut responses = Vec::with_capacity(generated.len());
    let mut eos = Vec::with_capacity(generated.len());
    for (prompt, g) in prompts.into_iter().zip(generated) {
        responses.push(data.tokenizer.decode(&g.ids, true)?);
        eos.push(g.finish_reason == FinishReason::Eos);
        rows.push(PromptCompletion {
            prompt,
            completion: g.ids,
        });
    }
    let samples: Vec<Sample<'_>> = prompt_index
        .iter()
        .zip(&responses)
        .map(|(&i, response)| Sample {
            prompt: &data.prompts[i],
            completion: response,
            row: Some(&data.rows.rows[i]),
            turns: Some(&data.turns[i]),
        })
        .collect();
    let mut scores = scorer.score(&samples)?;
    if scores.len() != rows.len() {
        return Err(TrainError::Input(format!(
            "the reward gave {} scores for {} responses",
            scores.len(),
            rows.len()
        )));
    }
    if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
        return Err(TrainError::Input(format!(
            "the reward returned a non-finite score ({bad})"
        )));
    }
    if let Some(penalty) = rollout.missing_eos_penalty {
        for (s, &e) in scores.iter_mut().zip(&eos) {
            if !e {
                *s -= penalty;
            }
        }
    }
    Ok(Samples {
        prompt_index,
        rows,
        responses,
        eos,
        scores,
    })
}

/// One `rollouts.jsonl` line per response.
pub fn rollout_lines(iteration: u64, data: &RlData, samples: &Samples, kl: &[f64]) -> Vec<String> {
    samples
        .prompt_index
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            serde_json::json!({
                "iteration": iteration,
                "prompt": data.prompts[p],
                "response": samples.responses[i],
                "score": samples.scores[i],
                "kl": kl[i],
                "eos": samples.eos[i],
            })
            .to_string()
        })
        .collect()
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Rollout and update throughput, in generated (or trained) completion tokens per second.
#[derive(Debug, Default, Clone, Copy)]
pub struct Throughput {
    pub rollout_tokens: f64,
    pub rollout_seconds: f64,
    pub update_tokens: f64,
    pub update_seconds: f64,
}

impl Throughput {
    pub fn line(&self, kind: &str) -> String {
        let rate = |t: f64, s: f64| if s > 0.0 { t / s } else { 0.0 };
        format!(
            "{kind}: rollout (generation, scoring, log-probs) {:.0} tokens/s, update {:.0} tokens/s",
            rate(self.rollout_tokens, self.rollout_seconds),
            rate(self.update_tokens, self.update_seconds)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_batches_cover_each_pass_once() {
        let a: Vec<usize> = (0..3).flat_map(|k| prompt_batch(6, 2, 9, k)).collect();
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..6).collect::<Vec<_>>());
        assert_eq!(prompt_batch(6, 2, 9, 1), prompt_batch(6, 2, 9, 1));
        // A batch may straddle two passes.
        assert_eq!(prompt_batch(5, 4, 9, 1).len(), 4);
    }

    #[test]
    fn minibatches_partition_the_rows() {
        let mb = minibatches(10, 3, 2, 4);
        assert_eq!(mb.len(), 3);
        let mut all: Vec<usize> = mb.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(mb.iter().flatten().all(|m| m.len() <= 2));
    }

    #[test]
    fn dense_and_ragged_are_inverse() {
        let device = crate::test_device();
        let a = PromptCompletion {
            prompt: vec![1, 5],
            completion: vec![6, 2],
        };
        let b = PromptCompletion {
            prompt: vec![1],
            completion: vec![7],
        };
        let rows = [&a, &b];
        let t = dense(&rows, &[&[0.5, 0.25], &[3.0]], 3, &device);
        assert_eq!(t.dims(), [2, 3]);
        let values = host(t);
        assert_eq!(values, vec![0.0, 0.5, 0.25, 3.0, 0.0, 0.0]);
        assert_eq!(ragged(&values, 3, &rows), vec![vec![0.5, 0.25], vec![3.0]]);
    }
}
