//! The online-RL loop, written once for every algorithm (`ppo`, `rloo`, `grpo`; an online DPO
//! would be a fourth [`Algorithm`]). Each iteration:
//!
//! ```text
//!   prompts(seed, iteration) -> sample + score with the policy -> Algorithm::prepare
//!     (old log-probs, reference, values, advantages) -> ppo_epochs x num_mini_batches
//!     minibatch steps (micro-batches of batch_size, gradients accumulated, one global-norm
//!     clip over every trained module, one AdamW step each) -> Algorithm::record -> metrics,
//!     checkpoint, adaptive KL
//! ```
//!
//! The rollout evaluates the old policy over exactly the micro-batches that the first update
//! epoch uses, in the same order, so the first minibatch's probability ratio is exactly 1. The
//! learning rate follows `lr_scheduler_type` over `num_iterations`. What the algorithms compute
//! is in their kind modules; the rollout machinery is `rollout`'s, the resumable state
//! `checkpoint`'s, what RLOO and GRPO share `group`'s.

pub mod checkpoint;
pub mod group;
pub mod rollout;

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_schema::kinds::{RolloutArgs, TrainArgs};

pub use checkpoint::{RlCheckpoint, RlState};
pub use rollout::{RlData, Samples, Throughput};

use crate::artifacts::METRICS_FILE;
use crate::judge::Scorer;
use crate::kind::Stage;
use crate::model::{CausalLm, RewardModel};
use crate::padding::Pad;
use crate::seeds;
use crate::train::adamw::{self, AdamW, AdamWConfig};
use crate::train::{MetricsWriter, Schedule, StepRecord, TrainError};

/// The per-iteration rollouts an artifact holds when `save_rollouts` is set.
pub const ROLLOUTS_FILE: &str = "rollouts.jsonl";

/// The models an online-RL stage trains, each with its optimiser: the policy and, for PPO, the
/// value model.
pub struct Trainees {
    pub policy: CausalLm,
    pub policy_optim: AdamW,
    pub value: Option<(RewardModel, AdamW)>,
}

impl Trainees {
    /// The policy alone, with a fresh optimiser.
    pub fn policy(policy: CausalLm, adamw: AdamWConfig) -> Self {
        Self {
            policy,
            policy_optim: AdamW::new(adamw),
            value: None,
        }
    }

    /// The policy and a value model, each with a fresh optimiser.
    pub fn with_value(policy: CausalLm, value: RewardModel, adamw: AdamWConfig) -> Self {
        Self {
            policy,
            policy_optim: AdamW::new(adamw),
            value: Some((value, AdamW::new(adamw))),
        }
    }
}

/// A rollout prepared for the update.
pub trait Rollout {
    fn samples(&self) -> &Samples;
    /// Per response: the summed KL estimate to the reference.
    fn kl(&self) -> &[f64];
}

/// The settings the loop itself uses, whatever the algorithm.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub ppo_epochs: u32,
    pub num_mini_batches: usize,
    /// Rows per forward pass.
    pub micro_batch: usize,
    /// Of the sampling distribution, by which the log-probs are computed too.
    pub temperature: f64,
    pub max_grad_norm: f64,
    /// How update and log-prob batches are padded.
    pub pad: Pad,
    pub seed: u64,
}

impl LoopSettings {
    pub fn new(
        rollout: &RolloutArgs,
        train: &TrainArgs,
        ppo_epochs: u32,
        pad: Pad,
        seed: u64,
    ) -> Self {
        Self {
            ppo_epochs,
            num_mini_batches: rollout.num_mini_batches as usize,
            micro_batch: train.batch_size as usize,
            temperature: rollout.temperature,
            max_grad_norm: train.max_grad_norm,
            pad,
            seed,
        }
    }
}

/// One online-RL algorithm: how a rollout becomes a loss and a metrics line.
pub trait Algorithm {
    type Batch: Rollout;
    /// Statistics summed over a minibatch's micro-batches.
    type Micro: Default;
    /// What one minibatch step measured.
    type Step;

    /// Responses sampled per prompt.
    fn generations(&self) -> usize;

    /// Everything the update needs from a rollout: old log-probs (from `policy`, on the
    /// update's backend without a graph), the reference's, values, advantages.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        policy: &CausalLm,
        value: Option<&RewardModel>,
        reference: Option<&CausalLm>,
        samples: Samples,
        kl_coef: f64,
        iteration: u64,
    ) -> Self::Batch;

    /// What a minibatch's loss sum is divided by; a minibatch of weight 0 is skipped.
    /// `tokens` is its response tokens.
    fn weight(&self, minibatch: &[Vec<usize>], tokens: usize) -> f64;

    /// One micro-batch's loss, divided by the minibatch's `weight`; its statistics go to `acc`.
    fn micro_loss(
        &self,
        trainees: &Trainees,
        batch: &Self::Batch,
        micro: &[usize],
        weight: f64,
        acc: &mut Self::Micro,
        device: &Device,
    ) -> Tensor<1>;

    /// The minibatch's loss (as logged) and its statistics.
    fn finish(&self, acc: Self::Micro, weight: f64) -> (f64, Self::Step);

    /// The iteration's metrics, with the KL coefficient it used.
    fn record(
        &self,
        iteration: u64,
        epoch: f64,
        lr: f64,
        kl_coef: f64,
        batch: &Self::Batch,
        update: &Update<Self::Step>,
    ) -> StepRecord;

    /// The KL coefficient of the next iteration (PPO's adaptive controller).
    fn adapt_kl(&self, kl_coef: f64, _batch: &Self::Batch) -> f64 {
        kl_coef
    }

    /// The progress bar's message after an iteration.
    fn progress(&self, record: &StepRecord) -> String;
}

/// One minibatch step.
#[derive(Debug, Clone)]
pub struct Minibatch<S> {
    /// The logged loss.
    pub loss: f64,
    /// Global L2 norm of the gradient over every trained module, before clipping.
    pub grad_norm: f64,
    pub stats: S,
}

/// What an iteration's update did.
#[derive(Debug, Clone)]
pub struct Update<S> {
    pub steps: Vec<Minibatch<S>>,
    /// Response tokens trained on (over every epoch).
    pub tokens: f64,
}

impl<S> Default for Update<S> {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            tokens: 0.0,
        }
    }
}

/// `ppo_epochs` passes of minibatch updates over a prepared rollout at learning rate `lr`.
pub fn update<A: Algorithm>(
    algorithm: &A,
    mut t: Trainees,
    batch: &A::Batch,
    s: &LoopSettings,
    iteration: u64,
    lr: f64,
    device: &Device,
) -> Result<(Trainees, Update<A::Step>), TrainError> {
    let mut out = Update::default();
    let rows = &batch.samples().rows;
    for epoch in 0..s.ppo_epochs {
        let partition = rollout::epoch_minibatches(
            rows.len(),
            s.num_mini_batches,
            s.micro_batch,
            s.seed,
            iteration,
            epoch,
        );
        for minibatch in &partition {
            let tokens: usize = minibatch
                .iter()
                .flatten()
                .map(|&i| rows[i].completion.len())
                .sum();
            let weight = algorithm.weight(minibatch, tokens);
            if weight <= 0.0 {
                continue;
            }
            let mut acc_policy = GradientsAccumulator::<CausalLm>::new();
            let mut acc_value = GradientsAccumulator::<RewardModel>::new();
            let mut acc = A::Micro::default();
            for micro in minibatch {
                let loss = algorithm.micro_loss(&t, batch, micro, weight, &mut acc, device);
                let mut grads = loss.backward();
                acc_policy.accumulate(
                    &t.policy,
                    GradientsParams::from_module(&mut grads, &t.policy),
                );
                if let Some((value, _)) = &t.value {
                    acc_value.accumulate(value, GradientsParams::from_module(&mut grads, value));
                }
            }
            let (loss, stats) = algorithm.finish(acc, weight);
            let step = out.steps.len() as u64 + 1;
            if !loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "loss",
                    value: loss,
                });
            }
            let grads_policy = acc_policy.grads();
            let norm_policy = adamw::global_grad_norm(&t.policy, &grads_policy);
            let (grad_norm, grads_value) = match &t.value {
                Some((value, _)) => {
                    let grads = acc_value.grads();
                    let norm_value = adamw::global_grad_norm(value, &grads);
                    let norm = (norm_policy * norm_policy + norm_value * norm_value).sqrt();
                    (norm, Some(grads))
                }
                None => (norm_policy, None),
            };
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    quantity: "grad_norm",
                    value: grad_norm,
                });
            }
            let coef = adamw::clip_coefficient(grad_norm, s.max_grad_norm);
            t.policy = t.policy_optim.step(t.policy, grads_policy, lr, coef);
            if let (Some((value, optim)), Some(grads)) = (t.value.take(), grads_value) {
                let mut optim = optim;
                let value = optim.step(value, grads, lr, coef);
                t.value = Some((value, optim));
            }
            out.steps.push(Minibatch {
                loss,
                grad_norm,
                stats,
            });
            out.tokens += tokens as f64;
        }
    }
    Ok((t, out))
}

/// What the loop needs besides the algorithm: the prompts, the rollout and training settings.
pub struct RlRun<'a> {
    pub data: &'a RlData,
    pub rollout: &'a RolloutArgs,
    pub train: &'a TrainArgs,
    pub learning_rate: f64,
    pub settings: LoopSettings,
    /// The KL coefficient of the first iteration.
    pub kl_coef: f64,
}

/// What the loop leaves: the trained models, the iterations' records, the throughput and the
/// `rollouts.jsonl` lines (when `save_rollouts`).
pub struct RlOutcome {
    pub trainees: Trainees,
    pub steps: Vec<StepRecord>,
    pub throughput: Throughput,
    pub rollouts: Vec<String>,
}

impl RlOutcome {
    /// The last iteration's metrics, for the manifest.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if let Some(last) = self.steps.last() {
            out.insert("loss".into(), last.loss);
            out.insert("steps".into(), last.step as f64);
            for (k, v) in &last.metrics {
                out.insert(k.clone(), *v);
            }
        }
        out
    }
}

/// Runs `run.rollout.num_iterations` iterations of `algorithm` for a stage, resuming from the
/// stage's checkpoint when there is one; `metrics.jsonl` goes into the artifact.
pub fn train<A: Algorithm, P>(
    stage: &Stage<'_, P>,
    algorithm: &A,
    run: &RlRun<'_>,
    trainees: Trainees,
    reference: Option<&CausalLm>,
    scorer: &Scorer,
    device: &Device,
) -> Result<RlOutcome, TrainError> {
    let (data, s) = (run.data, &run.settings);
    let total = run.rollout.num_iterations;
    let schedule = Schedule::from_args(run.train, run.learning_rate, total);
    let checkpoint = RlCheckpoint::new(stage.work_dir(), run.train.checkpoint_every);
    let prompts = data.prompts.len();
    let restored = checkpoint.load::<_>(
        "policy",
        trainees.policy,
        trainees.policy_optim,
        prompts,
        total,
        device,
    )?;
    let value = match trainees.value {
        Some((value, optim)) => {
            let restored = checkpoint.load::<_>("value", value, optim, prompts, total, device)?;
            Some((restored.model, restored.optim))
        }
        None => None,
    };
    let state = checkpoint.state()?.unwrap_or(RlState {
        kl_coef: run.kl_coef,
        rollouts: Vec::new(),
    });
    let mut kl_coef = state.kl_coef;
    let mut rollouts = state.rollouts;
    let mut steps = restored.steps;
    let mut t = Trainees {
        policy: restored.model,
        policy_optim: restored.optim,
        value,
    };
    let mut writer =
        MetricsWriter::create(&stage.out_dir().join(METRICS_FILE), run.train.logging_steps)?
            .report_to(&run.train.report_to)?;
    writer.replay(&steps)?;
    stage.progress().set_length(total);
    stage.progress().set_position(steps.len() as u64);
    let batch_size = run.rollout.rollout_batch_size as usize;
    let mut throughput = Throughput::default();
    let mut compile_time = crate::train::hooks::CompileTime::on(device);
    let save = |t: &Trainees, steps: &[StepRecord], kl_coef: f64, rollouts: &[String]| {
        checkpoint.save::<CausalLm, RewardModel>(
            (&t.policy, &t.policy_optim),
            t.value.as_ref().map(|(v, o)| (v, o)),
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
        if stage.is_interrupted() {
            if iteration > 0 {
                save(&t, &steps, kl_coef, &rollouts)?;
            }
            return Err(TrainError::Interrupted {
                step: iteration + 1,
            });
        }
        let started = Instant::now();
        let policy_inner = t.policy.valid();
        let index: Vec<usize> = rollout::prompt_batch(prompts, batch_size, s.seed, iteration)
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(i, algorithm.generations()))
            .collect();
        let samples = rollout::sample_and_score(
            &policy_inner,
            data,
            scorer,
            index,
            run.rollout,
            seeds::mix(s.seed, iteration),
            device,
        )?;
        let value_inner = t.value.as_ref().map(|(v, _)| v.valid());
        let batch = algorithm.prepare(
            &t.policy.clone().no_grad(),
            value_inner.as_ref(),
            reference,
            samples,
            kl_coef,
            iteration,
        );
        drop(policy_inner);
        drop(value_inner);
        throughput.rollout_tokens += batch.samples().tokens() as f64;
        throughput.rollout_seconds += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let lr = schedule.lr(iteration);
        let (trained, update) = update(algorithm, t, &batch, s, iteration, lr, device)?;
        t = trained;
        throughput.update_tokens += update.tokens;
        throughput.update_seconds += started.elapsed().as_secs_f64();
        if run.rollout.save_rollouts {
            rollouts.extend(rollout::rollout_lines(
                iteration,
                data,
                batch.samples(),
                batch.kl(),
            ));
        }
        let epoch = ((iteration + 1) * batch_size as u64) as f64 / prompts as f64;
        let record = algorithm.record(iteration, epoch, lr, kl_coef, &batch, &update);
        kl_coef = algorithm.adapt_kl(kl_coef, &batch);
        writer.record(&record, iteration + 1 == total)?;
        stage.progress().set_position(iteration + 1);
        stage.progress().set_message(algorithm.progress(&record));
        if let Some(c) = &mut compile_time
            && c.step_done(stage.progress())
        {
            compile_time = None;
        }
        steps.push(record);
        let done = iteration + 1;
        if checkpoint.every > 0 && done.is_multiple_of(checkpoint.every) && done < total {
            save(&t, &steps, kl_coef, &rollouts)?;
        }
    }
    Ok(RlOutcome {
        trainees: t,
        steps,
        throughput,
        rollouts,
    })
}

/// The mean of `values`; 0 for none.
pub fn mean(values: &[f64]) -> f64 {
    rollout::mean(values)
}
