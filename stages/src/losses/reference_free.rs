//! The reference-free preference losses exactly as TRL 1.16's experimental trainers write
//! them: CPO and SimPO (`trl.experimental.cpo`) and ORPO (`trl.experimental.orpo`).

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu};
use rudder_schema::kinds::{CpoLossType, SimpoParams};

use super::dpo::smoothed_logistic;
use super::scalar;

/// Whether a CPO loss type takes per-token average log-probs (TRL's `average_log_prob`) rather
/// than sums.
pub fn cpo_uses_average_logps(loss_type: CpoLossType) -> bool {
    matches!(loss_type, CpoLossType::Simpo | CpoLossType::Ipo)
}

/// CPO/SimPO settings, TRL's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpoLossConfig {
    pub loss_type: CpoLossType,
    pub beta: f64,
    pub simpo_gamma: f64,
    /// Weight of the chosen NLL term.
    pub cpo_alpha: f64,
    pub label_smoothing: f64,
}

impl From<&SimpoParams> for CpoLossConfig {
    fn from(p: &SimpoParams) -> Self {
        Self {
            loss_type: p.loss_type,
            beta: p.beta,
            simpo_gamma: p.simpo_gamma,
            cpo_alpha: p.cpo_alpha,
            label_smoothing: p.label_smoothing,
        }
    }
}

/// What a CPO/SimPO step produces.
#[derive(Debug, Clone)]
pub struct CpoLosses {
    /// `[n]`: the preference term per pair (without the NLL).
    pub per_example: Tensor<1>,
    /// `[1]`: `mean(per_example) + cpo_alpha * nll`.
    pub loss: Tensor<1>,
    /// `[n]`, detached: `beta * policy logps` (averages where the loss uses them).
    pub chosen_rewards: Tensor<1>,
    pub rejected_rewards: Tensor<1>,
}

/// CPO and SimPO (TRL 1.16 `trl.experimental.cpo`, `cpo_loss` + `get_batch_loss_metrics`;
/// AlphaPO's `alpha` is not supported).
///
/// `chosen`/`rejected` are the policy's sequence log-probs: per-token averages when
/// [`cpo_uses_average_logps`], sums otherwise. `chosen_nll` is the token-mean NLL over the
/// chosen completions ([`token_mean_nll`] of the chosen sums), required when `cpo_alpha != 0`.
///
/// # Shapes
/// - chosen, rejected: `[n]`; chosen_nll: `[1]`
pub fn cpo_loss(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    chosen_nll: Option<Tensor<1>>,
    config: &CpoLossConfig,
) -> CpoLosses {
    let beta = config.beta;
    let ls = config.label_smoothing;
    let logits = chosen.clone() - rejected.clone();
    let per_example = match config.loss_type {
        CpoLossType::Simpo => smoothed_logistic(
            logits
                .sub_scalar(config.simpo_gamma / beta)
                .mul_scalar(beta),
            ls,
        ),
        CpoLossType::Sigmoid => smoothed_logistic(logits.mul_scalar(beta), ls),
        CpoLossType::Hinge => relu(logits.mul_scalar(-beta).add_scalar(1.0)),
        CpoLossType::Ipo => logits.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
    };
    let mut loss = per_example.clone().mean();
    if config.cpo_alpha != 0.0 {
        let nll = chosen_nll.expect("cpo_loss needs the chosen NLL when cpo_alpha != 0");
        loss = loss + nll.mul_scalar(config.cpo_alpha);
    }
    CpoLosses {
        per_example,
        loss,
        chosen_rewards: chosen.detach().mul_scalar(beta),
        rejected_rewards: rejected.detach().mul_scalar(beta),
    }
}

/// `log(1 - exp(x))` for `x < 0`, accurate on both sides of `-ln 2` as TRL's `log1mexp`. Near 0
/// it is `log(-x) + log((exp(x) - 1) / x)` with the second factor's Taylor series, which stays
/// exact in f32 where `1 - exp(x)` would cancel.
pub fn log1mexp(x: Tensor<1>) -> Tensor<1> {
    const T: f64 = -std::f64::consts::LN_2;
    // (exp(x) - 1) / x = sum_k x^k / (k + 1)!, Horner form; 14 terms reach 1e-12 at |x| = ln 2.
    const TERMS: usize = 14;
    let inv_fact = |k: usize| 1.0 / (1..=k).map(|i| i as f64).product::<f64>();
    // Each branch sees only its own range, so the unused one stays finite (and so do gradients).
    let xn = x.clone().clamp_min(T);
    let mut series = xn.zeros_like().add_scalar(inv_fact(TERMS));
    for k in (0..TERMS - 1).rev() {
        series = (series * xn.clone()).add_scalar(inv_fact(k + 1));
    }
    let near = xn.neg().log() + series.log();
    let far = x.clone().clamp_max(T).exp().neg().log1p();
    far.mask_where(x.greater_equal_elem(T), near)
}

/// What an ORPO step produces.
#[derive(Debug, Clone)]
pub struct OrpoLosses {
    /// `[1]`: `nll - mean(per_example_or_term)`.
    pub loss: Tensor<1>,
    /// `[n]`: `beta * logsigmoid(log_odds)`, which the loss subtracts.
    pub per_example_or_term: Tensor<1>,
    /// `[n]`: `(a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`.
    pub log_odds: Tensor<1>,
    /// `[n]`, detached: `beta * average logps`.
    pub chosen_rewards: Tensor<1>,
    pub rejected_rewards: Tensor<1>,
    /// TRL's `log_odds_ratio` metric: `mean(logsigmoid(log_odds))`.
    pub log_odds_ratio: f64,
    /// TRL's `log_odds_chosen` metric: `mean(log_odds)`.
    pub log_odds_chosen: f64,
}

/// ORPO (TRL 1.16 `trl.experimental.orpo`, `odds_ratio_loss` + `get_batch_loss_metrics`).
///
/// `chosen_avg`/`rejected_avg` are the policy's per-token average completion log-probs;
/// `chosen_nll` is the token-mean NLL over the whole chosen sequences (prompt and completion,
/// every target after BOS).
///
/// # Shapes
/// - chosen_avg, rejected_avg: `[n]`; chosen_nll: `[1]`
pub fn orpo_loss(
    chosen_avg: Tensor<1>,
    rejected_avg: Tensor<1>,
    chosen_nll: Tensor<1>,
    beta: f64,
) -> OrpoLosses {
    let log_odds = (chosen_avg.clone() - rejected_avg.clone())
        - (log1mexp(chosen_avg.clone()) - log1mexp(rejected_avg.clone()));
    let ratio = log_sigmoid(log_odds.clone());
    let per_example_or_term = ratio.clone().mul_scalar(beta);
    OrpoLosses {
        loss: chosen_nll - per_example_or_term.clone().mean(),
        log_odds_ratio: scalar(ratio.detach().mean()),
        log_odds_chosen: scalar(log_odds.clone().detach().mean()),
        per_example_or_term,
        log_odds,
        chosen_rewards: chosen_avg.detach().mul_scalar(beta),
        rejected_rewards: rejected_avg.detach().mul_scalar(beta),
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::losses::test_util::*;

    #[test]
    fn log1mexp_is_accurate_near_zero_and_far() {
        let xs = [-1e-6f32, -1e-3, -0.1, -0.69, -0.7, -2.0, -9.0];
        let got = values(log1mexp(t(&xs)));
        for (x, g) in xs.iter().zip(got) {
            let x = *x as f64;
            close(g, (-x.exp_m1()).ln(), 1e-6);
        }
    }
    #[test]
    fn cpo_and_orpo_by_hand() {
        let config = CpoLossConfig {
            loss_type: CpoLossType::Simpo,
            beta: 2.0,
            simpo_gamma: 1.0,
            cpo_alpha: 0.5,
            label_smoothing: 0.0,
        };
        let out = cpo_loss(t(&[-1.0]), t(&[-2.0]), Some(t(&[3.0])), &config);
        // 2 * ((-1 + 2) - 1 / 2) = 1
        close(values(out.per_example)[0], softplus(-1.0), 1e-6);
        close(values(out.loss)[0], softplus(-1.0) + 1.5, 1e-6);
        assert_eq!(values(out.chosen_rewards), vec![-2.0]);

        let (a, b) = (-0.5f64, -1.5f64);
        let log_odds = (a - b) - ((-a.exp_m1()).ln() - (-b.exp_m1()).ln());
        let out = orpo_loss(t(&[a as f32]), t(&[b as f32]), t(&[2.0]), 0.1);
        close(values(out.log_odds)[0], log_odds, 1e-6);
        close(values(out.loss)[0], 2.0 + 0.1 * softplus(-log_odds), 1e-6);
        close(out.log_odds_chosen, log_odds, 1e-6);
    }
}
