//! What the online-RL kinds (`ppo`, `rloo`, `grpo`) share: choosing each iteration's prompts,
//! generating and scoring the rollout, the completion log-probs of policy and reference, the
//! advantage arithmetic (KL estimators, whitening, GAE, leave-one-out and group baselines), and
//! resumable state.
//!
//! Every random choice is a function of the seed and the iteration number (prompt order, the
//! sampler's seed, the minibatch permutation), so a resumed run needs no generator state to
//! continue exactly as an uninterrupted one.
//!
//! Log-probs are computed by one function, [`policy_token_logps`], over right-padded
//! [`CompletionBatch`]es. The rollout evaluates the old policy over exactly the micro-batches
//! that the first update epoch uses, in the same order, so the first minibatch's probability
//! ratio is exactly 1: no padding or batching drift between the two passes.

pub mod group;

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rudder_engine::runner::StageContext;
use rudder_schema::kinds::{Judge, RolloutArgs, TrainArgs};
use serde::{Deserialize, Serialize};

use crate::data::Rows;
use crate::generate::{FinishReason, GenerateOptions, generate_ids};
use crate::judge::{Sample, Scorer};
use crate::logps::{CompletionBatch, PromptCompletion, token_logps};
use crate::model::CausalLm;
use crate::runner;
use crate::tokenizer::Tokenizer;
use crate::train::adamw::AdamW;
use crate::train::{Checkpointing, StepRecord, TrainError};

/// The per-iteration rollouts an artifact holds when `save_rollouts` is set.
pub const ROLLOUTS_FILE: &str = "rollouts.jsonl";

/// SplitMix64: spreads (seed, salt) into unrelated generator seeds.
pub fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded Fisher-Yates permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

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
pub fn policy_token_logps<B: Backend>(
    model: &CausalLm<B>,
    batch: &CompletionBatch<B>,
    temperature: f64,
) -> Tensor<B, 2> {
    let logits = model
        .forward(batch.ids.clone(), Some(&batch.padding), None)
        .div_scalar(temperature);
    token_logps(logits, batch)
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

/// Places each row's completion values into a zeroed `[rows, seq - 1]` tensor, the layout of
/// [`CompletionBatch::mask`].
pub fn dense<B: Backend>(
    rows: &[&PromptCompletion],
    per_row: &[&[f32]],
    device: &B::Device,
) -> Tensor<B, 2> {
    let n = rows.len();
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(2) - 1;
    let mut out = vec![0f32; n * width];
    for (i, (row, values)) in rows.iter().zip(per_row).enumerate() {
        let start = i * width + completion_span(row);
        out[start..start + values.len()].copy_from_slice(values);
    }
    Tensor::from_data(TensorData::new(out, [n, width]), device)
}

/// A float tensor's values on the host.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .expect("converted to f32")
}

/// Per-token log-probs of `rows` under `model`, evaluated micro-batch by micro-batch in the
/// order of `partition` (each row exactly once); returned in row order.
pub fn rollout_logps<B: Backend>(
    model: &CausalLm<B>,
    rows: &[PromptCompletion],
    partition: &[Vec<Vec<usize>>],
    pad_id: u32,
    temperature: f64,
    device: &B::Device,
) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(); rows.len()];
    for micro in partition.iter().flatten() {
        let batch_rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &rows[i]).collect();
        let batch = CompletionBatch::<B>::new(&batch_rows, pad_id, device);
        let [_, width] = batch.mask.dims();
        let values = host(policy_token_logps(model, &batch, temperature));
        for (&i, v) in micro.iter().zip(ragged(&values, width, &batch_rows)) {
            out[i] = v;
        }
    }
    out
}

/// The per-token KL estimators of Schulman's "Approximating KL divergence", from the sampled
/// token's log-probs under the policy and the reference: k1 = log p - log q;
/// k3 = (q/p - 1) - log(q/p).
pub fn kl_k1(logp: f64, ref_logp: f64) -> f64 {
    logp - ref_logp
}

/// See [`kl_k1`].
pub fn kl_k3(logp: f64, ref_logp: f64) -> f64 {
    let logr = ref_logp - logp;
    logr.exp_m1() - logr
}

/// TRL's `masked_whiten` over every value of `rows`: `(x - mean) / sqrt(var + 1e-8)` with the
/// unbiased variance, the mean added back when `shift_mean` is false.
pub fn whiten(rows: &[Vec<f64>], shift_mean: bool) -> Vec<Vec<f64>> {
    let n: usize = rows.iter().map(Vec::len).sum();
    if n == 0 {
        return rows.to_vec();
    }
    let mean = rows.iter().flatten().sum::<f64>() / n as f64;
    let mut var = rows
        .iter()
        .flatten()
        .map(|x| (x - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    if n > 1 {
        var *= n as f64 / (n as f64 - 1.0);
    }
    let scale = 1.0 / (var + 1e-8).sqrt();
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|x| {
                    let w = (x - mean) * scale;
                    if shift_mean { w } else { w + mean }
                })
                .collect()
        })
        .collect()
}

/// Generalised advantage estimation on one response: `delta_t = r_t + gamma V_{t+1} - V_t`
/// (`V` after the last token is 0), `A_t = delta_t + gamma lam A_{t+1}`. Returns the advantages
/// and the returns `A + V`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut advantages = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        advantages[t] = last;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// RLOO's advantages: each reward minus the mean of the other rewards of its group
/// (consecutive groups of `k`).
pub fn leave_one_out(rewards: &[f64], k: usize) -> Vec<f64> {
    rewards
        .chunks(k)
        .flat_map(|g| {
            let sum: f64 = g.iter().sum();
            let others = (g.len().max(2) - 1) as f64;
            g.iter().map(move |r| {
                if g.len() < 2 {
                    0.0
                } else {
                    r - (sum - r) / others
                }
            })
        })
        .collect()
}

/// GRPO's advantages: each reward minus its group's mean, divided by the group's (unbiased)
/// standard deviation + 1e-4 when `scale`. Also returns each group's standard deviation.
pub fn group_advantages(rewards: &[f64], k: usize, scale: bool) -> (Vec<f64>, Vec<f64>) {
    let mut stds = Vec::new();
    let advantages = rewards
        .chunks(k)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let std = if g.len() > 1 {
                (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            stds.push(std);
            g.iter()
                .map(move |r| {
                    if scale {
                        (r - mean) / (std + 1e-4)
                    } else {
                        r - mean
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (advantages, stds)
}

/// What every RL stage reads before training: the policy's directory and tokenizer, the
/// prompts (text, token ids and their data rows), the stop tokens.
pub struct RlData {
    pub policy_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub rows: Rows,
    pub prompts: Vec<String>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

impl RlData {
    pub fn load(ctx: &StageContext<'_>) -> Result<Self, TrainError> {
        let policy_dir = runner::model_dir(ctx)?;
        let tokenizer = runner::checked_tokenizer(&policy_dir)?;
        let config = crate::model::load_config(&policy_dir)?;
        let rows = runner::data_rows(ctx)?;
        let prompts = rows.prompts()?;
        let prompt_ids = prompts
            .iter()
            .map(|p| tokenizer.encode_prompt(p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(i) = prompt_ids.iter().position(Vec::is_empty) {
            return Err(TrainError::Input(format!(
                "prompt {i} encodes to no tokens"
            )));
        }
        let mut eos_ids = config.eos_token_ids.clone();
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
            prompt_ids,
            eos_ids,
            pad_id,
        })
    }

    /// The directory of the role's model, or the policy's when the role is not bound.
    pub fn model_or_policy(
        &self,
        ctx: &StageContext<'_>,
        role: &str,
    ) -> Result<PathBuf, TrainError> {
        match ctx.input(role) {
            Some(_) => {
                let dir = runner::model_dir_of(ctx, role)?;
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
            None => Ok(self.policy_dir.clone()),
        }
    }
}

/// Checks the settings the RL kinds share, so that no training argument is silently ignored.
///
/// `generations` is the number of samples per prompt (1 for PPO): every minibatch must get the
/// same share of a rollout's rows, as TRL requires.
pub fn check_args(
    rollout: &RolloutArgs,
    train: &TrainArgs,
    generations: u32,
) -> Result<(), TrainError> {
    let rows = rollout.rollout_batch_size * generations;
    if !rows.is_multiple_of(rollout.num_mini_batches) {
        return Err(TrainError::Config(format!(
            "num_mini_batches ({}) must divide the rows of a rollout ({rows} = rollout_batch_size \
             {} x {generations} samples per prompt)",
            rollout.num_mini_batches, rollout.rollout_batch_size
        )));
    }
    if train.max_steps.is_some() {
        return Err(TrainError::Config(
            "max_steps does not apply to RL stages; set num_iterations (rollout batches)".into(),
        ));
    }
    if train.gradient_accumulation_steps != 1 {
        return Err(TrainError::Config(
            "gradient_accumulation_steps does not apply to RL stages: each of the num_mini_batches minibatches is one optimiser step, run in micro-batches of batch_size".into(),
        ));
    }
    if !(rollout.temperature > 0.0 && rollout.temperature.is_finite()) {
        return Err(TrainError::Config(format!(
            "temperature must be positive, got {}",
            rollout.temperature
        )));
    }
    Ok(())
}

/// The reward: a reward-model node (role `reward`), a rule or a command.
pub fn reward_scorer<B: Backend>(
    ctx: &StageContext<'_>,
    judge: &Judge,
    batch_size: usize,
    device: &B::Device,
) -> Result<Scorer<B>, TrainError> {
    match judge {
        Judge::Node(_) => {
            let dir = runner::model_dir_of(ctx, "reward")?;
            Scorer::reward_model(&dir, batch_size, device)
        }
        Judge::Rule(rule) => Scorer::rule(rule),
        Judge::Command(command) => Ok(Scorer::command(command, ctx.recipe_dir)),
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
pub fn sample_and_score<B: Backend>(
    policy: &CausalLm<B>,
    data: &RlData,
    scorer: &Scorer<B>,
    prompt_index: Vec<usize>,
    rollout: &RolloutArgs,
    seed: u64,
    device: &B::Device,
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
    let generated = generate_ids(policy, &prompts, &data.eos_ids, data.pad_id, &opts, device)?;
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

/// Writes `rollouts.jsonl`.
pub fn write_lines(path: &Path, lines: &[String]) -> Result<(), TrainError> {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| TrainError::io(path, e))
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

/// What an RL checkpoint restores besides the models and optimisers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RlState {
    /// The (possibly adapted) KL coefficient for the next iteration.
    pub kl_coef: f64,
    /// `rollouts.jsonl` lines so far.
    pub rollouts: Vec<String>,
}

const RL_STATE_FILE: &str = "rl_state.json";

/// Resumable state of an RL stage under `DIR`: `policy/` and `value/` (the training loop's
/// checkpoint format: parameters, AdamW state, step records) and `rl_state.json`. The three are
/// written into `DIR.partial` and renamed together, so they always belong to the same iteration.
pub struct RlCheckpoint {
    pub dir: PathBuf,
    pub every: u64,
}

/// A restored module and its optimiser.
pub struct Restored<B: AutodiffBackend, M> {
    pub model: M,
    pub optim: AdamW<B::InnerBackend>,
    pub steps: Vec<StepRecord>,
}

impl RlCheckpoint {
    pub fn new(work_dir: &Path, every: u64) -> Self {
        let dir = work_dir.join("checkpoint");
        // A run killed between the two renames of `save` left the previous checkpoint here.
        let old = dir.with_extension("old");
        if !dir.exists() && old.is_dir() {
            let _ = std::fs::rename(&old, &dir);
        }
        Self { dir, every }
    }

    fn part(dir: &Path, name: &str) -> Checkpointing {
        Checkpointing {
            dir: dir.join(name),
            every: 0,
        }
    }

    /// Saves after `steps.len()` iterations.
    #[allow(clippy::too_many_arguments)]
    pub fn save<B: AutodiffBackend, P: AutodiffModule<B>, V: AutodiffModule<B>>(
        &self,
        policy: (&P, &AdamW<B::InnerBackend>),
        value: Option<(&V, &AdamW<B::InnerBackend>)>,
        steps: &[StepRecord],
        prompts: usize,
        total: u64,
        state: &RlState,
    ) -> Result<(), TrainError> {
        let tmp = self.dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        Self::part(&tmp, "policy").save::<B, P>(policy.0, policy.1, steps, prompts, total)?;
        if let Some((model, optim)) = value {
            Self::part(&tmp, "value").save::<B, V>(model, optim, steps, prompts, total)?;
        }
        let path = tmp.join(RL_STATE_FILE);
        let text = serde_json::to_string(state).expect("the state serialises");
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        // The previous checkpoint stays until the new one is in place: a kill between the two
        // renames leaves `.old`, which `state` and `load` fall back to.
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.dir.exists() {
            std::fs::rename(&self.dir, &old).map_err(|e| TrainError::io(&self.dir, e))?;
        }
        std::fs::rename(&tmp, &self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The saved state, when a checkpoint exists.
    pub fn state(&self) -> Result<Option<RlState>, TrainError> {
        let path = self.dir.join(RL_STATE_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Checkpoint {
                path,
                message: e.to_string(),
            })
    }

    /// Restores one module (`policy` or `value`) and its optimiser; the module is returned
    /// unchanged with a fresh optimiser when there is no checkpoint.
    pub fn load<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        name: &str,
        model: M,
        optim: AdamW<B::InnerBackend>,
        prompts: usize,
        total: u64,
        device: &B::Device,
    ) -> Result<Restored<B, M>, TrainError> {
        if !self.dir.join(RL_STATE_FILE).is_file() {
            return Ok(Restored {
                model,
                optim,
                steps: Vec::new(),
            });
        }
        let (model, resumed) =
            Self::part(&self.dir, name).load::<B, M>(model, prompts, total, device)?;
        let resumed = resumed.ok_or_else(|| TrainError::Checkpoint {
            path: self.dir.join(name),
            message: "missing; delete the checkpoint to start over".into(),
        })?;
        Ok(Restored {
            model,
            optim: AdamW {
                config: optim.config,
                step: resumed.optimizer_step,
                moments: resumed.moments,
            },
            steps: resumed.steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn kl_estimators_match_hand_values() {
        // p = 0.5, q = 0.25: k1 = ln 2; k3 = (0.5 - 1) - ln 0.5 = ln 2 - 0.5.
        let (lp, lq) = (0.5f64.ln(), 0.25f64.ln());
        assert!(close(kl_k1(lp, lq), 2f64.ln()));
        assert!(close(kl_k3(lp, lq), 2f64.ln() - 0.5));
        // Equal log-probs: both zero.
        assert_eq!(kl_k1(-1.3, -1.3), 0.0);
        assert_eq!(kl_k3(-1.3, -1.3), 0.0);
        // k3 is never negative even where k1 is.
        assert!(kl_k1(lq, lp) < 0.0 && kl_k3(lq, lp) > 0.0);
    }

    #[test]
    fn whitening_uses_the_unbiased_variance() {
        // Values 1, 2, 3 (over two rows): mean 2, unbiased variance 1.
        let rows = vec![vec![1.0, 2.0], vec![3.0]];
        let w = whiten(&rows, true);
        let s = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert!(close(w[0][0], -s) && close(w[0][1], 0.0) && close(w[1][0], s));
        let kept = whiten(&rows, false);
        assert!(close(kept[0][0], 2.0 - s) && close(kept[1][0], 2.0 + s));
    }

    #[test]
    fn gae_matches_hand_computation() {
        // r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma 1, lam 0.5:
        // d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.4 - 0.2 = 0.2; d0 = 0 + 0.2 - 0.5 = -0.3
        // A2 = 0.6; A1 = 0.2 + 0.5 * 0.6 = 0.5; A0 = -0.3 + 0.5 * 0.5 = -0.05.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.5);
        assert!(
            close(a[0], -0.05) && close(a[1], 0.5) && close(a[2], 0.6),
            "{a:?}"
        );
        assert!(
            close(r[0], 0.45) && close(r[1], 0.7) && close(r[2], 1.0),
            "{r:?}"
        );
        // gamma 0.9, lam 1: A_t = sum gamma^k delta (Monte Carlo return minus V_t).
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 0.0], 0.9, 1.0);
        assert!(close(a[1], 2.0) && close(a[0], 1.0 + 0.9 * 2.0), "{a:?}");
    }

    #[test]
    fn baselines_of_groups() {
        // Group [1, 2, 6]: others' means 4, 3.5, 1.5.
        let a = leave_one_out(&[1.0, 2.0, 6.0, 0.0, 0.0, 3.0], 3);
        assert!(
            close(a[0], -3.0) && close(a[1], -1.5) && close(a[2], 4.5),
            "{a:?}"
        );
        assert!(close(a[5], 3.0) && close(a[3], -1.5), "{a:?}");
        // Group [1, 3]: mean 2, unbiased std sqrt(2).
        let (g, std) = group_advantages(&[1.0, 3.0, 5.0, 5.0], 2, true);
        let s = 2f64.sqrt();
        assert!(close(std[0], s) && close(std[1], 0.0));
        assert!(close(g[0], -1.0 / (s + 1e-4)) && close(g[1], 1.0 / (s + 1e-4)));
        assert!(close(g[2], 0.0) && close(g[3], 0.0));
        let (g, _) = group_advantages(&[1.0, 3.0], 2, false);
        assert!(close(g[0], -1.0) && close(g[1], 1.0));
    }

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
        let device = Default::default();
        let a = PromptCompletion {
            prompt: vec![1, 5],
            completion: vec![6, 2],
        };
        let b = PromptCompletion {
            prompt: vec![1],
            completion: vec![7],
        };
        let rows = [&a, &b];
        let t = dense::<crate::TestBackend>(&rows, &[&[0.5, 0.25], &[3.0]], &device);
        assert_eq!(t.dims(), [2, 3]);
        let values = host(t);
        assert_eq!(values, vec![0.0, 0.5, 0.25, 3.0, 0.0, 0.0]);
        assert_eq!(ragged(&values, 3, &rows), vec![vec![0.5, 0.25], vec![3.0]]);
    }
}
