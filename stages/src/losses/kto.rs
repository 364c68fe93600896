//! KTO's loss and metrics exactly as TRL 1.16's `KTOTrainer` computes them.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Tensor, TensorData};
use rudder_schema::kinds::{KtoLossType, KtoParams};

use super::scalar;

/// Whether a KTO loss type needs the KL estimate (and so the mismatched KL completions).
pub fn kto_uses_kl(loss_type: KtoLossType) -> bool {
    loss_type == KtoLossType::Kto
}

/// KTO settings, TRL's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoLossConfig {
    pub loss_type: KtoLossType,
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl From<&KtoParams> for KtoLossConfig {
    fn from(p: &KtoParams) -> Self {
        Self {
            loss_type: p.loss_type,
            beta: p.beta,
            desirable_weight: p.desirable_weight,
            undesirable_weight: p.undesirable_weight,
        }
    }
}

/// KTO's KL estimate: `max(0, mean(policy_kl - reference_kl))` over the batch's mismatched
/// (prompt, completion) rows, detached as in TRL.
///
/// # Shapes
/// - inputs: `[m]`; output: `[1]`
pub fn kto_kl(policy_kl: Tensor<1>, reference_kl: Tensor<1>) -> Tensor<1> {
    (policy_kl - reference_kl).mean().detach().clamp_min(0.0)
}

/// What a KTO step produces.
#[derive(Debug, Clone)]
pub struct KtoLosses {
    /// `[n]`, row order kept: the weighted loss of each row; TRL's loss is their plain mean.
    pub per_example: Tensor<1>,
    /// `[n]`, detached: `beta * (policy - reference)`.
    pub rewards: Tensor<1>,
}

impl KtoLosses {
    /// The batch loss, `[1]`.
    pub fn loss(&self) -> Tensor<1> {
        self.per_example.clone().mean()
    }
}

/// KTO (TRL 1.16 `KTOTrainer._compute_loss`). Desirable rows: `w_d * (1 - sigmoid(beta *
/// (logratio - kl)))`; undesirable: `w_u * (1 - sigmoid(beta * (kl - logratio)))`
/// (`apo_zero_unpaired`: `w_d * (1 - sigmoid(beta * logratio))` and `w_u * sigmoid(beta *
/// logratio)`, no KL). TRL averages these over all rows, desirable and undesirable together.
///
/// `kl` ([`kto_kl`]) is required for `kto` and ignored otherwise; it is detached here.
///
/// # Shapes
/// - policy, reference: `[n]`; desirable: `n` labels; kl: `[1]`
pub fn kto_loss(
    policy: Tensor<1>,
    reference: Tensor<1>,
    desirable: &[bool],
    kl: Option<Tensor<1>>,
    config: &KtoLossConfig,
) -> KtoLosses {
    let beta = config.beta;
    let [n] = policy.dims();
    assert_eq!(desirable.len(), n, "one label per row");
    let device = policy.device();
    let logratios = policy - reference;
    let (good, bad) = match config.loss_type {
        KtoLossType::Kto => {
            let kl = kl
                .expect("the kto loss needs the KL estimate")
                .detach()
                .expand([n]);
            (
                sigmoid((logratios.clone() - kl.clone()).mul_scalar(beta))
                    .neg()
                    .add_scalar(1.0),
                sigmoid((kl - logratios.clone()).mul_scalar(beta))
                    .neg()
                    .add_scalar(1.0),
            )
        }
        KtoLossType::ApoZeroUnpaired => {
            let s = sigmoid(logratios.clone().mul_scalar(beta));
            (s.clone().neg().add_scalar(1.0), s)
        }
    };
    let mask = Tensor::<1, Bool>::from_data(TensorData::new(desirable.to_vec(), [n]), &device);
    let per_example = bad
        .mul_scalar(config.undesirable_weight)
        .mask_where(mask, good.mul_scalar(config.desirable_weight));
    KtoLosses {
        per_example,
        rewards: logratios.detach().mul_scalar(beta),
    }
}

/// KTO's logged metrics, TRL's names: `kl`, then `rewards/*` and `logps/*` as means over the
/// desirable (`chosen`) and undesirable (`rejected`) rows, each side only when present, and
/// `rewards/margins` (difference of the two reward means) when both are.
///
/// # Shapes
/// - rewards, policy: `[n]`; desirable: `n` labels; kl: `[1]`
pub fn kto_metrics(
    rewards: Tensor<1>,
    policy: Tensor<1>,
    desirable: &[bool],
    kl: Option<Tensor<1>>,
) -> Vec<(&'static str, f64)> {
    let values = |t: Tensor<1>| -> Vec<f64> {
        t.detach()
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .expect("float tensor")
    };
    let (rewards, policy) = (values(rewards), values(policy));
    let mean_where = |xs: &[f64], label: bool| {
        let picked: Vec<f64> = xs
            .iter()
            .zip(desirable)
            .filter(|(_, d)| **d == label)
            .map(|(x, _)| *x)
            .collect();
        (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    let mut out = vec![("kl", kl.map_or(0.0, scalar))];
    let chosen = mean_where(&rewards, true);
    let rejected = mean_where(&rewards, false);
    if let (Some(c), Some(l)) = (chosen, mean_where(&policy, true)) {
        out.push(("rewards/chosen", c));
        out.push(("logps/chosen", l));
    }
    if let (Some(r), Some(l)) = (rejected, mean_where(&policy, false)) {
        out.push(("rewards/rejected", r));
        out.push(("logps/rejected", l));
    }
    if let (Some(c), Some(r)) = (chosen, rejected) {
        out.push(("rewards/margins", c - r));
    }
    out
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::losses::test_util::*;

    #[test]
    fn kto_weights_rows_and_detaches_kl() {
        let policy = t(&[-1.0, -2.0, -3.0]).require_grad();
        let reference = t(&[-2.0, -2.0, -2.0]);
        let policy_kl = t(&[-1.0, -1.0]).require_grad();
        let kl = kto_kl(policy_kl.clone(), t(&[-1.5, -1.3]));
        close(values(kl.clone())[0], 0.4, 1e-6);
        let config = KtoLossConfig {
            loss_type: KtoLossType::Kto,
            beta: 0.5,
            desirable_weight: 2.0,
            undesirable_weight: 0.5,
        };
        let labels = [true, false, false];
        let out = kto_loss(
            policy.clone(),
            reference,
            &labels,
            Some(kl.clone()),
            &config,
        );
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let got = values(out.per_example.clone());
        close(got[0], 2.0 * (1.0 - sigmoid(0.5 * (1.0 - 0.4))), 1e-6);
        close(got[1], 0.5 * (1.0 - sigmoid(0.5 * (0.4 - 0.0))), 1e-6);
        close(got[2], 0.5 * (1.0 - sigmoid(0.5 * (0.4 + 1.0))), 1e-6);
        let metrics = kto_metrics(out.rewards.clone(), policy.clone(), &labels, Some(kl));
        assert_eq!(metrics[0].0, "kl");
        close(metrics[0].1, 0.4, 1e-6);
        let grads = out.loss().backward();
        assert!(policy.grad(&grads).is_some());
        assert!(policy_kl.grad(&grads).is_none());
    }
}
