//! What the critic-free algorithms (`rloo`, `grpo`) share: `num_generations` responses per
//! prompt, baselined against their group; the rollout's old and reference log-probs with each
//! response's summed KL estimate; the clipped-fraction statistics of a minibatch; and the
//! metrics line (TRL's names). The advantages and the loss are each algorithm's.

use std::collections::BTreeMap;

use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{Kind, KlEstimator, PolicyArgs, RolloutArgs, TrainArgs};

use super::rollout::{self, Samples};
use super::{Algorithm, LoopSettings, RlData, RlRun, Rollout, Trainees, Update, mean};
use crate::artifacts::{save_trained_model, write_lines};
use crate::kind::Stage;
use crate::losses::{kl_k1, kl_k3};
use crate::model::{CausalLm, RewardModel, load_causal_lm};
use crate::train::{StepRecord, TrainError};

/// What `rloo` and `grpo` do around the loop: read the policy and the prompts, load the
/// reference when `kl_coef > 0` (without a KL term there is nothing to run it for), build the
/// reward judge, run `algorithm` (made from the loop's settings), and save the policy with its
/// tokenizer and, with `save_rollouts`, `rollouts.jsonl`.
#[allow(clippy::too_many_arguments)]
pub fn run_stage<A, P>(
    stage: &Stage<'_, P>,
    policy: &PolicyArgs,
    rollout_args: &RolloutArgs,
    train: &TrainArgs,
    ppo_epochs: u32,
    kl_coef: f64,
    algorithm: impl FnOnce(LoopSettings) -> A,
    device: &Device,
) -> Result<StageOutcome, TrainError>
where
    A: GroupAlgorithm,
    P: Kind,
{
    let data = RlData::load(&stage.inputs)?;
    let reference_dir = data.model_or_policy(&stage.inputs, "reference")?;
    let (policy_cfg, model) = stage.trainable_lm(&data.policy_dir, train, device)?;
    let reference = if kl_coef <= 0.0 {
        None
    } else if train.lora.is_some() && RlData::reference_is_policy(&stage.inputs)? {
        Some(stage.lora_reference(&model))
    } else {
        Some(load_causal_lm(&reference_dir, &device.clone().inner())?.1)
    };
    let scorer = stage.inputs.judge(
        &policy.reward,
        "reward",
        stage.recipe_dir(),
        train.batch_size as usize,
        &device.clone().inner(),
    )?;
    let settings = LoopSettings::new(
        rollout_args,
        train,
        ppo_epochs,
        stage.pad(data.pad_id),
        stage.seed(),
    );
    let algorithm = Group(algorithm(settings.clone()));
    let run = RlRun {
        data: &data,
        rollout: rollout_args,
        train,
        learning_rate: policy.learning_rate,
        settings,
        kl_coef,
    };
    let trainees = Trainees::policy(model, train.into());
    let outcome = super::train(
        stage,
        &algorithm,
        &run,
        trainees,
        reference.as_ref(),
        &scorer,
        device,
    )?;
    save_trained_model(
        stage.out_dir(),
        &outcome.trainees.policy,
        &policy_cfg.saved_as(train.save_dtype),
        &data.tokenizer,
        train.lora.as_ref(),
    )?;
    if rollout_args.save_rollouts {
        write_lines(
            &stage.out_dir().join(super::ROLLOUTS_FILE),
            &outcome.rollouts,
        )?;
    }
    stage.progress().println(&outcome.throughput.line(P::NAME));
    Ok(StageOutcome {
        summary: outcome.summary(),
    })
}

/// What a critic-free algorithm defines; [`Group`] makes it an [`Algorithm`] with the shared
/// minibatch statistics, metrics and progress.
pub trait GroupAlgorithm {
    /// Responses sampled per prompt.
    fn generations(&self) -> usize;
    /// Old and reference log-probs and the advantages (see [`Algorithm::prepare`]).
    fn prepare(
        &self,
        policy: &CausalLm,
        reference: Option<&CausalLm>,
        samples: Samples,
        iteration: u64,
    ) -> GroupBatch;
    /// See [`Algorithm::weight`].
    fn weight(&self, minibatch: &[Vec<usize>], tokens: usize) -> f64;
    /// See [`Algorithm::micro_loss`].
    fn micro_loss(
        &self,
        trainees: &Trainees,
        batch: &GroupBatch,
        micro: &[usize],
        weight: f64,
        acc: &mut GroupMicro,
        device: &Device,
    ) -> Tensor<1>;
}

/// A [`GroupAlgorithm`] as the loop's [`Algorithm`].
pub struct Group<G>(pub G);

impl<G: GroupAlgorithm> Algorithm for Group<G> {
    type Batch = GroupBatch;
    type Micro = GroupMicro;
    type Step = GroupStep;

    fn generations(&self) -> usize {
        self.0.generations()
    }

    fn prepare(
        &self,
        policy: &CausalLm,
        _value: Option<&RewardModel>,
        reference: Option<&CausalLm>,
        samples: Samples,
        _kl_coef: f64,
        iteration: u64,
    ) -> GroupBatch {
        self.0.prepare(policy, reference, samples, iteration)
    }

    fn weight(&self, minibatch: &[Vec<usize>], tokens: usize) -> f64 {
        self.0.weight(minibatch, tokens)
    }

    fn micro_loss(
        &self,
        trainees: &Trainees,
        batch: &GroupBatch,
        micro: &[usize],
        weight: f64,
        acc: &mut GroupMicro,
        device: &Device,
    ) -> Tensor<1> {
        self.0
            .micro_loss(trainees, batch, micro, weight, acc, device)
    }

    fn finish(&self, acc: GroupMicro, _weight: f64) -> (f64, GroupStep) {
        let clip_ratio = if acc.out_of > 0.0 {
            acc.clipped / acc.out_of
        } else {
            0.0
        };
        let step = GroupStep {
            clip_ratio,
            deviation: acc.deviation,
        };
        (acc.loss, step)
    }

    fn record(
        &self,
        iteration: u64,
        epoch: f64,
        lr: f64,
        _kl_coef: f64,
        batch: &GroupBatch,
        update: &Update<GroupStep>,
    ) -> StepRecord {
        record(iteration, epoch, lr, batch, update)
    }

    fn progress(&self, record: &StepRecord) -> String {
        format!("reward {:.3}", record.metrics["reward"])
    }
}

/// A scored group rollout.
pub struct GroupBatch {
    pub samples: Samples,
    pub logps: Vec<Vec<f32>>,
    /// Empty when there is no reference (a KL coefficient of 0).
    pub ref_logps: Vec<Vec<f32>>,
    pub advantages: Vec<f64>,
    /// Per response: the summed KL estimate (0 without reference).
    pub kl: Vec<f64>,
    pub group_std: Vec<f64>,
}

impl Rollout for GroupBatch {
    fn samples(&self) -> &Samples {
        &self.samples
    }

    fn kl(&self) -> &[f64] {
        &self.kl
    }
}

/// Old and reference log-probs over the first epoch's micro-batches, and each response's
/// summed KL estimate. `policy` is on the update's (autodiff) backend, so that the first
/// ratio is exactly 1 (Burn's autodiff backend computes some operations differently from its
/// inner backend).
pub fn rollout_logps(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    samples: &Samples,
    s: &LoopSettings,
    estimator: KlEstimator,
    iteration: u64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<f64>) {
    let n = samples.rows.len();
    let old = rollout::old_logps(policy, reference, &samples.rows, s, iteration);
    let (logps, ref_logps) = (old.policy, old.reference);
    let kl: Vec<f64> = (0..n)
        .map(|i| match ref_logps.get(i) {
            None => 0.0,
            Some(refs) => logps[i]
                .iter()
                .zip(refs)
                .map(|(&p, &q)| match estimator {
                    KlEstimator::K1 => kl_k1(f64::from(p), f64::from(q)),
                    KlEstimator::K3 => kl_k3(f64::from(p), f64::from(q)),
                })
                .sum(),
        })
        .collect();
    (logps, ref_logps, kl)
}

/// A minibatch's micro-batches so far: the logged loss (the sum of each micro-batch's
/// weighted loss), the clipped count and what it is out of, the largest `|ratio - 1|`.
#[derive(Debug, Clone, Default)]
pub struct GroupMicro {
    pub loss: f64,
    pub clipped: f64,
    pub out_of: f64,
    pub deviation: f64,
}

/// What a group minibatch step measured.
#[derive(Debug, Clone)]
pub struct GroupStep {
    pub clip_ratio: f64,
    /// Largest `|ratio - 1|` (0 when rollout and update log-probs agree exactly).
    pub deviation: f64,
}

/// The iteration's metrics, with TRL's names.
fn record(
    iteration: u64,
    epoch: f64,
    lr: f64,
    b: &GroupBatch,
    u: &Update<GroupStep>,
) -> StepRecord {
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
    let clip_ratio: Vec<f64> = u.steps.iter().map(|m| m.stats.clip_ratio).collect();
    let mut metrics: BTreeMap<String, f64> = [
        ("reward", reward),
        ("reward_std", reward_std),
        ("objective/scores", reward),
        ("kl", b.kl.iter().sum::<f64>() / tokens.max(1) as f64),
        ("objective/kl", mean(&b.kl)),
        ("clip_ratio/region_mean", mean(&clip_ratio)),
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
    let losses: Vec<f64> = u.steps.iter().map(|m| m.loss).collect();
    let norms: Vec<f64> = u.steps.iter().map(|m| m.grad_norm).collect();
    StepRecord {
        step: iteration + 1,
        epoch,
        loss: mean(&losses),
        learning_rate: lr,
        grad_norm: mean(&norms),
        metrics,
        cumulative: Vec::new(),
    }
}

/// Per-row values of the rows `micro`, cloned.
pub fn pick(values: &[Vec<f32>], micro: &[usize]) -> Vec<Vec<f32>> {
    micro.iter().map(|&i| values[i].clone()).collect()
}

/// Borrowed rows of per-row values.
pub fn refs(values: &[Vec<f32>]) -> Vec<&[f32]> {
    values.iter().map(|r| &r[..]).collect()
}

/// Test fixtures shared by the group algorithms' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::logps::PromptCompletion;
    use crate::padding::Pad;

    /// Two prompts with four responses each, of different lengths.
    pub fn samples() -> Samples {
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

    pub fn settings() -> LoopSettings {
        LoopSettings {
            ppo_epochs: 2,
            num_mini_batches: 2,
            micro_batch: 3,
            temperature: 0.9,
            max_grad_norm: 1.0,
            pad: Pad::exact(0),
            seed: 5,
        }
    }
}
