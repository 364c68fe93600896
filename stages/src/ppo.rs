//! PPO with a value model (the `ppo` stage kind), as in "The N+ Implementation Details of RLHF
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
//! gradients are clipped together by the global norm over both, which is what TRL's single
//! optimiser over its policy-and-value wrapper did. The learning rate follows
//! `lr_scheduler_type` over `num_iterations` (linear by default, TRL's annealing).
//!
//! Two deliberate differences from TRL: the score is added on the response's last token (TRL
//! adds it one position after EOS, and extends the value loss mask by one position), and
//! `policy/approxkl_avg` is a mean over response tokens (TRL's includes padding as zeros).
//!
//! The artifact is the policy (Hugging Face directory with its tokenizer), the value model in
//! `value/`, `metrics.jsonl` (one line per iteration) and, with `save_rollouts`,
//! `rollouts.jsonl`.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::{Judge, KlEstimator, PpoParams};

use crate::backend::{AutodiffTask, dispatch_autodiff};
use crate::logps::{CompletionBatch, PromptCompletion};
use crate::model::{
    CausalLm, RewardModel, load_causal_lm, reward_model_from_causal_lm, save_causal_lm,
    save_reward_model,
};
use crate::rl::{
    self, RlCheckpoint, RlData, RlState, Samples, Throughput, dense, host, kl_k1, kl_k3, mean,
};
use crate::runner::{self, METRICS_FILE};
use crate::train::adamw::{self, AdamW, AdamWConfig};
use crate::train::{MetricsWriter, Schedule, StepRecord, TrainError};

/// The PPO settings of one stage.
#[derive(Debug, Clone)]
pub struct PpoSettings {
    pub kl_estimator: KlEstimator,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub ppo_epochs: u32,
    pub num_mini_batches: usize,
    /// Rows per forward pass.
    pub micro_batch: usize,
    pub temperature: f64,
    pub max_grad_norm: f64,
    pub pad_id: u32,
    pub seed: u64,
}

impl PpoSettings {
    fn from_params(p: &PpoParams, pad_id: u32, seed: u64) -> Self {
        Self {
            kl_estimator: p.kl_estimator,
            cliprange: p.cliprange,
            cliprange_value: p.cliprange_value,
            vf_coef: p.vf_coef,
            gamma: p.gamma,
            lam: p.lam,
            whiten_rewards: p.whiten_rewards,
            ppo_epochs: p.ppo_epochs,
            num_mini_batches: p.rollout.num_mini_batches as usize,
            micro_batch: p.train.batch_size as usize,
            temperature: p.rollout.temperature,
            max_grad_norm: p.train.max_grad_norm,
            pad_id,
            seed,
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
/// `policy` must be on the backend the update runs on (the autodiff one, untracked): Burn's
/// autodiff backend computes some operations (attention among them) differently from its inner
/// backend, which would make the first ratio differ from 1 in the last bits.
#[allow(clippy::too_many_arguments)]
pub fn prepare<P: Backend<Device = B::Device>, B: Backend>(
    policy: &CausalLm<P>,
    reference: &CausalLm<B>,
    value: &RewardModel<B>,
    samples: Samples,
    s: &PpoSettings,
    kl_coef: f64,
    iteration: u64,
    device: &B::Device,
) -> PpoBatch {
    let n = samples.rows.len();
    let partition =
        rl::epoch_minibatches(n, s.num_mini_batches, s.micro_batch, s.seed, iteration, 0);
    let logps = rl::rollout_logps(
        policy,
        &samples.rows,
        &partition,
        s.pad_id,
        s.temperature,
        device,
    );
    let ref_logps = rl::rollout_logps(
        reference,
        &samples.rows,
        &partition,
        s.pad_id,
        s.temperature,
        device,
    );
    let mut values = vec![Vec::new(); n];
    for micro in partition.iter().flatten() {
        let rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &samples.rows[i]).collect();
        let batch = CompletionBatch::<B>::new(&rows, s.pad_id, device);
        let [m, width] = batch.mask.dims();
        // V(s_t) is read at the position that predicts token t, as TRL's
        // `full_value[:, context_length - 1 : -1]`.
        let v = value
            .values(batch.ids.clone(), Some(&batch.padding))
            .slice([0..m, 0..width]);
        for (&i, row) in micro.iter().zip(rl::ragged(&host(v), width, &rows)) {
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
        rewards = rl::whiten(&rewards, false);
    }
    let mut advantages = Vec::with_capacity(n);
    let mut returns = Vec::with_capacity(n);
    for (r, v) in rewards.iter().zip(&values) {
        let v: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let (a, ret) = rl::gae(r, &v, s.gamma, s.lam);
        advantages.push(a);
        returns.push(ret.iter().map(|&x| x as f32).collect());
    }
    let advantages = rl::whiten(&advantages, true)
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

/// What the update measured.
#[derive(Debug, Clone, Default)]
pub struct UpdateStats {
    /// Per minibatch step: `pg_loss + vf_coef * vf_loss`, the losses, clip fractions, approx KL,
    /// mean ratio, pre-clip global grad norm.
    pub loss: Vec<f64>,
    pub pg_loss: Vec<f64>,
    pub vf_loss: Vec<f64>,
    pub pg_clipfrac: Vec<f64>,
    pub vf_clipfrac: Vec<f64>,
    pub approxkl: Vec<f64>,
    pub ratio: Vec<f64>,
    pub grad_norm: Vec<f64>,
    /// Largest `|ratio - 1|` over the first minibatch's tokens (0 when rollout and update
    /// log-probs agree exactly).
    pub first_ratio_deviation: f64,
    pub tokens: f64,
}

/// The models being trained and their optimisers.
pub struct Trainees<B: AutodiffBackend> {
    pub policy: CausalLm<B>,
    pub value: RewardModel<B>,
    pub policy_optim: AdamW<B::InnerBackend>,
    pub value_optim: AdamW<B::InnerBackend>,
}

struct MicroStats {
    pg_sum: f64,
    vf_sum: f64,
    pg_clipped: f64,
    vf_clipped: f64,
    approxkl_sum: f64,
    ratio_sum: f64,
    max_deviation: f64,
}

/// PPO's clipped surrogate per token: `max(-A r, -A clip(r, 1 - c, 1 + c))`, with both
/// terms (the second is larger where clipping is active).
pub fn clipped_policy_loss<B: Backend, const D: usize>(
    ratio: Tensor<B, D>,
    advantages: Tensor<B, D>,
    cliprange: f64,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let pg1 = advantages.clone().neg() * ratio.clone();
    let pg2 = advantages.neg() * ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
    (pg1.clone().max_pair(pg2.clone()), pg1, pg2)
}

/// The clipped value loss per token: `0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`,
/// with both squared errors.
pub fn clipped_value_loss<B: Backend, const D: usize>(
    vpred: Tensor<B, D>,
    old_values: Tensor<B, D>,
    returns: Tensor<B, D>,
    cliprange_value: f64,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let vclipped =
        old_values.clone() + (vpred.clone() - old_values).clamp(-cliprange_value, cliprange_value);
    let vf1 = (vpred - returns.clone()).powf_scalar(2.0);
    let vf2 = (vclipped - returns).powf_scalar(2.0);
    (vf1.clone().max_pair(vf2.clone()).mul_scalar(0.5), vf1, vf2)
}

/// The rows `micro` of per-row values.
fn pick<'a>(values: &'a [Vec<f32>], micro: &[usize]) -> Vec<&'a [f32]> {
    micro.iter().map(|&i| &values[i][..]).collect()
}

/// One micro-batch's summed losses (policy + vf_coef * value) and statistics.
fn micro_loss<B: AutodiffBackend>(
    t: &Trainees<B>,
    batch_data: &PpoBatch,
    micro: &[usize],
    s: &PpoSettings,
    device: &B::Device,
) -> (Tensor<B, 1>, MicroStats) {
    let rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &batch_data.samples.rows[i]).collect();
    let batch = CompletionBatch::<B>::new(&rows, s.pad_id, device);
    let [m, width] = batch.mask.dims();
    let mask = batch.mask.clone();
    let old = dense::<B>(&rows, &pick(&batch_data.logps, micro), device);
    let adv = dense::<B>(&rows, &pick(&batch_data.advantages, micro), device);
    let ret = dense::<B>(&rows, &pick(&batch_data.returns, micro), device);
    let old_v = dense::<B>(&rows, &pick(&batch_data.values, micro), device);

    let new = rl::policy_token_logps(&t.policy, &batch, s.temperature);
    let diff = (new - old) * mask.clone();
    let ratio = diff.clone().exp();
    let (pg, pg1, pg2) = clipped_policy_loss(ratio.clone(), adv, s.cliprange);
    let pg = pg * mask.clone();

    let vpred = t
        .value
        .values(batch.ids.clone(), Some(&batch.padding))
        .slice([0..m, 0..width]);
    let (vf, vf1, vf2) = clipped_value_loss(vpred, old_v, ret, s.cliprange_value);
    let vf = vf * mask.clone();

    let pg_sum = pg.sum();
    let vf_sum = vf.sum();
    let loss = pg_sum.clone() + vf_sum.clone().mul_scalar(s.vf_coef);

    let mask_i = mask.inner();
    let count = |a: Tensor<B::InnerBackend, 2>, b: Tensor<B::InnerBackend, 2>| -> f64 {
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
    let stats = MicroStats {
        pg_sum: f64::from(host(pg_sum.inner())[0]),
        vf_sum: f64::from(host(vf_sum.inner())[0]),
        pg_clipped: count(pg2.inner(), pg1.inner()),
        vf_clipped: count(vf2.inner(), vf1.inner()),
        approxkl_sum: 0.5 * f64::from(host((diff_i.clone() * diff_i).sum())[0]),
        ratio_sum: f64::from(host((ratio_i * mask_i).sum())[0]),
        max_deviation: f64::from(deviation),
    };
    (loss, stats)
}

/// `ppo_epochs` passes of minibatch updates over a prepared rollout at learning rate `lr`.
pub fn update<B: AutodiffBackend>(
    mut t: Trainees<B>,
    batch_data: &PpoBatch,
    s: &PpoSettings,
    iteration: u64,
    lr: f64,
    device: &B::Device,
) -> Result<(Trainees<B>, UpdateStats), TrainError>
where
    CausalLm<B>: AutodiffModule<B>,
    RewardModel<B>: AutodiffModule<B>,
{
    let mut stats = UpdateStats::default();
    let n = batch_data.samples.rows.len();
    for epoch in 0..s.ppo_epochs {
        let partition = rl::epoch_minibatches(
            n,
            s.num_mini_batches,
            s.micro_batch,
            s.seed,
            iteration,
            epoch,
        );
        for (k, minibatch) in partition.iter().enumerate() {
            let tokens: usize = minibatch
                .iter()
                .flatten()
                .map(|&i| batch_data.samples.rows[i].completion.len())
                .sum();
            if tokens == 0 {
                continue;
            }
            let tokens = tokens as f64;
            let mut acc_p = GradientsAccumulator::<CausalLm<B>>::new();
            let mut acc_v = GradientsAccumulator::<RewardModel<B>>::new();
            let mut sums = [0f64; 6];
            let mut deviation = 0f64;
            for micro in minibatch {
                let (loss, m) = micro_loss(&t, batch_data, micro, s, device);
                let mut grads = loss.div_scalar(tokens).backward();
                acc_p.accumulate(
                    &t.policy,
                    GradientsParams::from_module(&mut grads, &t.policy),
                );
                acc_v.accumulate(&t.value, GradientsParams::from_module(&mut grads, &t.value));
                for (sum, v) in sums.iter_mut().zip([
                    m.pg_sum,
                    m.vf_sum,
                    m.pg_clipped,
                    m.vf_clipped,
                    m.approxkl_sum,
                    m.ratio_sum,
                ]) {
                    *sum += v;
                }
                deviation = deviation.max(m.max_deviation);
            }
            let [pg, vf, pgc, vfc, akl, ratio] = sums.map(|x| x / tokens);
            let loss = pg + s.vf_coef * vf;
            let step = stats.loss.len() as u64 + 1;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "loss",
                    value: loss,
                });
            }
            let grads_p = acc_p.grads();
            let grads_v = acc_v.grads();
            let norm_p = adamw::global_grad_norm(&t.policy, &grads_p);
            let norm_v = adamw::global_grad_norm(&t.value, &grads_v);
            let grad_norm = (norm_p * norm_p + norm_v * norm_v).sqrt();
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "grad_norm",
                    value: grad_norm,
                });
            }
            let coef = adamw::clip_coefficient(grad_norm, s.max_grad_norm);
            t.policy = t.policy_optim.step(t.policy, grads_p, lr, coef);
            t.value = t.value_optim.step(t.value, grads_v, lr, coef);
            if epoch == 0 && k == 0 {
                stats.first_ratio_deviation = deviation;
            }
            stats.loss.push(loss);
            stats.pg_loss.push(pg);
            stats.vf_loss.push(vf);
            stats.pg_clipfrac.push(pgc);
            stats.vf_clipfrac.push(vfc);
            stats.approxkl.push(akl);
            stats.ratio.push(ratio);
            stats.grad_norm.push(grad_norm);
            stats.tokens += tokens;
        }
    }
    Ok((t, stats))
}

/// The iteration's line of `metrics.jsonl`, with TRL's names.
fn record(
    iteration: u64,
    epoch: f64,
    lr: f64,
    kl_coef: f64,
    b: &PpoBatch,
    u: &UpdateStats,
) -> StepRecord {
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
        ("policy/approxkl_avg", mean(&u.approxkl)),
        ("policy/clipfrac_avg", mean(&u.pg_clipfrac)),
        ("loss/policy_avg", mean(&u.pg_loss)),
        ("loss/value_avg", mean(&u.vf_loss)),
        ("val/clipfrac_avg", mean(&u.vf_clipfrac)),
        ("val/ratio", mean(&u.ratio)),
        ("val/num_eos_tokens", eos),
        ("completions/mean_length", mean(&lengths)),
    ];
    StepRecord {
        step: iteration + 1,
        epoch,
        loss: mean(&u.loss),
        learning_rate: lr,
        grad_norm: mean(&u.grad_norm),
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

/// Runs `ppo` stages.
pub struct PpoRunner;

impl Runner for PpoRunner {
    fn kind(&self) -> &'static str {
        "ppo"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_stage(ctx)?)
    }
}

fn run_stage(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<PpoParams>(ctx)?;
    rl::check_args(&params.rollout, &params.train, 1)?;
    let data = RlData::load(ctx)?;
    let reference_dir = data.model_or_policy(ctx, "reference")?;
    let value_dir = match (ctx.input("value_model"), &params.reward) {
        (Some(_), _) => data.model_or_policy(ctx, "value_model")?,
        (None, Judge::Node(_)) => data.model_or_policy(ctx, "reward")?,
        (None, _) => data.policy_dir.clone(),
    };
    let task = PpoTask {
        ctx,
        params,
        data: &data,
        reference_dir,
        value_dir,
    };
    let (summary, throughput) = dispatch_autodiff(runner::backend(ctx)?, task)??;
    ctx.progress.println(&throughput.line("ppo"));
    data.tokenizer.save(ctx.out_dir)?;
    data.tokenizer.save(&ctx.out_dir.join("value"))?;
    Ok(StageOutcome { summary })
}

struct PpoTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    params: &'a PpoParams,
    data: &'a RlData,
    reference_dir: PathBuf,
    value_dir: PathBuf,
}

type Summary = std::collections::BTreeMap<String, f64>;

impl AutodiffTask for PpoTask<'_, '_> {
    type Output = Result<(Summary, Throughput), TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (ctx, p, data) = (self.ctx, self.params, self.data);
        let (policy_cfg, policy) = load_causal_lm::<B>(&data.policy_dir, &device)?;
        let (_, reference) = load_causal_lm::<B::InnerBackend>(&self.reference_dir, &device)?;
        let (value_cfg, value) =
            reward_model_from_causal_lm::<B>(&self.value_dir, ctx.seed, &device)?;
        let scorer = rl::reward_scorer::<B::InnerBackend>(
            ctx,
            &p.reward,
            p.train.batch_size as usize,
            &device,
        )?;
        let s = PpoSettings::from_params(p, data.pad_id, ctx.seed);
        let total = p.rollout.num_iterations;
        let schedule = Schedule::new(
            runner::train_config(p.learning_rate, &p.train, ctx.seed, None).schedule,
            p.learning_rate,
            p.train.warmup_steps,
            p.train.warmup_ratio,
            total,
        );
        let adamw = AdamWConfig {
            beta1: p.train.adam_beta1,
            beta2: p.train.adam_beta2,
            epsilon: p.train.adam_epsilon,
            weight_decay: p.train.weight_decay,
        };
        let checkpoint = RlCheckpoint::new(ctx.work_dir, p.train.checkpoint_every);
        let prompts = data.prompts.len();
        let restored_p = checkpoint.load::<B, _>(
            "policy",
            policy,
            AdamW::new(adamw),
            prompts,
            total,
            &device,
        )?;
        let restored_v =
            checkpoint.load::<B, _>("value", value, AdamW::new(adamw), prompts, total, &device)?;
        let state = checkpoint.state()?.unwrap_or(RlState {
            kl_coef: p.kl_coef,
            rollouts: Vec::new(),
        });
        let mut kl_coef = state.kl_coef;
        let mut rollouts = state.rollouts;
        let mut steps = restored_p.steps;
        let mut t = Trainees {
            policy: restored_p.model,
            value: restored_v.model,
            policy_optim: restored_p.optim,
            value_optim: restored_v.optim,
        };
        let mut writer =
            MetricsWriter::create(&ctx.out_dir.join(METRICS_FILE), p.train.logging_steps)?
                .report_to(&p.train.report_to)?;
        writer.replay(&steps)?;
        ctx.progress.set_length(total);
        ctx.progress.set_position(steps.len() as u64);
        let batch_size = p.rollout.rollout_batch_size as usize;
        let mut throughput = Throughput::default();
        let save = |t: &Trainees<B>, steps: &[StepRecord], kl_coef: f64, rollouts: &[String]| {
            checkpoint.save::<B, _, _>(
                (&t.policy, &t.policy_optim),
                Some((&t.value, &t.value_optim)),
                steps,
                prompts,
                total,
                &RlState {
                    kl_coef,
                    rollouts: rollouts.to_vec(),
                },
            )
        };
        for iteration in steps.len() as u64..total {
            if ctx.is_interrupted() {
                if iteration > 0 {
                    save(&t, &steps, kl_coef, &rollouts)?;
                }
                return Err(TrainError::Interrupted {
                    step: iteration + 1,
                });
            }
            let started = Instant::now();
            let policy_inner = t.policy.valid();
            let index = rl::prompt_batch(prompts, batch_size, ctx.seed, iteration);
            let samples = rl::sample_and_score(
                &policy_inner,
                data,
                &scorer,
                index,
                &p.rollout,
                rl::mix(ctx.seed, iteration),
                &device,
            )?;
            let batch = prepare(
                &t.policy.clone().no_grad(),
                &reference,
                &t.value.valid(),
                samples,
                &s,
                kl_coef,
                iteration,
                &device,
            );
            drop(policy_inner);
            throughput.rollout_tokens += batch.samples.tokens() as f64;
            throughput.rollout_seconds += started.elapsed().as_secs_f64();
            let started = Instant::now();
            let lr = schedule.lr(iteration);
            let (trained, stats) = update(t, &batch, &s, iteration, lr, &device)?;
            t = trained;
            throughput.update_tokens += stats.tokens;
            throughput.update_seconds += started.elapsed().as_secs_f64();
            if p.rollout.save_rollouts {
                rollouts.extend(rl::rollout_lines(
                    iteration,
                    data,
                    &batch.samples,
                    &batch.kl,
                ));
            }
            let epoch = ((iteration + 1) * batch_size as u64) as f64 / prompts as f64;
            let rec = record(iteration, epoch, lr, kl_coef, &batch, &stats);
            if let Some(adaptive) = &p.adaptive_kl {
                kl_coef = adapt_kl(
                    kl_coef,
                    mean(&batch.kl),
                    adaptive.target,
                    adaptive.horizon,
                    batch.samples.rows.len(),
                );
            }
            writer.record(&rec, iteration + 1 == total)?;
            ctx.progress.set_position(iteration + 1);
            ctx.progress.set_message(format!(
                "score {:.3}, kl {:.3}",
                rec.metrics["objective/scores"], rec.metrics["objective/kl"]
            ));
            steps.push(rec);
            let done = iteration + 1;
            if checkpoint.every > 0 && done.is_multiple_of(checkpoint.every) && done < total {
                save(&t, &steps, kl_coef, &rollouts)?;
            }
        }
        save_causal_lm(&t.policy, &policy_cfg, ctx.out_dir)?;
        let value_dir = ctx.out_dir.join("value");
        std::fs::create_dir_all(&value_dir).map_err(|e| TrainError::io(&value_dir, e))?;
        save_reward_model(&t.value, &value_cfg, &value_dir)?;
        if p.rollout.save_rollouts {
            rl::write_lines(&ctx.out_dir.join(rl::ROLLOUTS_FILE), &rollouts)?;
        }
        Ok((summary(&steps), throughput))
    }
}

/// The last iteration's metrics, for the manifest.
pub fn summary(steps: &[StepRecord]) -> Summary {
    let mut out = Summary::new();
    if let Some(last) = steps.last() {
        out.insert("loss".into(), last.loss);
        out.insert("steps".into(), last.step as f64);
        for (k, v) in &last.metrics {
            out.insert(k.clone(), *v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::model::{ModelConfig, random_causal_lm, random_reward_model};
    use burn::backend::Autodiff;

    type AB = Autodiff<TestBackend>;

    fn settings() -> PpoSettings {
        PpoSettings {
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            ppo_epochs: 2,
            num_mini_batches: 2,
            micro_batch: 2,
            temperature: 0.7,
            max_grad_norm: 1.0,
            pad_id: 0,
            seed: 3,
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
        let device = Default::default();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm::<AB>(&cfg, 1, &device);
        let reference = random_causal_lm::<TestBackend>(&cfg, 2, &device);
        let value = random_reward_model::<AB>(&cfg, 3, &device);
        let s = settings();
        let batch = prepare(
            &policy.clone().no_grad(),
            &reference,
            &value.valid(),
            samples(),
            &s,
            0.05,
            0,
            &device,
        );
        let t = Trainees {
            policy,
            value,
            policy_optim: AdamW::new(AdamWConfig::default()),
            value_optim: AdamW::new(AdamWConfig::default()),
        };
        let (_, stats) = update(t, &batch, &s, 0, 1e-2, &device).unwrap();
        assert_eq!(stats.first_ratio_deviation, 0.0);
        assert_eq!(stats.pg_clipfrac[0], 0.0);
        // Later minibatches see updated parameters.
        assert_eq!(stats.loss.len(), 4);
        assert!(
            stats.ratio[1..].iter().any(|r| *r != 1.0),
            "{:?}",
            stats.ratio
        );
        assert!(stats.loss.iter().all(|l| l.is_finite()));
    }

    #[test]
    fn rewards_put_the_score_on_the_last_token() {
        let device = Default::default();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm::<TestBackend>(&cfg, 1, &device);
        let value = random_reward_model::<TestBackend>(&cfg, 3, &device);
        let mut s = settings();
        s.lam = 1.0;
        // Reference = policy: zero KL, so with gamma = lam = 1 the unwhitened advantage of
        // token t is score - V_t.
        let batch = prepare(&policy, &policy, &value, samples(), &s, 0.05, 0, &device);
        assert!(batch.kl.iter().all(|&k| k == 0.0));
        for (i, ret) in batch.returns.iter().enumerate() {
            for r in ret {
                assert!((f64::from(*r) - batch.samples.scores[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn clipped_losses_match_hand_values() {
        let device = Default::default();
        let t = |v: [f32; 3]| Tensor::<TestBackend, 1>::from_floats(v, &device);
        // Ratios 1.5, 0.5, 1.1 with advantages 1, 1, -2 and cliprange 0.2:
        // max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2.
        let (pg, pg1, pg2) = clipped_policy_loss(t([1.5, 0.5, 1.1]), t([1.0, 1.0, -2.0]), 0.2);
        let pg = host(pg);
        let want = [-1.2f32, -0.5, 2.2];
        for (a, b) in pg.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{pg:?}");
        }
        assert_eq!(host(pg2.greater(pg1).float()), vec![1.0, 0.0, 0.0]);
        // Old values 0, 0, 1; predictions 0.5, 0.1, 0.5; returns 1, 1, 0; cliprange 0.2:
        // row 0: (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.32 (clipped);
        // row 1: 0.81 vs 0.81 -> 0.405; row 2: 0.25 vs (0.8-0)^2 = 0.64 -> 0.32 (clipped).
        let (vf, vf1, vf2) = clipped_value_loss(
            t([0.5, 0.1, 0.5]),
            t([0.0, 0.0, 1.0]),
            t([1.0, 1.0, 0.0]),
            0.2,
        );
        let vf = host(vf);
        for (a, b) in vf.iter().zip([0.32f32, 0.405, 0.32]) {
            assert!((a - b).abs() < 1e-6, "{vf:?}");
        }
        assert_eq!(host(vf2.greater(vf1).float()), vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target() {
        // KL twice the target: error clipped to 0.2; coef * (1 + 0.2 * 16 / 100).
        assert!((adapt_kl(0.1, 2.0, 1.0, 100, 16) - 0.1 * 1.032).abs() < 1e-12);
        assert!(adapt_kl(0.1, 0.5, 1.0, 100, 16) < 0.1);
    }
}
