//! The critic-free kinds `rloo` and `grpo`: each iteration samples `num_generations` responses
//! for each of `rollout_batch_size` prompts and baselines every response against its group.
//!
//! - RLOO (TRL's `RLOOTrainer`): the reward is the score less `beta` times the sequence's
//!   summed k1 KL to the reference; the advantage is the reward minus the mean reward of the
//!   other responses to the same prompt; the clipped objective is on the sequence-level ratio
//!   `exp(sum log p - sum log p_old)`, averaged over sequences.
//! - GRPO (TRL's `GRPOTrainer`): the advantage is the score minus its group's mean, divided by
//!   the group's standard deviation + 1e-4 with `scale_rewards`; the clipped objective is per
//!   token (`epsilon`), plus `beta` times the k3 KL to the reference per token when `beta > 0`;
//!   the loss is aggregated by `loss_type`: `grpo` (per-sequence token means, averaged),
//!   `bnpo` and `dapo` (token mean over the minibatch: TRL's dapo divides by the tokens of the
//!   whole accumulated batch, which a minibatch is here), `dr_grpo` (token sum over rows times
//!   `response_length`).
//!
//! Every minibatch is one AdamW step; `ppo_epochs` passes over `num_mini_batches` shuffled
//! minibatches per rollout. The artifact is the policy with its tokenizer, `metrics.jsonl` and,
//! with `save_rollouts`, `rollouts.jsonl`.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::{GrpoLossType, GrpoParams, Judge, RlooParams, RolloutArgs, TrainArgs};

use super::{RlCheckpoint, RlData, RlState, Samples, Throughput, dense, host, kl_k1, kl_k3, mean};
use crate::backend::{AutodiffTask, dispatch_autodiff};
use crate::logps::{CompletionBatch, PromptCompletion};
use crate::model::{CausalLm, load_causal_lm, save_causal_lm};
use crate::ppo::{clipped_policy_loss, summary};
use crate::rl;
use crate::runner::{self, METRICS_FILE};
use crate::train::adamw::{self, AdamW, AdamWConfig};
use crate::train::{MetricsWriter, Schedule, StepRecord, TrainError};

/// Which critic-free algorithm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    Rloo,
    Grpo {
        loss_type: GrpoLossType,
        scale_rewards: bool,
    },
}

/// The settings of one `rloo` or `grpo` stage.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub algorithm: Algorithm,
    pub num_generations: usize,
    pub beta: f64,
    pub cliprange: f64,
    pub ppo_epochs: u32,
    pub num_mini_batches: usize,
    pub micro_batch: usize,
    pub temperature: f64,
    pub response_length: usize,
    pub max_grad_norm: f64,
    pub pad_id: u32,
    pub seed: u64,
}

/// A scored group rollout.
pub struct GroupBatch {
    pub samples: Samples,
    pub logps: Vec<Vec<f32>>,
    /// Empty when `beta` is 0 (no reference).
    pub ref_logps: Vec<Vec<f32>>,
    pub advantages: Vec<f64>,
    /// Per response: the summed KL estimate (k1 for RLOO, k3 for GRPO; 0 without reference).
    pub kl: Vec<f64>,
    pub group_std: Vec<f64>,
}

/// Old and reference log-probs over the first epoch's micro-batches, then the advantages.
/// `policy` is on the update's (autodiff) backend, for the reason given in `ppo::prepare`.
pub fn prepare<P: Backend<Device = B::Device>, B: Backend>(
    policy: &CausalLm<P>,
    reference: Option<&CausalLm<B>>,
    samples: Samples,
    s: &GroupSettings,
    iteration: u64,
    device: &B::Device,
) -> GroupBatch {
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
    let ref_logps = match reference {
        Some(r) => rl::rollout_logps(
            r,
            &samples.rows,
            &partition,
            s.pad_id,
            s.temperature,
            device,
        ),
        None => Vec::new(),
    };
    let kl: Vec<f64> = (0..n)
        .map(|i| match ref_logps.get(i) {
            None => 0.0,
            Some(refs) => logps[i]
                .iter()
                .zip(refs)
                .map(|(&p, &q)| match s.algorithm {
                    Algorithm::Rloo => kl_k1(f64::from(p), f64::from(q)),
                    Algorithm::Grpo { .. } => kl_k3(f64::from(p), f64::from(q)),
                })
                .sum(),
        })
        .collect();
    let k = s.num_generations;
    let (advantages, group_std) = match s.algorithm {
        Algorithm::Rloo => {
            let rewards: Vec<f64> = samples
                .scores
                .iter()
                .zip(&kl)
                .map(|(score, kl)| score - s.beta * kl)
                .collect();
            let stds = rl::group_advantages(&rewards, k, false).1;
            (rl::leave_one_out(&rewards, k), stds)
        }
        Algorithm::Grpo { scale_rewards, .. } => {
            rl::group_advantages(&samples.scores, k, scale_rewards)
        }
    };
    GroupBatch {
        samples,
        logps,
        ref_logps,
        advantages,
        kl,
        group_std,
    }
}

/// What an update measured, per minibatch step.
#[derive(Debug, Clone, Default)]
pub struct GroupStats {
    pub loss: Vec<f64>,
    pub clip_ratio: Vec<f64>,
    pub grad_norm: Vec<f64>,
    pub first_ratio_deviation: f64,
    pub tokens: f64,
}

/// What a minibatch's loss sum is divided by.
fn weight(s: &GroupSettings, rows: usize, tokens: usize) -> f64 {
    match s.algorithm {
        Algorithm::Rloo => rows as f64,
        Algorithm::Grpo { loss_type, .. } => match loss_type {
            GrpoLossType::Grpo => rows as f64,
            GrpoLossType::Bnpo | GrpoLossType::Dapo => tokens as f64,
            GrpoLossType::DrGrpo => (rows * s.response_length) as f64,
        },
    }
}

fn refs(values: &[Vec<f32>]) -> Vec<&[f32]> {
    values.iter().map(|r| &r[..]).collect()
}

/// A micro-batch's summed loss, its clipped count and what that count is out of, and the
/// largest `|ratio - 1|`.
fn micro_loss<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    b: &GroupBatch,
    micro: &[usize],
    s: &GroupSettings,
    device: &B::Device,
) -> (Tensor<B, 1>, f64, f64, f64) {
    let rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &b.samples.rows[i]).collect();
    let per_row =
        |v: &[Vec<f32>]| -> Vec<Vec<f32>> { micro.iter().map(|&i| v[i].clone()).collect() };
    let batch = CompletionBatch::<B>::new(&rows, s.pad_id, device);
    let [m, width] = batch.mask.dims();
    let mask = batch.mask.clone();
    let old_rows = per_row(&b.logps);
    let old = dense::<B>(&rows, &refs(&old_rows), device);
    let new = rl::policy_token_logps(policy, &batch, s.temperature);
    let adv: Vec<f32> = micro.iter().map(|&i| b.advantages[i] as f32).collect();
    match s.algorithm {
        Algorithm::Rloo => {
            let diff = (new.clone() - old).sum_dim(1).reshape([m]);
            let ratio = diff.exp();
            let adv = Tensor::<B, 1>::from_floats(adv.as_slice(), device);
            let (loss, l1, l2) = clipped_policy_loss(ratio.clone(), adv, s.cliprange);
            let clipped = f64::from(host(l2.inner().greater(l1.inner()).float().sum())[0]);
            let deviation = f64::from(host(ratio.inner().sub_scalar(1.0).abs().max())[0]);
            (loss.sum(), clipped, m as f64, deviation)
        }
        Algorithm::Grpo { loss_type, .. } => {
            let adv_rows: Vec<Vec<f32>> = rows
                .iter()
                .zip(&adv)
                .map(|(r, &a)| vec![a; r.completion.len()])
                .collect();
            let adv = dense::<B>(&rows, &refs(&adv_rows), device);
            let ratio = ((new.clone() - old) * mask.clone()).exp();
            let (mut loss, l1, l2) = clipped_policy_loss(ratio.clone(), adv, s.cliprange);
            if s.beta > 0.0 {
                let ref_rows = per_row(&b.ref_logps);
                let reference = dense::<B>(&rows, &refs(&ref_rows), device);
                let logr = reference - new;
                let k3 = logr.clone().exp() - logr - 1.0;
                loss = loss + k3.mul_scalar(s.beta);
            }
            let mut loss = loss * mask.clone();
            if loss_type == GrpoLossType::Grpo {
                let inv: Vec<Vec<f32>> = rows
                    .iter()
                    .map(|r| vec![1.0 / r.completion.len().max(1) as f32; r.completion.len()])
                    .collect();
                loss = loss * dense::<B>(&rows, &refs(&inv), device);
            }
            let mask_i = mask.inner();
            let clipped =
                f64::from(host((l2.inner().greater(l1.inner()).float() * mask_i.clone()).sum())[0]);
            let tokens: usize = rows.iter().map(|r| r.completion.len()).sum();
            let deviation =
                f64::from(host((ratio.inner().sub_scalar(1.0) * mask_i).abs().max())[0]);
            let _ = width;
            (loss.sum(), clipped, tokens as f64, deviation)
        }
    }
}

/// `ppo_epochs` passes of minibatch updates of the policy.
pub fn update<B: AutodiffBackend>(
    mut policy: CausalLm<B>,
    optim: &mut AdamW<B::InnerBackend>,
    b: &GroupBatch,
    s: &GroupSettings,
    iteration: u64,
    lr: f64,
    device: &B::Device,
) -> Result<(CausalLm<B>, GroupStats), TrainError>
where
    CausalLm<B>: AutodiffModule<B>,
{
    let mut stats = GroupStats::default();
    let n = b.samples.rows.len();
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
            let rows = minibatch.iter().map(Vec::len).sum();
            let tokens: usize = minibatch
                .iter()
                .flatten()
                .map(|&i| b.samples.rows[i].completion.len())
                .sum();
            let w = weight(s, rows, tokens);
            if w <= 0.0 {
                continue;
            }
            let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
            let (mut loss, mut clipped, mut out_of, mut deviation) = (0.0, 0.0, 0.0, 0f64);
            for micro in minibatch {
                let (l, c, o, d) = micro_loss(&policy, b, micro, s, device);
                let scaled = l.div_scalar(w);
                loss += f64::from(host(scaled.clone().inner())[0]);
                let grads = GradientsParams::from_grads(scaled.backward(), &policy);
                acc.accumulate(&policy, grads);
                clipped += c;
                out_of += o;
                deviation = deviation.max(d);
            }
            let step = stats.loss.len() as u64 + 1;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "loss",
                    value: loss,
                });
            }
            let grads = acc.grads();
            let grad_norm = adamw::global_grad_norm(&policy, &grads);
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "grad_norm",
                    value: grad_norm,
                });
            }
            let coef = adamw::clip_coefficient(grad_norm, s.max_grad_norm);
            policy = optim.step(policy, grads, lr, coef);
            if epoch == 0 && k == 0 {
                stats.first_ratio_deviation = deviation;
            }
            stats.loss.push(loss);
            stats
                .clip_ratio
                .push(if out_of > 0.0 { clipped / out_of } else { 0.0 });
            stats.grad_norm.push(grad_norm);
            stats.tokens += tokens as f64;
        }
    }
    Ok((policy, stats))
}

/// The iteration's metrics, with TRL's names.
fn record(iteration: u64, epoch: f64, lr: f64, b: &GroupBatch, u: &GroupStats) -> StepRecord {
    let scores = &b.samples.scores;
    let reward = mean(scores);
    let reward_std = if scores.len() > 1 {
        (scores.iter().map(|r| (r - reward).powi(2)).sum::<f64>() / (scores.len() - 1) as f64)
            .sqrt()
    } else {
        0.0
    };
    let tokens: usize = b.samples.tokens();
    let lengths: Vec<f64> = b
        .samples
        .rows
        .iter()
        .map(|r| r.completion.len() as f64)
        .collect();
    let no_eos = b.samples.eos.iter().filter(|&&e| !e).count() as f64;
    let zero_std = b.group_std.iter().filter(|&&s| s.abs() < 1e-8).count() as f64;
    let mut metrics: BTreeMap<String, f64> = [
        ("reward", reward),
        ("reward_std", reward_std),
        ("objective/scores", reward),
        ("kl", b.kl.iter().sum::<f64>() / tokens.max(1) as f64),
        ("objective/kl", mean(&b.kl)),
        ("clip_ratio/region_mean", mean(&u.clip_ratio)),
        ("completions/mean_length", mean(&lengths)),
        (
            "completions/clipped_ratio",
            no_eos / lengths.len().max(1) as f64,
        ),
        (
            "frac_reward_zero_std",
            zero_std / b.group_std.len().max(1) as f64,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    metrics.insert(
        "entropy".into(),
        mean(
            &b.logps
                .iter()
                .map(|l| -l.iter().map(|&x| f64::from(x)).sum::<f64>())
                .collect::<Vec<_>>(),
        ),
    );
    StepRecord {
        step: iteration + 1,
        epoch,
        loss: mean(&u.loss),
        learning_rate: lr,
        grad_norm: mean(&u.grad_norm),
        metrics,
        cumulative: Vec::new(),
    }
}

/// The parameters RLOO and GRPO share.
struct GroupParams<'a> {
    reward: &'a Judge,
    learning_rate: f64,
    rollout: &'a RolloutArgs,
    train: &'a TrainArgs,
    num_generations: u32,
    beta: f64,
    cliprange: f64,
    ppo_epochs: u32,
    algorithm: Algorithm,
}

/// Runs `rloo` stages.
pub struct RlooRunner;

impl Runner for RlooRunner {
    fn kind(&self) -> &'static str {
        "rloo"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        let p = runner::params::<RlooParams>(ctx)?;
        Ok(run_stage(
            ctx,
            GroupParams {
                reward: &p.reward,
                learning_rate: p.learning_rate,
                rollout: &p.rollout,
                train: &p.train,
                num_generations: p.num_generations,
                beta: p.beta,
                cliprange: p.cliprange,
                ppo_epochs: p.ppo_epochs,
                algorithm: Algorithm::Rloo,
            },
        )?)
    }
}

/// Runs `grpo` stages.
pub struct GrpoRunner;

impl Runner for GrpoRunner {
    fn kind(&self) -> &'static str {
        "grpo"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        let p = runner::params::<GrpoParams>(ctx)?;
        Ok(run_stage(
            ctx,
            GroupParams {
                reward: &p.reward,
                learning_rate: p.learning_rate,
                rollout: &p.rollout,
                train: &p.train,
                num_generations: p.num_generations,
                beta: p.beta,
                cliprange: p.epsilon,
                ppo_epochs: p.ppo_epochs,
                algorithm: Algorithm::Grpo {
                    loss_type: p.loss_type,
                    scale_rewards: p.scale_rewards,
                },
            },
        )?)
    }
}

fn run_stage(ctx: &StageContext<'_>, p: GroupParams<'_>) -> Result<StageOutcome, TrainError> {
    rl::check_args(p.rollout, p.train, p.num_generations)?;
    if p.num_generations < 2 {
        return Err(TrainError::Config(
            "num_generations must be at least 2 to baseline a response against its group".into(),
        ));
    }
    let data = RlData::load(ctx)?;
    let reference_dir = data.model_or_policy(ctx, "reference")?;
    let kind = match p.algorithm {
        Algorithm::Rloo => "rloo",
        Algorithm::Grpo { .. } => "grpo",
    };
    let task = GroupTask {
        ctx,
        p,
        data: &data,
        reference_dir,
    };
    let (summary, throughput) = dispatch_autodiff(runner::backend(ctx)?, task)??;
    ctx.progress.println(&throughput.line(kind));
    data.tokenizer.save(ctx.out_dir)?;
    Ok(StageOutcome { summary })
}

struct GroupTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    p: GroupParams<'a>,
    data: &'a RlData,
    reference_dir: std::path::PathBuf,
}

impl AutodiffTask for GroupTask<'_, '_> {
    type Output = Result<(BTreeMap<String, f64>, Throughput), TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (ctx, p, data) = (self.ctx, &self.p, self.data);
        let (policy_cfg, policy) = load_causal_lm::<B>(&data.policy_dir, &device)?;
        let reference = if p.beta > 0.0 {
            Some(load_causal_lm::<B::InnerBackend>(&self.reference_dir, &device)?.1)
        } else {
            None
        };
        let scorer = rl::reward_scorer::<B::InnerBackend>(
            ctx,
            p.reward,
            p.train.batch_size as usize,
            &device,
        )?;
        let s = GroupSettings {
            algorithm: p.algorithm,
            num_generations: p.num_generations as usize,
            beta: p.beta,
            cliprange: p.cliprange,
            ppo_epochs: p.ppo_epochs,
            num_mini_batches: p.rollout.num_mini_batches as usize,
            micro_batch: p.train.batch_size as usize,
            temperature: p.rollout.temperature,
            response_length: p.rollout.response_length as usize,
            max_grad_norm: p.train.max_grad_norm,
            pad_id: data.pad_id,
            seed: ctx.seed,
        };
        let total = p.rollout.num_iterations;
        let schedule = Schedule::new(
            runner::train_config(p.learning_rate, p.train, ctx.seed, None).schedule,
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
        let restored = checkpoint.load::<B, _>(
            "policy",
            policy,
            AdamW::new(adamw),
            prompts,
            total,
            &device,
        )?;
        let mut rollouts = checkpoint.state()?.map(|s| s.rollouts).unwrap_or_default();
        let mut steps = restored.steps;
        let mut policy = restored.model;
        let mut optim = restored.optim;
        let mut writer =
            MetricsWriter::create(&ctx.out_dir.join(METRICS_FILE), p.train.logging_steps)?
                .report_to(&p.train.report_to)?;
        writer.replay(&steps)?;
        ctx.progress.set_length(total);
        ctx.progress.set_position(steps.len() as u64);
        let batch_size = p.rollout.rollout_batch_size as usize;
        let mut throughput = Throughput::default();
        let save = |policy: &CausalLm<B>,
                    optim: &AdamW<B::InnerBackend>,
                    steps: &[StepRecord],
                    rollouts: &[String]| {
            checkpoint.save::<B, CausalLm<B>, CausalLm<B>>(
                (policy, optim),
                None,
                steps,
                prompts,
                total,
                &RlState {
                    kl_coef: p.beta,
                    rollouts: rollouts.to_vec(),
                },
            )
        };
        for iteration in steps.len() as u64..total {
            if ctx.is_interrupted() {
                if iteration > 0 {
                    save(&policy, &optim, &steps, &rollouts)?;
                }
                return Err(TrainError::Interrupted {
                    step: iteration + 1,
                });
            }
            let started = Instant::now();
            let policy_inner = policy.valid();
            let index: Vec<usize> = rl::prompt_batch(prompts, batch_size, ctx.seed, iteration)
                .into_iter()
                .flat_map(|i| std::iter::repeat_n(i, s.num_generations))
                .collect();
            let samples = rl::sample_and_score(
                &policy_inner,
                data,
                &scorer,
                index,
                p.rollout,
                rl::mix(ctx.seed, iteration),
                &device,
            )?;
            let batch = prepare(
                &policy.clone().no_grad(),
                reference.as_ref(),
                samples,
                &s,
                iteration,
                &device,
            );
            drop(policy_inner);
            throughput.rollout_tokens += batch.samples.tokens() as f64;
            throughput.rollout_seconds += started.elapsed().as_secs_f64();
            let started = Instant::now();
            let lr = schedule.lr(iteration);
            let (trained, stats) = update(policy, &mut optim, &batch, &s, iteration, lr, &device)?;
            policy = trained;
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
            let rec = record(iteration, epoch, lr, &batch, &stats);
            writer.record(&rec, iteration + 1 == total)?;
            ctx.progress.set_position(iteration + 1);
            ctx.progress
                .set_message(format!("reward {:.3}", rec.metrics["reward"]));
            steps.push(rec);
            let done = iteration + 1;
            if checkpoint.every > 0 && done.is_multiple_of(checkpoint.every) && done < total {
                save(&policy, &optim, &steps, &rollouts)?;
            }
        }
        save_causal_lm(&policy, &policy_cfg, ctx.out_dir)?;
        if p.rollout.save_rollouts {
            rl::write_lines(&ctx.out_dir.join(rl::ROLLOUTS_FILE), &rollouts)?;
        }
        Ok((summary(&steps), throughput))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::model::{ModelConfig, random_causal_lm};
    use burn::backend::Autodiff;

    type AB = Autodiff<TestBackend>;

    fn samples() -> Samples {
        let rows: Vec<PromptCompletion> = (0..8)
            .map(|i| PromptCompletion {
                prompt: vec![1, 2 + (i / 4) as u32],
                completion: (0..2 + (i * 3) % 4).map(|t| (5 + t + i) as u32).collect(),
            })
            .collect();
        let n = rows.len();
        Samples {
            prompt_index: (0..n).map(|i| i / 4).collect(),
            responses: vec![String::new(); n],
            eos: vec![true; n],
            scores: (0..n).map(|i| ((i * 7) % 5) as f64 * 0.25).collect(),
            rows,
        }
    }

    fn settings(algorithm: Algorithm, beta: f64) -> GroupSettings {
        GroupSettings {
            algorithm,
            num_generations: 4,
            beta,
            cliprange: 0.2,
            ppo_epochs: 2,
            num_mini_batches: 2,
            micro_batch: 3,
            temperature: 0.9,
            response_length: 6,
            max_grad_norm: 1.0,
            pad_id: 0,
            seed: 5,
        }
    }

    #[test]
    fn first_update_ratio_is_exactly_one_for_every_algorithm() {
        let device = Default::default();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let reference = random_causal_lm::<TestBackend>(&cfg, 2, &device);
        for (algorithm, beta) in [
            (Algorithm::Rloo, 0.05),
            (
                Algorithm::Grpo {
                    loss_type: GrpoLossType::Grpo,
                    scale_rewards: true,
                },
                0.04,
            ),
            (
                Algorithm::Grpo {
                    loss_type: GrpoLossType::Dapo,
                    scale_rewards: false,
                },
                0.0,
            ),
            (
                Algorithm::Grpo {
                    loss_type: GrpoLossType::DrGrpo,
                    scale_rewards: true,
                },
                0.0,
            ),
        ] {
            let policy = random_causal_lm::<AB>(&cfg, 1, &device);
            let s = settings(algorithm, beta);
            let reference = (beta > 0.0).then_some(&reference);
            let b = prepare(
                &policy.clone().no_grad(),
                reference,
                samples(),
                &s,
                0,
                &device,
            );
            let mut optim = AdamW::new(AdamWConfig::default());
            let (_, stats) = update(policy, &mut optim, &b, &s, 0, 1e-2, &device).unwrap();
            assert_eq!(stats.first_ratio_deviation, 0.0, "{algorithm:?}");
            assert_eq!(stats.clip_ratio[0], 0.0, "{algorithm:?}");
            assert_eq!(stats.loss.len(), 4);
            assert!(stats.loss.iter().all(|l| l.is_finite()), "{algorithm:?}");
            assert_eq!(optim.step, 4);
        }
    }

    #[test]
    fn rloo_penalises_kl_before_the_leave_one_out_baseline() {
        let device = Default::default();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm::<TestBackend>(&cfg, 1, &device);
        let reference = random_causal_lm::<TestBackend>(&cfg, 2, &device);
        let s = settings(Algorithm::Rloo, 0.5);
        let b = prepare::<TestBackend, TestBackend>(
            &policy,
            Some(&reference),
            samples(),
            &s,
            0,
            &device,
        );
        let rewards: Vec<f64> = b
            .samples
            .scores
            .iter()
            .zip(&b.kl)
            .map(|(r, k)| r - 0.5 * k)
            .collect();
        let want = rl::leave_one_out(&rewards, 4);
        for (a, w) in b.advantages.iter().zip(want) {
            assert!((a - w).abs() < 1e-12);
        }
        // Advantages of a group sum to zero.
        assert!(b.advantages[..4].iter().sum::<f64>().abs() < 1e-9);
    }
}
