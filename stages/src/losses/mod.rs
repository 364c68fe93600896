//! The losses of every stage kind, each exactly as its reference implementation writes it:
//! Bradley-Terry reward modelling, the DPO family (with MPO mixes, f-divergences, LD-DPO and
//! WPO), the reference-free CPO/SimPO and ORPO, KTO, PPO's clipped policy and value losses, the
//! KL estimators and the advantage arithmetic of the online-RL kinds (GAE, whitening, group
//! baselines). Inputs are log-probs, rewards or values already computed; nothing here runs a
//! model, and each loss has a test on tiny tensors with a hand-computed value.
//!
//! The differentiable losses detach what their references detach (rewards, KTO's KL estimate,
//! WPO weights), so they can sit inside an autodiff training step; per-example outputs average
//! to the batch loss, so a training loop can weight or accumulate them without knowing the loss.

pub mod advantages;
pub mod bradley_terry;
pub mod dpo;
pub mod kl;
pub mod kto;
pub mod ppo;
pub mod reference_free;

use burn::tensor::Tensor;

pub use advantages::{gae, group_advantages, leave_one_out, whiten};
pub use bradley_terry::bradley_terry;
pub use dpo::{DpoLossConfig, DpoLosses, PairLogps, dpo_loss, ld_logps, wpo_weights};
pub use kl::{kl_k1, kl_k3};
pub use kto::{KtoLossConfig, KtoLosses, kto_kl, kto_loss, kto_metrics, kto_uses_kl};
pub use ppo::{clipped_policy_loss, clipped_value_loss};
pub use reference_free::{
    CpoLossConfig, CpoLosses, OrpoLosses, cpo_loss, cpo_uses_average_logps, log1mexp, orpo_loss,
};

/// `x` as a host number (for metrics).
pub(crate) fn scalar(x: Tensor<1>) -> f64 {
    x.into_scalar::<f64>()
}

/// `-sum(logps) / sum(tokens)`: the token-level mean NLL of a batch (TRL's `sft` term, CPO's and
/// ORPO's NLL), not a mean of per-row means.
///
/// # Shapes
/// - logps, tokens: `[n]` (sequence log-prob sums and their token counts)
/// - output: `[1]`
pub fn token_mean_nll(logps: Tensor<1>, tokens: Tensor<1>) -> Tensor<1> {
    logps.sum().neg() / tokens.sum()
}

/// The summed negative log-likelihood of the picked tokens where `mask` is 1: the SFT
/// objective's numerator (the loop divides by the window's trained tokens).
///
/// # Shapes
/// - picked, mask: `[rows, positions]`
/// - output: `[1]`
pub fn masked_nll_sum(picked: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    (picked.neg() * mask).sum()
}

/// The reward and log-prob metrics TRL logs for paired losses (DPO, CPO/SimPO, ORPO), under
/// TRL's names: means over pairs; `rewards/accuracies` counts strict `chosen > rejected`. Pass the
/// log-probs the loss used (LD-weighted under LD-DPO, averages for SimPO/ORPO).
///
/// # Shapes
/// - every input: `[n]`
pub fn pair_metrics(
    chosen_rewards: Tensor<1>,
    rejected_rewards: Tensor<1>,
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
) -> Vec<(&'static str, f64)> {
    let (c, r) = (chosen_rewards.detach(), rejected_rewards.detach());
    vec![
        ("rewards/chosen", scalar(c.clone().mean())),
        ("rewards/rejected", scalar(r.clone().mean())),
        (
            "rewards/accuracies",
            scalar(c.clone().greater(r.clone()).float().mean()),
        ),
        ("rewards/margins", scalar((c - r).mean())),
        ("logps/chosen", scalar(policy_chosen.detach().mean())),
        ("logps/rejected", scalar(policy_rejected.detach().mean())),
    ]
}

#[cfg(test)]
pub(crate) mod test_util {
    use burn::tensor::{Tensor, TensorData};

    /// Loss tests run on the autodiff form of the test device, so that gradients can be taken.
    pub fn device() -> burn::tensor::Device {
        crate::test_device().autodiff()
    }

    pub fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_floats(v, &device())
    }

    pub fn t2(rows: &[&[f32]]) -> Tensor<2> {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(
            TensorData::new(flat, [rows.len(), rows[0].len()]),
            &device(),
        )
    }

    pub fn values(x: Tensor<1>) -> Vec<f64> {
        x.into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .unwrap()
    }

    pub fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
    }

    pub fn softplus(x: f64) -> f64 {
        (1.0 + x.exp()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_util::*;

    #[test]
    fn token_mean_nll_by_hand() {
        // Two rows of 2 and 3 tokens with log-prob sums -1 and -2: 3 / 5.
        let nll = token_mean_nll(t(&[-1.0, -2.0]), t(&[2.0, 3.0]));
        close(values(nll)[0], 0.6, 1e-6);
        let picked = t2(&[&[-1.0, -2.0], &[-3.0, -4.0]]);
        let mask = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        close(values(masked_nll_sum(picked, mask))[0], 5.0, 1e-6);
    }

    #[test]
    fn pair_metrics_use_strict_accuracy() {
        let m = pair_metrics(
            t(&[1.0, 0.5]),
            t(&[0.0, 0.5]),
            t(&[-1.0, -3.0]),
            t(&[-2.0, -4.0]),
        );
        let get = |name: &str| m.iter().find(|(n, _)| *n == name).unwrap().1;
        close(get("rewards/accuracies"), 0.5, 1e-9);
        close(get("rewards/margins"), 0.5, 1e-6);
        close(get("logps/chosen"), -2.0, 1e-6);
    }
}
