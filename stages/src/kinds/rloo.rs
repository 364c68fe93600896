//! REINFORCE leave-one-out (`rloo`), as TRL's `RLOOTrainer`: each iteration samples
//! `num_generations` responses for each of `rollout_batch_size` prompts; the reward is the
//! score less `beta` times the sequence's summed k1 KL to the reference; the advantage is the
//! reward minus the mean reward of the other responses to the same prompt; the clipped
//! objective is on the sequence-level ratio `exp(sum log p - sum log p_old)`, averaged over
//! sequences. The loop is `rl`'s; the artifact is the policy with its tokenizer,
//! `metrics.jsonl` and, with `save_rollouts`, `rollouts.jsonl`.

use burn::tensor::Device;
use burn::tensor::Tensor;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{KlEstimator, RlooParams};

use crate::kind::{Stage, StageKind};
use crate::logps::{CompletionBatch, PromptCompletion};
use crate::losses::{clipped_policy_loss, group_advantages, leave_one_out};
use crate::model::CausalLm;
use crate::rl::group::{self, GroupAlgorithm, GroupBatch, GroupMicro, pick, refs};
use crate::rl::rollout::{self, dense, host};
use crate::rl::{LoopSettings, Samples, Trainees};
use crate::train::TrainError;

pub struct RlooKind;

impl StageKind for RlooKind {
    type Params = RlooParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, RlooParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        group::run_stage::<_, _>(
            stage,
            &p.policy,
            &p.rollout,
            &p.train,
            p.ppo_epochs,
            p.beta,
            |settings| Rloo {
                settings,
                num_generations: p.num_generations as usize,
                beta: p.beta,
                cliprange: p.cliprange,
            },
            device,
        )
    }
}

/// The RLOO algorithm of one stage.
#[derive(Debug, Clone)]
pub struct Rloo {
    pub settings: LoopSettings,
    pub num_generations: usize,
    /// Coefficient of the KL term of the reward.
    pub beta: f64,
    pub cliprange: f64,
}

/// Old and reference log-probs, then the KL-penalised rewards' leave-one-out advantages.
pub fn prepare(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    samples: Samples,
    s: &Rloo,
    iteration: u64,
) -> GroupBatch {
    let (logps, ref_logps, kl) = group::rollout_logps(
        policy,
        reference,
        &samples,
        &s.settings,
        KlEstimator::K1,
        iteration,
    );
    let k = s.num_generations;
    let rewards: Vec<f64> = samples
        .scores
        .iter()
        .zip(&kl)
        .map(|(score, kl)| score - s.beta * kl)
        .collect();
    let group_std = group_advantages(&rewards, k, false).1;
    GroupBatch {
        advantages: leave_one_out(&rewards, k),
        samples,
        logps,
        ref_logps,
        kl,
        group_std,
    }
}

impl GroupAlgorithm for Rloo {
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

    /// The loss is a mean over the minibatch's sequences.
    fn weight(&self, minibatch: &[Vec<usize>], _tokens: usize) -> f64 {
        minibatch.iter().map(Vec::len).sum::<usize>() as f64
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
        let [m, width] = batch.mask.dims();
        let old_rows = pick(&b.logps, micro);
        let old = dense(&rows, &refs(&old_rows), width, device);
        let new = rollout::policy_token_logps(&t.policy, &batch, s.temperature);
        let adv: Vec<f32> = micro.iter().map(|&i| b.advantages[i] as f32).collect();
        let diff = (new - old).sum_dim(1).reshape([m]);
        let ratio = diff.exp();
        let adv = Tensor::<1>::from_floats(adv.as_slice(), device);
        let (loss, l1, l2) = clipped_policy_loss(ratio.clone(), adv, self.cliprange);
        let clipped = f64::from(host(l2.inner().greater(l1.inner()).float().sum())[0]);
        let deviation = f64::from(host(ratio.inner().sub_scalar(1.0).abs().max())[0]);
        let scaled = loss.sum().div_scalar(weight);
        acc.loss += f64::from(host(scaled.clone().inner())[0]);
        acc.clipped += clipped;
        acc.out_of += m as f64;
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

    fn rloo(beta: f64) -> Rloo {
        Rloo {
            settings: fixtures::settings(),
            num_generations: 4,
            beta,
            cliprange: 0.2,
        }
    }

    #[test]
    fn first_update_ratio_is_exactly_one() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let reference = random_causal_lm(&cfg, 2, &device);
        let policy = random_causal_lm(&cfg, 1, &device.clone().autodiff());
        let s = rloo(0.05);
        let b = prepare(
            &policy.clone().no_grad(),
            Some(&reference),
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
        assert_eq!(update.steps[0].stats.deviation, 0.0);
        assert_eq!(update.steps[0].stats.clip_ratio, 0.0);
        assert_eq!(update.steps.len(), 4);
        assert!(update.steps.iter().all(|m| m.loss.is_finite()));
        assert_eq!(t.policy_optim.step, 4);
    }

    #[test]
    fn rloo_penalises_kl_before_the_leave_one_out_baseline() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        let policy = random_causal_lm(&cfg, 1, &device);
        let reference = random_causal_lm(&cfg, 2, &device);
        let s = rloo(0.5);
        let b = prepare(&policy, Some(&reference), fixtures::samples(), &s, 0);
        let rewards: Vec<f64> = b
            .samples
            .scores
            .iter()
            .zip(&b.kl)
            .map(|(r, k)| r - 0.5 * k)
            .collect();
        let want = leave_one_out(&rewards, 4);
        for (a, w) in b.advantages.iter().zip(want) {
            assert!((a - w).abs() < 1e-12);
        }
        // Advantages of a group sum to zero.
        assert!(b.advantages[..4].iter().sum::<f64>().abs() < 1e-9);
    }
}
