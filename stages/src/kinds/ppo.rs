//! PPO with a value model (`ppo`), as in "The N+ Implementation Details of RLHF
//! with PPO" and TRL's former `PPOTrainer`. Each iteration:
//!
//! 1. takes `rollout_batch_size` prompts (seeded order) and samples one response each with the
//!    KV-cache sampler (`response_length`, `temperature`, stop at EOS);
//! 2. scores prompt + response with the reward (reward model, rule or command), less
//!    `missing_eos_penalty` for responses without EOS;
//! 3. evaluates, over the first epoch's micro-batches, the policy's and the reference's
//!    per-token log-probs (of `logits / temperature`) and the value model's per-token values;
//! 4. rewards: `-kl_coef * kl_t` per token (k1 or k3) plus the score on the response's last
//!    token; optionally whitened (mean kept);
//! 5. GAE (`gamma`, `lam`) gives advantages and returns; advantages are whitened over the batch;
//! 6. `ppo_epochs` passes over `num_mini_batches` shuffled minibatches (one AdamW step each, in
//!    micro-batches of `batch_size`): clipped policy loss (`cliprange`) plus `vf_coef` times the
//!    clipped value loss (`cliprange_value`), token means over the minibatch;
//! 7. the adaptive KL controller, when set, updates `kl_coef` from the iteration's KL.
//!
//! Policy and value model are two modules with an AdamW each and the same schedule; their
//! gradients are clipped together by the global norm over both (the loop is `rl`'s), which is
//! what TRL's single optimiser over its policy-and-value wrapper did. The learning rate follows
//! `lr_scheduler_type` over `num_iterations` (linear by default, TRL's annealing).
//!
//! Two deliberate differences from TRL: the score is added on the response's last token (TRL
//! adds it one position after EOS, and extends the value loss mask by one position), and
//! `policy/approxkl_avg` is a mean over response tokens (TRL's includes padding as zeros).
//!
//! The artifact is the policy (Hugging Face directory with its tokenizer), the value model in
//! `value/`, `metrics.jsonl` (one line per iteration) and, with `save_rollouts`,
//! `rollouts.jsonl`. With `lora`, both the policy and the value model train adapters of the
//! stage's settings on frozen bases (the value model's `score` head in full, PEFT's
//! `modules_to_save = ["score"]`), and each directory holds its merged model and `adapter/`.

use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{AdaptiveKl, Judge, KlEstimator, PpoParams, SavedModule};

use crate::artifacts::{save_trained_model, save_trained_scorer, write_lines};
use crate::kind::{Stage, StageKind};
use crate::logps::{CompletionBatch, PromptCompletion};
use crate::losses::{clipped_policy_loss, clipped_value_loss, gae, kl_k1, kl_k3, whiten};
use crate::model::{CausalLm, RewardModel, load_causal_lm, lora, reward_model_from_causal_lm};
use crate::rl::rollout::{self, dense, host};
use crate::rl::{Algorithm, LoopSettings, RlData, RlRun, Rollout, Samples, Trainees, Update, mean};
use crate::train::{StepRecord, TrainError};

pub struct PpoKind;

/// Salt of the value model's adapter initialisation, apart from the policy's.
const VALUE_SALT: u64 = 0x5661_6c75;

impl StageKind for PpoKind {
    type Params = PpoParams;
    const VERSION: u32 = 4;
    // Without a value model or a reward model node, the value model starts from the policy.
    const READS_CONTINUED_MERGED: bool = true;

    fn run(stage: &Stage<'_, PpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let data = RlData::load(&stage.inputs)?;
        let reference_dir = data.model_or_policy(&stage.inputs, "reference")?;
        let value_dir = match (stage.inputs.has("value_model"), &p.policy.reward) {
            (true, _) => data.model_or_policy(&stage.inputs, "value_model")?,
            (false, Judge::Node(_)) => data.model_or_policy(&stage.inputs, "reward")?,
            (false, _) => data.policy_dir.clone(),
        };
        let (policy_cfg, policy) = stage.trainable_lm(&data.policy_dir, &p.train, device)?;
        let inference = device.clone().inner();
        let reference = if p.train.lora.is_some() && RlData::reference_is_policy(&stage.inputs)? {
            stage.lora_reference(&policy)
        } else {
            load_causal_lm(&reference_dir, &inference)?.1
        };
        let (value_cfg, value) = reward_model_from_causal_lm(&value_dir, stage.seed(), device)?;
        // With `lora`, the value model trains adapters of the same settings on its own frozen
        // base, and its `score` head in full (PEFT's `modules_to_save` for a sequence
        // classifier); its adapters are drawn from a stream of their own.
        let value_lora = p.train.lora.clone().map(|mut lora| {
            if !lora.modules_to_save.contains(&SavedModule::Score) {
                lora.modules_to_save.push(SavedModule::Score);
            }
            lora.modules_to_save.retain(|m| *m == SavedModule::Score);
            lora
        });
        let value = match &value_lora {
            Some(lora) => lora::attach(value, lora, crate::seeds::mix(stage.seed(), VALUE_SALT))?,
            None => value,
        };
        let scorer = stage.inputs.judge(
            &p.policy.reward,
            "reward",
            stage.recipe_dir(),
            p.train.batch_size as usize,
            &inference,
        )?;
        let settings = LoopSettings::new(
            &p.rollout,
            &p.train,
            p.ppo_epochs,
            stage.pad(data.pad_id),
            stage.seed(),
        );
        let algorithm = Ppo::new(p, settings.clone());
        let run = RlRun {
            data: &data,
            rollout: &p.rollout,
            train: &p.train,
            learning_rate: p.policy.learning_rate,
            settings,
            kl_coef: p.kl_coef,
        };
        let trainees = Trainees::with_value(policy, value, (&p.train).into());
        let outcome = crate::rl::train(
            stage,
            &algorithm,
            &run,
            trainees,
            Some(&reference),
            &scorer,
            device,
        )?;
        let out = stage.out_dir();
        save_trained_model(
            out,
            &outcome.trainees.policy,
            &policy_cfg.saved_as(p.train.save_dtype),
            &data.tokenizer,
            p.train.lora.as_ref(),
        )?;
        let (value, _) = outcome
            .trainees
            .value
            .as_ref()
            .expect("PPO trains a value model");
        save_trained_scorer(
            &out.join("value"),
            value,
            &value_cfg.saved_as(p.train.save_dtype),
            &data.tokenizer,
            value_lora.as_ref(),
        )?;
        if p.rollout.save_rollouts {
            write_lines(&out.join(crate::rl::ROLLOUTS_FILE), &outcome.rollouts)?;
        }
        stage.progress().println(&outcome.throughput.line("ppo"));
        Ok(StageOutcome {
            summary: outcome.summary(),
        })
    }
}

/// The PPO algorithm of one stage.
#[derive(Debug, Clone)]
pub struct Ppo {
    pub settings: LoopSettings,
    pub kl_estimator: KlEstimator,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub adaptive_kl: Option<AdaptiveKl>,
}

impl Ppo {
    /// The algorithm of a stage with parameters `p`, over the loop's `settings`.
    pub fn new(p: &PpoParams, settings: LoopSettings) -> Self {
        Self {
            settings,
            kl_estimator: p.kl_estimator,
            cliprange: p.cliprange,
            cliprange_value: p.cliprange_value,
            vf_coef: p.vf_coef,
            gamma: p.gamma,
            lam: p.lam,
            whiten_rewards: p.whiten_rewards,
            adaptive_kl: p.adaptive_kl.clone(),
        }
    }
}

/// A scored rollout with everything the update needs, per response token.
pub struct PpoBatch {
    pub samples: Samples,
    pub logps: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub advantages: Vec<Vec<f32>>,
    pub returns: Vec<Vec<f32>>,
    /// Per response: summed KL estimate and summed KL penalty.
    pub kl: Vec<f64>,
    pub non_score: Vec<f64>,
}

/// Per-token log-probs, references and values of a rollout, then rewards, GAE and whitening.
/// `policy` must be on the backend the update runs on (see [`rollout::old_logps`]).
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    policy: &CausalLm,
    reference: &CausalLm,
    value: &RewardModel,
    samples: Samples,
    s: &Ppo,
    kl_coef: f64,
    iteration: u64,
) -> PpoBatch {
    let n = samples.rows.len();
    let l = &s.settings;
    let old = rollout::old_logps(policy, Some(reference), &samples.rows, l, iteration);
    let (partition, logps, ref_logps) = (old.partition, old.policy, old.reference);
    let mut values = vec![Vec::new(); n];
    for micro in partition.iter().flatten() {
        let rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &samples.rows[i]).collect();
        let batch = CompletionBatch::new(&rows, l.pad, &value.device());
        let [m, width] = batch.mask.dims();
        // V(s_t) is read at the position that predicts token t, as TRL's
        // `full_value[:, context_length - 1 : -1]`.
        let v = value
            .values(batch.ids.clone(), Some(&batch.padding))
            .slice([0..m, 0..width]);
        for (&i, row) in micro.iter().zip(rollout::ragged(&host(v), width, &rows)) {
            values[i] = row;
        }
    }

    let mut kl = Vec::with_capacity(n);
    let mut non_score = Vec::with_capacity(n);
    let mut rewards: Vec<Vec<f64>> = Vec::with_capacity(n);
    for i in 0..n {
        let per_token: Vec<f64> = logps[i]
            .iter()
            .zip(&ref_logps[i])
            .map(|(&p, &q)| match s.kl_estimator {
                KlEstimator::K1 => kl_k1(f64::from(p), f64::from(q)),
                KlEstimator::K3 => kl_k3(f64::from(p), f64::from(q)),
            })
            .collect();
        let mut r: Vec<f64> = per_token.iter().map(|k| -kl_coef * k).collect();
        kl.push(per_token.iter().sum());
        non_score.push(r.iter().sum());
        if let Some(last) = r.last_mut() {
            *last += samples.scores[i];
        }
        rewards.push(r);
    }
    if s.whiten_rewards {
        rewards = whiten(&rewards, false);
    }
    let mut advantages = Vec::with_capacity(n);
    let mut returns = Vec::with_capacity(n);
    for (r, v) in rewards.iter().zip(&values) {
        let v: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let (a, ret) = gae(r, &v, s.gamma, s.lam);
        advantages.push(a);
        returns.push(ret.iter().map(|&x| x as f32).collect());
    }
    let advantages = whiten(&advantages, true)
        .into_iter()
        .map(|a| a.into_iter().map(|x| x as f32).collect())
        .collect();
    PpoBatch {
        samples,
        logps,
        values,
        advantages,
        returns,
        kl,
        non_score,
    }
}

impl Rollout for PpoBatch {
    fn samples(&self) -> &Samples {
        &self.samples
    }

    fn kl(&self) -> &[f64] {
        &self.kl
    }
}

/// A minibatch's micro-batch sums.
#[derive(Debug, Clone, Default)]
pub struct PpoMicro {
    pg_sum: f64,
    vf_sum: f64,
    pg_clipped: f64,
    vf_clipped: f64,
    approxkl_sum: f64,
    ratio_sum: f64,
    max_deviation: f64,
}

/// What a PPO minibatch step measured: token means over the minibatch.
#[derive(Debug, Clone)]
pub struct PpoStep {
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    pub approxkl: f64,
    pub ratio: f64,
    /// Largest `|ratio - 1|` over the minibatch's tokens (0 when rollout and update log-probs
    /// agree exactly).
    pub deviation: f64,
}

/// The rows `micro` of per-row values.
fn pick<'a>(values: &'a [Vec<f32>], micro: &[usize]) -> Vec<&'a [f32]> {
    micro.iter().map(|&i| &values[i][..]).collect()
}

impl Algorithm for Ppo {
    type Batch = PpoBatch;
    type Micro = PpoMicro;
    type Step = PpoStep;

    fn generations(&self) -> usize {
        1
    }

    fn prepare(
        &self,
        policy: &CausalLm,
        value: Option<&RewardModel>,
        reference: Option<&CausalLm>,
        samples: Samples,
        kl_coef: f64,
        iteration: u64,
    ) -> PpoBatch {
        prepare(
            policy,
            reference.expect("PPO has a reference"),
            value.expect("PPO has a value model"),
            samples,
            self,
            kl_coef,
            iteration,
        )
    }

    fn weight(&self, _minibatch: &[Vec<usize>], tokens: usize) -> f64 {
        tokens as f64
    }

    /// The policy loss plus `vf_coef` times the value loss, both summed over the response
    /// tokens, divided by the minibatch's tokens.
    fn micro_loss(
        &self,
        t: &Trainees,
        batch_data: &PpoBatch,
        micro: &[usize],
        weight: f64,
        acc: &mut PpoMicro,
        device: &Device,
    ) -> Tensor<1> {
        let s = &self.settings;
        let (value, _) = t.value.as_ref().expect("PPO trains a value model");
        let rows: Vec<&PromptCompletion> =
            micro.iter().map(|&i| &batch_data.samples.rows[i]).collect();
        let batch = CompletionBatch::new(&rows, s.pad, device);
        let [m, width] = batch.mask.dims();
        let mask = batch.mask.clone();
        let old = dense(&rows, &pick(&batch_data.logps, micro), width, device);
        let adv = dense(&rows, &pick(&batch_data.advantages, micro), width, device);
        let ret = dense(&rows, &pick(&batch_data.returns, micro), width, device);
        let old_v = dense(&rows, &pick(&batch_data.values, micro), width, device);

        let new = rollout::policy_token_logps(&t.policy, &batch, s.temperature);
        let diff = (new - old) * mask.clone();
        let ratio = diff.clone().exp();
        let (pg, pg1, pg2) = clipped_policy_loss(ratio.clone(), adv, self.cliprange);
        let pg = pg * mask.clone();

        let vpred = value
            .values(batch.ids.clone(), Some(&batch.padding))
            .slice([0..m, 0..width]);
        let (vf, vf1, vf2) = clipped_value_loss(vpred, old_v, ret, self.cliprange_value);
        let vf = vf * mask.clone();

        let pg_sum = pg.sum();
        let vf_sum = vf.sum();
        let loss = pg_sum.clone() + vf_sum.clone().mul_scalar(self.vf_coef);

        let mask_i = mask.inner();
        let count = |a: Tensor<2>, b: Tensor<2>| -> f64 {
            let hits = a.greater(b).float() * mask_i.clone();
            f64::from(host(hits.sum())[0])
        };
        let diff_i = diff.inner();
        let ratio_i = ratio.inner();
        let deviation = host(
            (ratio_i.clone().sub_scalar(1.0) * mask_i.clone())
                .abs()
                .max(),
        )[0];
        acc.pg_sum += f64::from(host(pg_sum.inner())[0]);
        acc.vf_sum += f64::from(host(vf_sum.inner())[0]);
        acc.pg_clipped += count(pg2.inner(), pg1.inner());
        acc.vf_clipped += count(vf2.inner(), vf1.inner());
        acc.approxkl_sum += 0.5 * f64::from(host((diff_i.clone() * diff_i).sum())[0]);
        acc.ratio_sum += f64::from(host((ratio_i * mask_i).sum())[0]);
        acc.max_deviation = acc.max_deviation.max(f64::from(deviation));
        loss.div_scalar(weight)
    }

    fn finish(&self, acc: PpoMicro, tokens: f64) -> (f64, PpoStep) {
        let [pg, vf, pgc, vfc, akl, ratio] = [
            acc.pg_sum,
            acc.vf_sum,
            acc.pg_clipped,
            acc.vf_clipped,
            acc.approxkl_sum,
            acc.ratio_sum,
        ]
        .map(|x| x / tokens);
        let step = PpoStep {
            pg_loss: pg,
            vf_loss: vf,
            pg_clipfrac: pgc,
            vf_clipfrac: vfc,
            approxkl: akl,
            ratio,
            deviation: acc.max_deviation,
        };
        (pg + self.vf_coef * vf, step)
    }

    fn record(
        &self,
        iteration: u64,
        epoch: f64,
        lr: f64,
        kl_coef: f64,
        batch: &PpoBatch,
        update: &Update<PpoStep>,
    ) -> StepRecord {
        record(iteration, epoch, lr, kl_coef, batch, update)
    }

    fn adapt_kl(&self, kl_coef: f64, batch: &PpoBatch) -> f64 {
        match &self.adaptive_kl {
            Some(adaptive) => adapt_kl(
                kl_coef,
                mean(&batch.kl),
                adaptive.target,
                adaptive.horizon,
                batch.samples.rows.len(),
            ),
            None => kl_coef,
        }
    }

    fn progress(&self, record: &StepRecord) -> String {
        format!(
            "score {:.3}, kl {:.3}",
            record.metrics["objective/scores"], record.metrics["objective/kl"]
        )
    }
}

/// The iteration's line of `metrics.jsonl`, with TRL's names.
fn record(
    iteration: u64,
    epoch: f64,
    lr: f64,
    kl_coef: f64,
    b: &PpoBatch,
    u: &Update<PpoStep>,
) -> StepRecord {
    let column =
        |f: fn(&PpoStep) -> f64| -> Vec<f64> { u.steps.iter().map(|m| f(&m.stats)).collect() };
    let losses: Vec<f64> = u.steps.iter().map(|m| m.loss).collect();
    let norms: Vec<f64> = u.steps.iter().map(|m| m.grad_norm).collect();
    let scores = mean(&b.samples.scores);
    let non_score = mean(&b.non_score);
    let entropy = mean(
        &b.logps
            .iter()
            .map(|l| -l.iter().map(|&x| f64::from(x)).sum::<f64>())
            .collect::<Vec<_>>(),
    );
    let lengths: Vec<f64> = b
        .samples
        .rows
        .iter()
        .map(|r| r.completion.len() as f64)
        .collect();
    let eos = b.samples.eos.iter().filter(|&&e| e).count() as f64;
    let metrics = [
        ("objective/kl", mean(&b.kl)),
        ("objective/entropy", entropy),
        ("objective/non_score_reward", non_score),
        ("objective/rlhf_reward", scores + non_score),
        ("objective/scores", scores),
        ("objective/kl_coef", kl_coef),
        ("policy/approxkl_avg", mean(&column(|s| s.approxkl))),
        ("policy/clipfrac_avg", mean(&column(|s| s.pg_clipfrac))),
        ("loss/policy_avg", mean(&column(|s| s.pg_loss))),
        ("loss/value_avg", mean(&column(|s| s.vf_loss))),
        ("val/clipfrac_avg", mean(&column(|s| s.vf_clipfrac))),
        ("val/ratio", mean(&column(|s| s.ratio))),
        ("val/num_eos_tokens", eos),
        ("completions/mean_length", mean(&lengths)),
    ];
    StepRecord {
        step: iteration + 1,
        epoch,
        loss: mean(&losses),
        learning_rate: lr,
        grad_norm: mean(&norms),
        metrics: metrics
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        cumulative: Vec::new(),
    }
}

/// Ziegler et al.'s adaptive KL controller, as TRL's `AdaptiveKLController`.
pub fn adapt_kl(coef: f64, kl: f64, target: f64, horizon: u64, batch: usize) -> f64 {
    let error = (kl / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + error * batch as f64 / horizon as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, random_causal_lm, random_reward_model};
    use crate::padding::Pad;
    use crate::train::AdamWConfig;
    use burn::module::Module;

    fn settings() -> Ppo {
        Ppo {
            settings: LoopSettings {
                ppo_epochs: 2,
                num_mini_batches: 2,
                micro_batch: 2,
                temperature: 0.7,
                max_grad_norm: 1.0,
                pad: Pad::exact(0),
                seed: 3,
            },
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            adaptive_kl: None,
        }
    }

    fn samples() -> Samples {
        // Rows of different prompt and response lengths, so padding differs across batches.
        let rows: Vec<PromptCompletion> = (0..6)
            .map(|i| PromptCompletion {
                prompt: (1..3 + i % 3).map(|t| t as u32).collect(),
                completion: (0..2 + (i * 5) % 4).map(|t| (5 + t + i) as u32).collect(),
            })
            .collect();
        let n = rows.len();
        Samples {
            prompt_index: (0..n).collect(),
            responses: vec![String::new(); n],
            eos: vec![true; n],
            scores: (0..n).map(|i| i as f64 * 0.3 - 0.5).collect(),
            rows,
        }
    }

    #[test]
    fn first_update_ratio_is_exactly_one() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm(&cfg, 1, &device.clone().autodiff());
        let reference = random_causal_lm(&cfg, 2, &device);
        let value = random_reward_model(&cfg, 3, &device.clone().autodiff());
        let s = settings();
        let batch = prepare(
            &policy.clone().no_grad(),
            &reference,
            &value.valid(),
            samples(),
            &s,
            0.05,
            0,
        );
        let t = Trainees::with_value(policy, value, AdamWConfig::default());
        let (_, update) = crate::rl::update(
            &s,
            t,
            &batch,
            &s.settings,
            0,
            1e-2,
            &device.clone().autodiff(),
        )
        .unwrap();
        let steps = &update.steps;
        assert_eq!(steps[0].stats.deviation, 0.0);
        assert_eq!(steps[0].stats.pg_clipfrac, 0.0);
        // Later minibatches see updated parameters.
        assert_eq!(steps.len(), 4);
        let ratios: Vec<f64> = steps.iter().map(|m| m.stats.ratio).collect();
        assert!(ratios[1..].iter().any(|r| *r != 1.0), "{ratios:?}");
        assert!(steps.iter().all(|m| m.loss.is_finite()));
    }

    #[test]
    fn rewards_put_the_score_on_the_last_token() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm(&cfg, 1, &device);
        let value = random_reward_model(&cfg, 3, &device);
        let mut s = settings();
        s.lam = 1.0;
        // Reference = policy: zero KL, so with gamma = lam = 1 the unwhitened advantage of
        // token t is score - V_t.
        let batch = prepare(&policy, &policy, &value, samples(), &s, 0.05, 0);
        assert!(batch.kl.iter().all(|&k| k == 0.0));
        for (i, ret) in batch.returns.iter().enumerate() {
            for r in ret {
                assert!((f64::from(*r) - batch.samples.scores[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target() {
        // KL twice the target: error clipped to 0.2; coef * (1 + 0.2 * 16 / 100).
        assert!((adapt_kl(0.1, 2.0, 1.0, 100, 16) - 0.1 * 1.032).abs() < 1e-12);
        assert!(adapt_kl(0.1, 0.5, 1.0, 100, 16) < 0.1);
    }
}
