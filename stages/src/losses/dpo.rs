//! The DPO family's losses exactly as TRL 1.16 writes them: every `loss_type` with MPO mixes,
//! f-divergences, LD-DPO's length-desensitised log-probs and WPO's weights.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use rudder_schema::kinds::{DpoLossArgs, DpoLossType, FDivergenceType};

use super::token_mean_nll;

/// The per-pair log-probs a DPO step needs. Rows are pairs, in the same order in every tensor.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// `[n]` policy sequence log-probs (LD-weighted when `ld_alpha` is set).
    pub policy_chosen: Tensor<1>,
    pub policy_rejected: Tensor<1>,
    /// `[n]` reference sequence log-probs, same weighting as the policy's.
    pub reference_chosen: Tensor<1>,
    pub reference_rejected: Tensor<1>,
    /// `[n]` completion token counts (EOS included), as floats: `ipo`, `sigmoid_norm` and `sft`
    /// divide by them.
    pub chosen_tokens: Tensor<1>,
    pub rejected_tokens: Tensor<1>,
    /// `[n]` plain (unweighted) policy chosen sums for the `sft` term; `None` means
    /// `policy_chosen`. They differ only under LD-DPO, where TRL's `sft` term stays the plain
    /// cross-entropy.
    pub sft_chosen: Option<Tensor<1>>,
}

/// DPO's loss settings, TRL's names and meanings.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoLossConfig {
    /// Loss types with their weights; the loss is `sum w_i * mean(loss_i)` (MPO when several).
    pub losses: Vec<(DpoLossType, f64)>,
    pub beta: f64,
    /// Used by `robust`, `exo_pair` (must be > 0 there), `aot` and `aot_unpaired`; TRL 1.16's
    /// `sigmoid` ignores it.
    pub label_smoothing: f64,
    pub discopop_tau: f64,
    pub f_divergence_type: FDivergenceType,
    pub f_alpha_divergence_coef: f64,
}

impl DpoLossConfig {
    /// One loss type, defaults otherwise (TRL's `DPOConfig`).
    pub fn single(loss_type: DpoLossType, beta: f64) -> Self {
        Self {
            losses: vec![(loss_type, 1.0)],
            beta,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 1.0,
        }
    }
}

impl DpoLossConfig {
    /// The recipe's loss options at `beta` (a round of iterative DPO may override the
    /// stage's); `rpo_alpha` becomes the `sft` loss type with that weight, as in TRL.
    pub fn new(args: &DpoLossArgs, beta: f64) -> Self {
        Self {
            losses: args.weighted_losses(),
            beta,
            label_smoothing: args.label_smoothing,
            discopop_tau: args.discopop_tau,
            f_divergence_type: args.f_divergence_type,
            f_alpha_divergence_coef: args.f_alpha_divergence_coef,
        }
    }
}

/// What a DPO step produces.
#[derive(Debug, Clone)]
pub struct DpoLosses {
    /// `[n]`: `sum_i w_i * loss_i` per row; its mean is the batch loss. For `aot`/`aot_unpaired`
    /// element `k` pairs the k-th smallest values of the batch, not pair `k`; for `sft` every
    /// element is the batch's token-mean NLL.
    pub per_example: Tensor<1>,
    /// `[n]`, detached: `beta * (policy - reference)` (the log-ratio, whatever the f-divergence).
    pub chosen_rewards: Tensor<1>,
    pub rejected_rewards: Tensor<1>,
}

impl DpoLosses {
    /// The batch loss, `[1]`.
    pub fn loss(&self) -> Tensor<1> {
        self.per_example.clone().mean()
    }
}

/// `-logsigmoid(x) * (1 - ls) - logsigmoid(-x) * ls`: the label-smoothed logistic loss.
pub(crate) fn smoothed_logistic(x: Tensor<1>, ls: f64) -> Tensor<1> {
    let pos = log_sigmoid(x.clone()).neg().mul_scalar(1.0 - ls);
    if ls == 0.0 {
        return pos;
    }
    pos - log_sigmoid(x.neg()).mul_scalar(ls)
}

/// The f-divergence's score of a log-ratio (TRL: `f'(t)` up to constants).
fn f_score(logratio: Tensor<1>, kind: FDivergenceType, alpha: f64) -> Tensor<1> {
    match kind {
        FDivergenceType::ReverseKl => logratio,
        FDivergenceType::ForwardKl => logratio.neg().exp().neg(),
        FDivergenceType::JsDivergence => log_sigmoid(logratio),
        FDivergenceType::AlphaDivergence => {
            if (alpha - 1.0).abs() < 1e-6 {
                logratio
            } else {
                // TRL clamps the exponent at 80 so the f32 exp stays finite.
                logratio
                    .mul_scalar(alpha - 1.0)
                    .clamp_max(80.0)
                    .exp()
                    .mul_scalar(1.0 / (alpha - 1.0))
            }
        }
    }
}

/// The DPO family's losses for a batch of pairs (TRL 1.16 `DPOTrainer._compute_loss`).
///
/// `pair_weights` (`[n]`, WPO: `w_chosen * w_rejected` from [`wpo_weights`]) multiply every loss
/// type's per-row values; they are detached here.
///
/// `bco_pair` is TRL 1.16's: `-logsigmoid(beta * s_c) - logsigmoid(-beta * s_r)`, with no running
/// reward mean (that version keeps none).
///
/// # Shapes
/// - every input: `[n]`
/// - outputs: `[n]` each
pub fn dpo_loss(
    logps: &PairLogps,
    config: &DpoLossConfig,
    pair_weights: Option<Tensor<1>>,
) -> DpoLosses {
    let beta = config.beta;
    let ls = config.label_smoothing;
    let [n] = logps.policy_chosen.dims();
    let chosen_logratios = logps.policy_chosen.clone() - logps.reference_chosen.clone();
    let rejected_logratios = logps.policy_rejected.clone() - logps.reference_rejected.clone();
    let (kind, alpha) = (config.f_divergence_type, config.f_alpha_divergence_coef);
    let chosen_scores = f_score(chosen_logratios.clone(), kind, alpha);
    let rejected_scores = f_score(rejected_logratios.clone(), kind, alpha);
    let delta = chosen_scores.clone() - rejected_scores.clone();
    let pair_weights = pair_weights.map(Tensor::detach);

    // Per-token averages of the scores (`ipo`, `sigmoid_norm`).
    let avg_delta = || {
        chosen_scores.clone() / logps.chosen_tokens.clone().clamp_min(1.0)
            - rejected_scores.clone() / logps.rejected_tokens.clone().clamp_min(1.0)
    };

    let mut total: Option<Tensor<1>> = None;
    for &(loss_type, weight) in &config.losses {
        let z = delta.clone().mul_scalar(beta);
        let per_row = match loss_type {
            DpoLossType::Sigmoid => log_sigmoid(z).neg(),
            DpoLossType::Hinge => relu(z.neg().add_scalar(1.0)),
            DpoLossType::Ipo => avg_delta().sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
            DpoLossType::ExoPair => {
                let (log_pw, log_pl) = ((-ls).ln_1p(), ls.ln());
                let qw = sigmoid(z.clone());
                let ql = sigmoid(z.clone().neg());
                let log_qw = log_sigmoid(z.clone());
                let log_ql = log_sigmoid(z.neg());
                qw * log_qw.sub_scalar(log_pw) + ql * log_ql.sub_scalar(log_pl)
            }
            DpoLossType::NcaPair => {
                let c = chosen_scores.clone().mul_scalar(beta);
                let r = rejected_scores.clone().mul_scalar(beta);
                log_sigmoid(c.clone()).neg()
                    - log_sigmoid(c.neg()).mul_scalar(0.5)
                    - log_sigmoid(r.neg()).mul_scalar(0.5)
            }
            DpoLossType::Robust => (log_sigmoid(z.clone()).mul_scalar(-(1.0 - ls))
                + log_sigmoid(z.neg()).mul_scalar(ls))
            .div_scalar(1.0 - 2.0 * ls),
            DpoLossType::BcoPair => {
                let c = chosen_scores.clone().mul_scalar(beta);
                let r = rejected_scores.clone().mul_scalar(beta);
                log_sigmoid(c).neg() - log_sigmoid(r.neg())
            }
            DpoLossType::SppoHard => {
                chosen_scores.clone().sub_scalar(0.5 / beta).powi_scalar(2)
                    + rejected_scores
                        .clone()
                        .add_scalar(0.5 / beta)
                        .powi_scalar(2)
            }
            DpoLossType::Aot => {
                let policy = logps.policy_chosen.clone() - logps.policy_rejected.clone();
                let reference = logps.reference_chosen.clone() - logps.reference_rejected.clone();
                let d = policy.sort(0) - reference.sort(0);
                smoothed_logistic(d.mul_scalar(beta), ls)
            }
            DpoLossType::AotUnpaired => {
                let d = chosen_logratios.clone().sort(0) - rejected_logratios.clone().sort(0);
                smoothed_logistic(d.mul_scalar(beta), ls)
            }
            DpoLossType::ApoZero => {
                sigmoid(chosen_logratios.clone().mul_scalar(beta))
                    .neg()
                    .add_scalar(1.0)
                    + sigmoid(rejected_logratios.clone().mul_scalar(beta))
            }
            DpoLossType::ApoDown => {
                sigmoid(chosen_logratios.clone().mul_scalar(beta))
                    + sigmoid(z).neg().add_scalar(1.0)
            }
            DpoLossType::Discopop => {
                let modulation = sigmoid(z.clone().div_scalar(config.discopop_tau));
                let logistic = log_sigmoid(z.clone()).neg();
                let exponential = z.neg().exp();
                logistic * modulation.clone().neg().add_scalar(1.0) + exponential * modulation
            }
            DpoLossType::Sft => {
                let chosen = logps
                    .sft_chosen
                    .clone()
                    .unwrap_or_else(|| logps.policy_chosen.clone());
                token_mean_nll(chosen, logps.chosen_tokens.clone()).expand([n])
            }
            DpoLossType::SigmoidNorm => log_sigmoid(avg_delta().mul_scalar(beta)).neg(),
        };
        let per_row = match &pair_weights {
            Some(w) => per_row * w.clone(),
            None => per_row,
        }
        .mul_scalar(weight);
        total = Some(match total {
            Some(t) => t + per_row,
            None => per_row,
        });
    }

    DpoLosses {
        per_example: total.expect("DpoLossConfig.losses holds at least one loss type"),
        chosen_rewards: chosen_logratios.detach().mul_scalar(beta),
        rejected_rewards: rejected_logratios.detach().mul_scalar(beta),
    }
}

/// LD-DPO's length-desensitised sequence log-probs (TRL's `ld_alpha`): for each pair, the sum
/// over the first `min(len_c, len_r)` completion tokens plus `ld_alpha` times the sum over the
/// rest, on both sides. Apply it to the policy and to the reference alike.
///
/// # Shapes
/// - `*_token_logps`: `[n, T]` per-token log-probs (values outside the mask are ignored)
/// - `*_mask`: `[n, T]` 1.0 on completion tokens (EOS included), 0.0 elsewhere; the two sides may
///   have different `T`
/// - outputs: `[n]` chosen, `[n]` rejected
pub fn ld_logps(
    chosen_token_logps: Tensor<2>,
    chosen_mask: Tensor<2>,
    rejected_token_logps: Tensor<2>,
    rejected_mask: Tensor<2>,
    ld_alpha: f64,
) -> (Tensor<1>, Tensor<1>) {
    let shared = chosen_mask
        .clone()
        .sum_dim(1)
        .min_pair(rejected_mask.clone().sum_dim(1));
    let side = |token_logps: Tensor<2>, mask: Tensor<2>| {
        let [n, t] = mask.dims();
        let in_completion = mask.clone().greater_elem(0.5);
        let logps = token_logps.mask_fill(in_completion.clone().bool_not(), 0.0);
        // 1-based rank of each completion token within its completion.
        let rank = mask.cumsum(1);
        let in_shared = rank.lower_equal(shared.clone().expand([n, t]));
        let shared_sum = logps.clone().mask_fill(in_shared.clone().bool_not(), 0.0);
        let tail_sum = logps.mask_fill(in_shared, 0.0);
        (shared_sum.sum_dim(1) + tail_sum.sum_dim(1).mul_scalar(ld_alpha)).squeeze_dim::<1>(1)
    };
    (
        side(chosen_token_logps, chosen_mask),
        side(rejected_token_logps, rejected_mask),
    )
}

/// WPO's per-sequence weights (TRL's `use_weighting`, Eq. 2 of the WPO paper):
/// `exp(mean over completion tokens of (log p(token) - log sum_v p_v^2))` under the current
/// policy (`log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)`, which the LM head's
/// `PositionValues` carry). Detached, as in TRL. The weight of a pair is
/// `w_chosen * w_rejected`.
///
/// # Shapes
/// - token_logps: `[n, T]` log-prob of the token at each position (values outside the mask are
///   ignored)
/// - log_sum_p2: `[n, T]` `log sum_v p_v^2` of the distribution that predicted each of those
///   tokens
/// - mask: `[n, T]` 1.0 on completion tokens
/// - output: `[n]`
pub fn wpo_weights(token_logps: Tensor<2>, log_sum_p2: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let log_denom = log_sum_p2.detach();
    let in_completion = mask.clone().greater_elem(0.5).bool_not();
    let aligned = (token_logps.detach() - log_denom).mask_fill(in_completion, 0.0);
    let lengths = mask.sum_dim(1).clamp_min(1.0);
    (aligned.sum_dim(1) / lengths).exp().squeeze_dim::<1>(1)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::losses::test_util::*;

    fn pair() -> PairLogps {
        PairLogps {
            policy_chosen: t(&[-1.0, -10.0]),
            policy_rejected: t(&[-2.0, -8.0]),
            reference_chosen: t(&[-1.5, -9.0]),
            reference_rejected: t(&[-1.5, -9.0]),
            chosen_tokens: t(&[2.0, 4.0]),
            rejected_tokens: t(&[3.0, 5.0]),
            sft_chosen: None,
        }
    }

    #[test]
    fn sigmoid_ipo_and_mixes_by_hand() {
        let beta = 0.5;
        // Log-ratios: chosen (0.5, -1), rejected (-0.5, 1).
        let sig = dpo_loss(
            &pair(),
            &DpoLossConfig::single(DpoLossType::Sigmoid, beta),
            None,
        );
        let got = values(sig.per_example);
        close(got[0], softplus(-0.5), 1e-6);
        close(got[1], softplus(1.0), 1e-6);
        assert_eq!(values(sig.chosen_rewards), vec![0.25, -0.5]);

        let ipo = dpo_loss(
            &pair(),
            &DpoLossConfig::single(DpoLossType::Ipo, beta),
            None,
        );
        let got = values(ipo.per_example);
        close(got[0], (0.5 / 2.0 + 0.5 / 3.0 - 1.0f64).powi(2), 1e-6);
        close(got[1], (-1.0 / 4.0 - 1.0 / 5.0 - 1.0f64).powi(2), 1e-6);

        // MPO: 2 * sigmoid + sft, where sft = 11 / 6 on every row.
        let mut mix = DpoLossConfig::single(DpoLossType::Sigmoid, beta);
        mix.losses = vec![(DpoLossType::Sigmoid, 2.0), (DpoLossType::Sft, 1.0)];
        let got = values(dpo_loss(&pair(), &mix, None).per_example);
        close(got[0], 2.0 * softplus(-0.5) + 11.0 / 6.0, 1e-6);
        close(got[1], 2.0 * softplus(1.0) + 11.0 / 6.0, 1e-6);
    }
    #[test]
    fn dpo_gradient_reaches_the_policy_and_weights_are_constants() {
        let mut logps = pair();
        logps.policy_chosen = logps.policy_chosen.require_grad();
        let weights = t(&[0.5, 2.0]).require_grad();
        let config = DpoLossConfig::single(DpoLossType::Sigmoid, 0.5);
        let out = dpo_loss(&logps, &config, Some(weights.clone()));
        let grads = out.loss().backward();
        let g = values(logps.policy_chosen.grad(&grads).unwrap());
        // d/dpc mean(w * softplus(-beta * delta)) = -w * beta * sigmoid(-z) / n
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(g[0], -0.5 * 0.5 * sigmoid(-0.5) / 2.0, 1e-6);
        close(g[1], -2.0 * 0.5 * sigmoid(1.0) / 2.0, 1e-6);
        assert!(weights.grad(&grads).is_none());
    }
    #[test]
    fn ld_logps_weigh_the_tail() {
        // Chosen: prompt token, 2 completion tokens, padding; rejected: 3 completion tokens.
        let chosen = t2(&[&[-7.0, -1.0, -2.0, -100.0]]);
        let chosen_mask = t2(&[&[0.0, 1.0, 1.0, 0.0]]);
        let rejected = t2(&[&[-7.0, -1.0, -1.0, -4.0]]);
        let rejected_mask = t2(&[&[0.0, 1.0, 1.0, 1.0]]);
        let (c, r) = ld_logps(chosen, chosen_mask, rejected, rejected_mask, 0.5);
        assert_eq!(values(c), vec![-3.0]);
        assert_eq!(values(r), vec![-4.0]);
    }
    #[test]
    fn wpo_weights_by_hand() {
        // One row, two positions (the second is not a completion token), vocab 3.
        let logits: [[f64; 3]; 2] = [[0.5, -1.0, 2.0], [3.0, 0.0, 0.0]];
        let target = 2;
        let lse = |z: &[f64]| z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let z = &logits[0];
        let token_logp = z[target] - lse(z);
        let log_sum_p2 = lse(&z.map(|v| 2.0 * v)) - 2.0 * lse(z);
        let expected = (token_logp - log_sum_p2).exp();

        let token_logps = t2(&[&[token_logp as f32, -50.0]]).require_grad();
        // The second position's value is not a completion token's: ignored.
        let log_sum_p2 = t2(&[&[log_sum_p2 as f32, 7.0]]).require_grad();
        let mask = t2(&[&[1.0, 0.0]]);
        let w = wpo_weights(token_logps.clone(), log_sum_p2.clone(), mask);
        close(values(w.clone())[0], expected, 1e-6);
        let grads = w.sum().backward();
        assert!(token_logps.grad(&grads).is_none());
        assert!(log_sum_p2.grad(&grads).is_none());
    }
}
