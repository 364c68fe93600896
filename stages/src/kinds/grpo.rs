//! Group relative policy optimisation (`grpo`), as TRL's `GRPOTrainer`: each iteration samples
//! `num_generations` responses for each of `rollout_batch_size` prompts; the advantage is the
//! score minus its group's mean, divided by the group's standard deviation + 1e-4 with
//! `scale_rewards`; the clipped objective is per token (`epsilon`), plus `beta` times the k3 KL
//! to the reference per token when `beta > 0`; the loss is aggregated by `loss_type`: `grpo`
//! (per-sequence token means, averaged), `bnpo` and `dapo` (token mean over the minibatch:
//! TRL's dapo divides by the tokens of the whole accumulated batch, which a minibatch is here),
//! `dr_grpo` (token sum over rows times `response_length`). The loop is `rl`'s; the artifact is
//! the policy with its tokenizer, `metrics.jsonl` and, with `save_rollouts`, `rollouts.jsonl`.

use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{GrpoLossType, GrpoParams, KlEstimator};

use crate::kind::{Stage, StageKind};
use crate::logps::{CompletionBatch, PromptCompletion};
use crate::losses::{clipped_policy_loss, group_advantages};
use crate::model::CausalLm;
use crate::rl::group::{self, GroupAlgorithm, GroupBatch, GroupMicro, pick, refs};
use crate::rl::rollout::{self, dense, host};
use crate::rl::{LoopSettings, Samples, Trainees};
use crate::train::TrainError;

pub struct GrpoKind;

impl StageKind for GrpoKind {
    type Params = GrpoParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, GrpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        group::run_stage::<_, _>(
            stage,
            &p.policy,
            &p.rollout,
            &p.train,
            p.ppo_epochs,
            p.beta,
            |settings| Grpo {
                settings,
                num_generations: p.num_generations as usize,
                beta: p.beta,
                epsilon: p.epsilon,
                loss_type: p.loss_type,
                scale_rewards: p.scale_rewards,
                response_length: p.rollout.response_length as usize,
            },
            device,
        )
    }
}

/// The GRPO algorithm of one stage.
#[derive(Debug, Clone)]
pub struct Grpo {
    pub settings: LoopSettings,
    pub num_generations: usize,
    /// Coefficient of the k3 KL term; 0 drops the reference.
    pub beta: f64,
    /// Clipping range of the probability ratio.
    pub epsilon: f64,
    pub loss_type: GrpoLossType,
    pub scale_rewards: bool,
    pub response_length: usize,
}

/// Old and reference log-probs (k3 KL), then the group-normalised advantages.
pub fn prepare(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    samples: Samples,
    s: &Grpo,
    iteration: u64,
) -> GroupBatch {
    let (logps, ref_logps, kl) = group::rollout_logps(
        policy,
        reference,
        &samples,
        &s.settings,
        KlEstimator::K3,
        iteration,
    );
    let (advantages, group_std) =
        group_advantages(&samples.scores, s.num_generations, s.scale_rewards);
    GroupBatch {
        samples,
        logps,
        ref_logps,
        advantages,
        kl,
        group_std,
    }
}

impl GroupAlgorithm for Grpo {
    fn generations(&self) -> usize {
        self.num_generations
    }

    fn prepare(
        &self,
        policy: &CausalLm,
        reference: Option<&CausalLm>,
        samples: Samples,
        iteration: u64,
    ) -> GroupBatch {
        prepare(policy, reference, samples, self, iteration)
    }

    /// What the minibatch's summed per-token losses are divided by, by `loss_type`.
    fn weight(&self, minibatch: &[Vec<usize>], tokens: usize) -> f64 {
        let rows: usize = minibatch.iter().map(Vec::len).sum();
        match self.loss_type {
            GrpoLossType::Grpo => rows as f64,
            GrpoLossType::Bnpo | GrpoLossType::Dapo => tokens as f64,
            GrpoLossType::DrGrpo => (rows * self.response_length) as f64,
        }
    }

    fn micro_loss(
        &self,
        t: &Trainees,
        b: &GroupBatch,
        micro: &[usize],
        weight: f64,
        acc: &mut GroupMicro,
        device: &Device,
    ) -> Tensor<1> {
        let s = &self.settings;
        let rows: Vec<&PromptCompletion> = micro.iter().map(|&i| &b.samples.rows[i]).collect();
        let batch = CompletionBatch::new(&rows, s.pad, device);
        let [_, width] = batch.mask.dims();
        let mask = batch.mask.clone();
        let old_rows = pick(&b.logps, micro);
        let old = dense(&rows, &refs(&old_rows), width, device);
        let new = rollout::policy_token_logps(&t.policy, &batch, s.temperature);
        let adv: Vec<f32> = micro.iter().map(|&i| b.advantages[i] as f32).collect();
        let adv_rows: Vec<Vec<f32>> = rows
            .iter()
            .zip(&adv)
            .map(|(r, &a)| vec![a; r.completion.len()])
            .collect();
        let adv = dense(&rows, &refs(&adv_rows), width, device);
        let ratio = ((new.clone() - old) * mask.clone()).exp();
        let (mut loss, l1, l2) = clipped_policy_loss(ratio.clone(), adv, self.epsilon);
        if self.beta > 0.0 {
            let ref_rows = pick(&b.ref_logps, micro);
            let reference = dense(&rows, &refs(&ref_rows), width, device);
            let logr = reference - new;
            let k3 = logr.clone().exp() - logr - 1.0;
            loss = loss + k3.mul_scalar(self.beta);
        }
        let mut loss = loss * mask.clone();
        if self.loss_type == GrpoLossType::Grpo {
            let inv: Vec<Vec<f32>> = rows
                .iter()
                .map(|r| vec![1.0 / r.completion.len().max(1) as f32; r.completion.len()])
                .collect();
            loss = loss * dense(&rows, &refs(&inv), width, device);
        }
        let mask_i = mask.inner();
        let clipped =
            f64::from(host((l2.inner().greater(l1.inner()).float() * mask_i.clone()).sum())[0]);
        let tokens: usize = rows.iter().map(|r| r.completion.len()).sum();
        let deviation = f64::from(host((ratio.inner().sub_scalar(1.0) * mask_i).abs().max())[0]);
        let scaled = loss.sum().div_scalar(weight);
        acc.loss += f64::from(host(scaled.clone().inner())[0]);
        acc.clipped += clipped;
        acc.out_of += tokens as f64;
        acc.deviation = acc.deviation.max(deviation);
        scaled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, random_causal_lm};
    use crate::rl::group::fixtures;
    use crate::train::AdamWConfig;
    use burn::module::Module;

    #[test]
    fn first_update_ratio_is_exactly_one_for_every_loss_type() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let reference = random_causal_lm(&cfg, 2, &device);
        for (loss_type, scale_rewards, beta) in [
            (GrpoLossType::Grpo, true, 0.04),
            (GrpoLossType::Dapo, false, 0.0),
            (GrpoLossType::DrGrpo, true, 0.0),
        ] {
            let policy = random_causal_lm(&cfg, 1, &device.clone().autodiff());
            let s = Grpo {
                settings: fixtures::settings(),
                num_generations: 4,
                beta,
                epsilon: 0.2,
                loss_type,
                scale_rewards,
                response_length: 6,
            };
            let reference = (beta > 0.0).then_some(&reference);
            let b = prepare(
                &policy.clone().no_grad(),
                reference,
                fixtures::samples(),
                &s,
                0,
            );
            let t = Trainees::policy(policy, AdamWConfig::default());
            let (t, update) = crate::rl::update(
                &group::Group(s.clone()),
                t,
                &b,
                &s.settings,
                0,
                1e-2,
                &device.clone().autodiff(),
            )
            .unwrap();
            assert_eq!(update.steps[0].stats.deviation, 0.0, "{loss_type:?}");
            assert_eq!(update.steps[0].stats.clip_ratio, 0.0, "{loss_type:?}");
            assert_eq!(update.steps.len(), 4);
            assert!(
                update.steps.iter().all(|m| m.loss.is_finite()),
                "{loss_type:?}"
            );
            assert_eq!(t.policy_optim.step, 4);
        }
    }
}
