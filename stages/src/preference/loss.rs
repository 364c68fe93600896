//! The loss math of the preference family, exactly as TRL 1.16 writes it: DPO and its loss types
//! (with MPO mixes, f-divergences, LD-DPO and WPO), CPO/SimPO, ORPO and KTO. Inputs are sequence
//! log-probs already reduced over completion tokens; nothing here runs a model.
//!
//! Every function is differentiable through the policy tensors and detaches what TRL detaches
//! (rewards, KTO's KL estimate, WPO weights), so it can sit inside an autodiff training step.
//! Per-example outputs average to the batch loss, so a training loop can weight or accumulate
//! them without knowing the loss type.

use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};
use rudder_schema::kinds::{
    CpoLossType, DpoLossType, DpoParams, FDivergenceType, KtoLossType, KtoParams, SimpoParams,
};

/// `x` as a host number (for metrics).
fn scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.into_scalar().elem::<f64>()
}

/// `-sum(logps) / sum(tokens)`: the token-level mean NLL of a batch (TRL's `sft` term, CPO's and
/// ORPO's NLL), not a mean of per-row means.
///
/// # Shapes
/// - logps, tokens: `[n]` (sequence log-prob sums and their token counts)
/// - output: `[1]`
pub fn token_mean_nll<B: Backend>(logps: Tensor<B, 1>, tokens: Tensor<B, 1>) -> Tensor<B, 1> {
    logps.sum().neg() / tokens.sum()
}

// ---------------------------------------------------------------------------------------------
// DPO
// ---------------------------------------------------------------------------------------------

/// The per-pair log-probs a DPO step needs. Rows are pairs, in the same order in every tensor.
#[derive(Debug, Clone)]
pub struct PairLogps<B: Backend> {
    /// `[n]` policy sequence log-probs (LD-weighted when `ld_alpha` is set).
    pub policy_chosen: Tensor<B, 1>,
    pub policy_rejected: Tensor<B, 1>,
    /// `[n]` reference sequence log-probs, same weighting as the policy's.
    pub reference_chosen: Tensor<B, 1>,
    pub reference_rejected: Tensor<B, 1>,
    /// `[n]` completion token counts (EOS included), as floats: `ipo`, `sigmoid_norm` and `sft`
    /// divide by them.
    pub chosen_tokens: Tensor<B, 1>,
    pub rejected_tokens: Tensor<B, 1>,
    /// `[n]` plain (unweighted) policy chosen sums for the `sft` term; `None` means
    /// `policy_chosen`. They differ only under LD-DPO, where TRL's `sft` term stays the plain
    /// cross-entropy.
    pub sft_chosen: Option<Tensor<B, 1>>,
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

impl From<&DpoParams> for DpoLossConfig {
    /// Missing `loss_weights` weigh every loss type 1, as TRL does.
    fn from(p: &DpoParams) -> Self {
        let types = p.loss_type.to_vec();
        let weights = p
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; types.len()]);
        Self {
            losses: types.into_iter().zip(weights).collect(),
            beta: p.beta,
            label_smoothing: p.label_smoothing,
            discopop_tau: p.discopop_tau,
            f_divergence_type: p.f_divergence_type,
            f_alpha_divergence_coef: p.f_alpha_divergence_coef,
        }
    }
}

/// What a DPO step produces.
#[derive(Debug, Clone)]
pub struct DpoLosses<B: Backend> {
    /// `[n]`: `sum_i w_i * loss_i` per row; its mean is the batch loss. For `aot`/`aot_unpaired`
    /// element `k` pairs the k-th smallest values of the batch, not pair `k`; for `sft` every
    /// element is the batch's token-mean NLL.
    pub per_example: Tensor<B, 1>,
    /// `[n]`, detached: `beta * (policy - reference)` (the log-ratio, whatever the f-divergence).
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
}

impl<B: Backend> DpoLosses<B> {
    /// The batch loss, `[1]`.
    pub fn loss(&self) -> Tensor<B, 1> {
        self.per_example.clone().mean()
    }
}

/// `-logsigmoid(x) * (1 - ls) - logsigmoid(-x) * ls`: the label-smoothed logistic loss.
fn smoothed_logistic<B: Backend>(x: Tensor<B, 1>, ls: f64) -> Tensor<B, 1> {
    let pos = log_sigmoid(x.clone()).neg().mul_scalar(1.0 - ls);
    if ls == 0.0 {
        return pos;
    }
    pos - log_sigmoid(x.neg()).mul_scalar(ls)
}

/// The f-divergence's score of a log-ratio (TRL: `f'(t)` up to constants).
fn f_score<B: Backend>(logratio: Tensor<B, 1>, kind: FDivergenceType, alpha: f64) -> Tensor<B, 1> {
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
pub fn dpo_loss<B: Backend>(
    logps: &PairLogps<B>,
    config: &DpoLossConfig,
    pair_weights: Option<Tensor<B, 1>>,
) -> DpoLosses<B> {
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

    let mut total: Option<Tensor<B, 1>> = None;
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
pub fn ld_logps<B: Backend>(
    chosen_token_logps: Tensor<B, 2>,
    chosen_mask: Tensor<B, 2>,
    rejected_token_logps: Tensor<B, 2>,
    rejected_mask: Tensor<B, 2>,
    ld_alpha: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let shared = chosen_mask
        .clone()
        .sum_dim(1)
        .min_pair(rejected_mask.clone().sum_dim(1));
    let side = |token_logps: Tensor<B, 2>, mask: Tensor<B, 2>| {
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
/// policy, with `log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)`. Detached, as in TRL. The
/// weight of a pair is `w_chosen * w_rejected`.
///
/// # Shapes
/// - token_logps: `[n, T]` log-prob of the token at each position (values outside the mask are
///   ignored)
/// - logits: `[n, T, V]` the logits that predicted those tokens (already shifted: position `j`
///   predicts `token_logps[:, j]`)
/// - mask: `[n, T]` 1.0 on completion tokens
/// - output: `[n]`
pub fn wpo_weights<B: Backend>(
    token_logps: Tensor<B, 2>,
    logits: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let logits = logits.detach();
    let lse = |x: Tensor<B, 3>| {
        let max = x.clone().max_dim(2);
        (x - max.clone()).exp().sum_dim(2).log() + max
    };
    let log_denom =
        (lse(logits.clone().mul_scalar(2.0)) - lse(logits).mul_scalar(2.0)).squeeze_dim::<2>(2);
    let in_completion = mask.clone().greater_elem(0.5).bool_not();
    let aligned = (token_logps.detach() - log_denom).mask_fill(in_completion, 0.0);
    let lengths = mask.sum_dim(1).clamp_min(1.0);
    (aligned.sum_dim(1) / lengths).exp().squeeze_dim::<1>(1)
}

// ---------------------------------------------------------------------------------------------
// CPO / SimPO
// ---------------------------------------------------------------------------------------------

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
pub struct CpoLosses<B: Backend> {
    /// `[n]`: the preference term per pair (without the NLL).
    pub per_example: Tensor<B, 1>,
    /// `[1]`: `mean(per_example) + cpo_alpha * nll`.
    pub loss: Tensor<B, 1>,
    /// `[n]`, detached: `beta * policy logps` (averages where the loss uses them).
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
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
pub fn cpo_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    chosen_nll: Option<Tensor<B, 1>>,
    config: &CpoLossConfig,
) -> CpoLosses<B> {
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

// ---------------------------------------------------------------------------------------------
// ORPO
// ---------------------------------------------------------------------------------------------

/// `log(1 - exp(x))` for `x < 0`, accurate on both sides of `-ln 2` as TRL's `log1mexp`. Near 0
/// it is `log(-x) + log((exp(x) - 1) / x)` with the second factor's Taylor series, which stays
/// exact in f32 where `1 - exp(x)` would cancel.
pub fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
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
pub struct OrpoLosses<B: Backend> {
    /// `[1]`: `nll - mean(per_example_or_term)`.
    pub loss: Tensor<B, 1>,
    /// `[n]`: `beta * logsigmoid(log_odds)`, which the loss subtracts.
    pub per_example_or_term: Tensor<B, 1>,
    /// `[n]`: `(a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`.
    pub log_odds: Tensor<B, 1>,
    /// `[n]`, detached: `beta * average logps`.
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
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
pub fn orpo_loss<B: Backend>(
    chosen_avg: Tensor<B, 1>,
    rejected_avg: Tensor<B, 1>,
    chosen_nll: Tensor<B, 1>,
    beta: f64,
) -> OrpoLosses<B> {
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

// ---------------------------------------------------------------------------------------------
// KTO
// ---------------------------------------------------------------------------------------------

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
pub fn kto_kl<B: Backend>(policy_kl: Tensor<B, 1>, reference_kl: Tensor<B, 1>) -> Tensor<B, 1> {
    (policy_kl - reference_kl).mean().detach().clamp_min(0.0)
}

/// What a KTO step produces.
#[derive(Debug, Clone)]
pub struct KtoLosses<B: Backend> {
    /// `[n]`, row order kept: the weighted loss of each row; TRL's loss is their plain mean.
    pub per_example: Tensor<B, 1>,
    /// `[n]`, detached: `beta * (policy - reference)`.
    pub rewards: Tensor<B, 1>,
}

impl<B: Backend> KtoLosses<B> {
    /// The batch loss, `[1]`.
    pub fn loss(&self) -> Tensor<B, 1> {
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
pub fn kto_loss<B: Backend>(
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    desirable: &[bool],
    kl: Option<Tensor<B, 1>>,
    config: &KtoLossConfig,
) -> KtoLosses<B> {
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
    let mask = Tensor::<B, 1, Bool>::from_data(TensorData::new(desirable.to_vec(), [n]), &device);
    let per_example = bad
        .mul_scalar(config.undesirable_weight)
        .mask_where(mask, good.mul_scalar(config.desirable_weight));
    KtoLosses {
        per_example,
        rewards: logratios.detach().mul_scalar(beta),
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The reward and log-prob metrics TRL logs for paired losses (DPO, CPO/SimPO, ORPO), under
/// TRL's names: means over pairs; `rewards/accuracies` counts strict `chosen > rejected`. Pass the
/// log-probs the loss used (LD-weighted under LD-DPO, averages for SimPO/ORPO).
///
/// # Shapes
/// - every input: `[n]`
pub fn pair_metrics<B: Backend>(
    chosen_rewards: Tensor<B, 1>,
    rejected_rewards: Tensor<B, 1>,
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
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

/// KTO's logged metrics, TRL's names: `kl`, then `rewards/*` and `logps/*` as means over the
/// desirable (`chosen`) and undesirable (`rejected`) rows, each side only when present, and
/// `rewards/margins` (difference of the two reward means) when both are.
///
/// # Shapes
/// - rewards, policy: `[n]`; desirable: `n` labels; kl: `[1]`
pub fn kto_metrics<B: Backend>(
    rewards: Tensor<B, 1>,
    policy: Tensor<B, 1>,
    desirable: &[bool],
    kl: Option<Tensor<B, 1>>,
) -> Vec<(&'static str, f64)> {
    let values = |t: Tensor<B, 1>| -> Vec<f64> {
        t.detach()
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
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
    use burn::backend::Autodiff;

    use super::*;
    use crate::TestBackend;

    type B = TestBackend;
    type A = Autodiff<TestBackend>;

    fn t<Bk: Backend>(v: &[f32]) -> Tensor<Bk, 1> {
        Tensor::from_floats(v, &Default::default())
    }

    fn t2<Bk: Backend>(rows: &[&[f32]]) -> Tensor<Bk, 2> {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(
            TensorData::new(flat, [rows.len(), rows[0].len()]),
            &Default::default(),
        )
    }

    fn values<Bk: Backend>(x: Tensor<Bk, 1>) -> Vec<f64> {
        x.into_data().convert::<f64>().into_vec::<f64>().unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
    }

    fn softplus(x: f64) -> f64 {
        (1.0 + x.exp()).ln()
    }

    fn pair<Bk: Backend>() -> PairLogps<Bk> {
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
            &pair::<B>(),
            &DpoLossConfig::single(DpoLossType::Sigmoid, beta),
            None,
        );
        let got = values(sig.per_example);
        close(got[0], softplus(-0.5), 1e-6);
        close(got[1], softplus(1.0), 1e-6);
        assert_eq!(values(sig.chosen_rewards), vec![0.25, -0.5]);

        let ipo = dpo_loss(
            &pair::<B>(),
            &DpoLossConfig::single(DpoLossType::Ipo, beta),
            None,
        );
        let got = values(ipo.per_example);
        close(got[0], (0.5 / 2.0 + 0.5 / 3.0 - 1.0f64).powi(2), 1e-6);
        close(got[1], (-1.0 / 4.0 - 1.0 / 5.0 - 1.0f64).powi(2), 1e-6);

        // MPO: 2 * sigmoid + sft, where sft = 11 / 6 on every row.
        let mut mix = DpoLossConfig::single(DpoLossType::Sigmoid, beta);
        mix.losses = vec![(DpoLossType::Sigmoid, 2.0), (DpoLossType::Sft, 1.0)];
        let got = values(dpo_loss(&pair::<B>(), &mix, None).per_example);
        close(got[0], 2.0 * softplus(-0.5) + 11.0 / 6.0, 1e-6);
        close(got[1], 2.0 * softplus(1.0) + 11.0 / 6.0, 1e-6);
    }

    #[test]
    fn dpo_gradient_reaches_the_policy_and_weights_are_constants() {
        let mut logps = pair::<A>();
        logps.policy_chosen = logps.policy_chosen.require_grad();
        let weights = t::<A>(&[0.5, 2.0]).require_grad();
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
        let chosen = t2::<B>(&[&[-7.0, -1.0, -2.0, -100.0]]);
        let chosen_mask = t2::<B>(&[&[0.0, 1.0, 1.0, 0.0]]);
        let rejected = t2::<B>(&[&[-7.0, -1.0, -1.0, -4.0]]);
        let rejected_mask = t2::<B>(&[&[0.0, 1.0, 1.0, 1.0]]);
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

        let flat: Vec<f32> = logits.iter().flatten().map(|&v| v as f32).collect();
        let logits =
            Tensor::<A, 3>::from_data(TensorData::new(flat, [1, 2, 3]), &Default::default())
                .require_grad();
        let token_logps = t2::<A>(&[&[token_logp as f32, -50.0]]).require_grad();
        let mask = t2::<A>(&[&[1.0, 0.0]]);
        let w = wpo_weights(token_logps.clone(), logits.clone(), mask);
        close(values(w.clone())[0], expected, 1e-6);
        let grads = w.sum().backward();
        assert!(token_logps.grad(&grads).is_none());
        assert!(logits.grad(&grads).is_none());
    }

    #[test]
    fn log1mexp_is_accurate_near_zero_and_far() {
        let xs = [-1e-6f32, -1e-3, -0.1, -0.69, -0.7, -2.0, -9.0];
        let got = values(log1mexp(t::<B>(&xs)));
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
        let out = cpo_loss(t::<B>(&[-1.0]), t(&[-2.0]), Some(t(&[3.0])), &config);
        // 2 * ((-1 + 2) - 1 / 2) = 1
        close(values(out.per_example)[0], softplus(-1.0), 1e-6);
        close(values(out.loss)[0], softplus(-1.0) + 1.5, 1e-6);
        assert_eq!(values(out.chosen_rewards), vec![-2.0]);

        let (a, b) = (-0.5f64, -1.5f64);
        let log_odds = (a - b) - ((-a.exp_m1()).ln() - (-b.exp_m1()).ln());
        let out = orpo_loss(t::<B>(&[a as f32]), t(&[b as f32]), t(&[2.0]), 0.1);
        close(values(out.log_odds)[0], log_odds, 1e-6);
        close(values(out.loss)[0], 2.0 + 0.1 * softplus(-log_odds), 1e-6);
        close(out.log_odds_chosen, log_odds, 1e-6);
    }

    #[test]
    fn kto_weights_rows_and_detaches_kl() {
        let policy = t::<A>(&[-1.0, -2.0, -3.0]).require_grad();
        let reference = t::<A>(&[-2.0, -2.0, -2.0]);
        let policy_kl = t::<A>(&[-1.0, -1.0]).require_grad();
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
