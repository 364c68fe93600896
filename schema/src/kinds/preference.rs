//! Offline preference optimisation: the DPO family, KTO, ORPO, SimPO/CPO, and iterative DPO.
//! Parameter names and defaults are TRL 1.16's.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    Expansion, Expect, FieldError, InputField, Judge, Kind, OneOrMany, PartInput, PartSpec,
    Produces, Sampling, StageSpec, TrainArgs, TruncationMode, check_judge, input, judge_input,
    model_and_data, stage_common,
};
use crate::source::ValuePath;

/// DPO-family losses, as TRL's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    SigmoidNorm,
    Sft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FDivergenceType {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

/// Checks a DPO loss list: one weight per loss type, and `exo_pair`'s required smoothing.
fn check_losses(
    loss_type: &OneOrMany<DpoLossType>,
    loss_weights: Option<&[f64]>,
    label_smoothing: f64,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let losses = loss_type.to_vec();
    match loss_weights {
        Some(weights) if weights.len() != losses.len() => errors.push(FieldError::new(
            ValuePath::root().key("loss_weights"),
            format!(
                "loss_weights has {} entries but loss_type has {}",
                weights.len(),
                losses.len()
            ),
        )),
        _ => {}
    }
    if losses.contains(&DpoLossType::ExoPair) && label_smoothing <= 0.0 {
        errors.push(FieldError::new(
            ValuePath::root().key("label_smoothing"),
            "loss_type `exo_pair` needs label_smoothing > 0 (TRL uses 1e-3)",
        ));
    }
    errors
}

/// Tokenisation settings shared by the preference kinds (they key the reference log-probs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PreferenceTokens {
    /// Longest prompt + completion, in tokens.
    #[schemars(range(min = 8))]
    pub max_length: u32,
    /// Longest prompt, in tokens.
    #[schemars(range(min = 1))]
    pub max_prompt_length: Option<u32>,
    /// Longest completion, in tokens.
    #[schemars(range(min = 1))]
    pub max_completion_length: Option<u32>,
    pub truncation_mode: TruncationMode,
}

impl Default for PreferenceTokens {
    fn default() -> Self {
        Self {
            max_length: 1024,
            max_prompt_length: None,
            max_completion_length: None,
            truncation_mode: TruncationMode::KeepStart,
        }
    }
}

/// Direct preference optimisation and its family of losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct DpoParams {
    /// The policy's starting model.
    pub model: String,
    /// The frozen reference; defaults to `model`.
    pub reference: Option<String>,
    /// Preference data: prompt, chosen, rejected.
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    /// Strength of the implicit KL constraint.
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: f64,
    /// One loss type, or a list mixed with `loss_weights`.
    pub loss_type: OneOrMany<DpoLossType>,
    pub loss_weights: Option<Vec<f64>>,
    #[schemars(range(min = 0.0, max = 0.5))]
    pub label_smoothing: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub discopop_tau: f64,
    pub f_divergence_type: FDivergenceType,
    pub f_alpha_divergence_coef: f64,
    /// LD-DPO: weight of the log-probs of tokens past the shorter completion's length.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ld_alpha: Option<f64>,
    /// WPO weighting.
    pub use_weighting: bool,
    /// RPO: weight of the NLL term on chosen completions.
    #[schemars(range(min = 0.0))]
    pub rpo_alpha: Option<f64>,
    /// TR-DPO: update the reference towards the policy during training.
    pub sync_ref_model: bool,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ref_model_mixup_alpha: f64,
    #[schemars(range(min = 1))]
    pub ref_model_sync_steps: u64,
    #[serde(flatten)]
    pub tokens: PreferenceTokens,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for DpoParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            reference: None,
            data: String::new(),
            learning_rate: 1e-6,
            beta: 0.1,
            loss_type: OneOrMany::One(DpoLossType::Sigmoid),
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 1.0,
            ld_alpha: None,
            use_weighting: false,
            rpo_alpha: None,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            tokens: PreferenceTokens::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for DpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "dpo";
    const SUMMARY: &'static str = "direct preference optimisation (and its loss family)";
}

/// The reference model's role: `reference` when given, else the policy's starting `model`.
fn reference_input(model: &str, reference: Option<&str>) -> InputField {
    match reference {
        Some(reference) => input("reference", reference, Expect::Model),
        None => InputField {
            role: "reference".into(),
            ..input("model", model, Expect::Model)
        },
    }
}

/// The internal node that computes the frozen reference's log-probs once, keyed only by what
/// determines them, so that every stage and recipe with the same reference and data shares them.
fn ref_logps_part(kind: &str, tokens: &PreferenceTokens) -> PartSpec {
    PartSpec {
        name: "ref_logps".into(),
        kind: format!("{kind}/ref_logps"),
        params: serde_json::to_value(tokens).expect("serialisable"),
        inputs: vec![
            ("reference".into(), PartInput::Role("reference".into())),
            ("data".into(), PartInput::Role("data".into())),
        ],
    }
}

fn ref_logps_expansion(kind: &str, tokens: &PreferenceTokens) -> Expansion {
    Expansion {
        parts: vec![ref_logps_part(kind, tokens)],
        stage_inputs: vec![("ref_logps".into(), "ref_logps".into())],
    }
}

fn check_tokens(tokens: &PreferenceTokens) -> Vec<FieldError> {
    match tokens.max_prompt_length {
        Some(p) if p >= tokens.max_length => vec![FieldError::new(
            ValuePath::root().key("max_prompt_length"),
            "max_prompt_length must be smaller than max_length",
        )],
        _ => Vec::new(),
    }
}

impl StageSpec for DpoParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        vec![
            input("model", &self.model, Expect::Model),
            reference_input(&self.model, self.reference.as_deref()),
            input("data", &self.data, Expect::Dataset),
        ]
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn expand(&self) -> Expansion {
        // A reference that moves during training (TR-DPO) cannot be precomputed.
        if self.sync_ref_model {
            Expansion::default()
        } else {
            ref_logps_expansion("dpo", &self.tokens)
        }
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_tokens(&self.tokens);
        errors.extend(check_losses(
            &self.loss_type,
            self.loss_weights.as_deref(),
            self.label_smoothing,
        ));
        errors
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    Kto,
    ApoZeroUnpaired,
}

/// Kahneman-Tversky optimisation on paired or unpaired (`prompt`, `completion`, `label`) data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct KtoParams {
    pub model: String,
    pub reference: Option<String>,
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: f64,
    pub loss_type: KtoLossType,
    #[schemars(range(min = 0.0))]
    pub desirable_weight: f64,
    #[schemars(range(min = 0.0))]
    pub undesirable_weight: f64,
    #[serde(flatten)]
    pub tokens: PreferenceTokens,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for KtoParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            reference: None,
            data: String::new(),
            learning_rate: 1e-6,
            beta: 0.1,
            loss_type: KtoLossType::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            tokens: PreferenceTokens::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for KtoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "kto";
    const SUMMARY: &'static str = "Kahneman-Tversky optimisation";
}

impl StageSpec for KtoParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        vec![
            input("model", &self.model, Expect::Model),
            reference_input(&self.model, self.reference.as_deref()),
            input("data", &self.data, Expect::Dataset),
        ]
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn expand(&self) -> Expansion {
        ref_logps_expansion("kto", &self.tokens)
    }
    fn check(&self) -> Vec<FieldError> {
        check_tokens(&self.tokens)
    }
}

/// Odds-ratio preference optimisation (no reference model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct OrpoParams {
    pub model: String,
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    /// Weight of the odds-ratio term (TRL's lambda).
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: f64,
    #[serde(flatten)]
    pub tokens: PreferenceTokens,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for OrpoParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            learning_rate: 1e-6,
            beta: 0.1,
            tokens: PreferenceTokens::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for OrpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "orpo";
    const SUMMARY: &'static str = "odds-ratio preference optimisation";
}

impl StageSpec for OrpoParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        check_tokens(&self.tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CpoLossType {
    Simpo,
    Sigmoid,
    Hinge,
    Ipo,
}

/// SimPO, and CPO with its other losses (reference-free).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct SimpoParams {
    pub model: String,
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: f64,
    pub loss_type: CpoLossType,
    /// SimPO's target reward margin.
    pub simpo_gamma: f64,
    /// Weight of the NLL term on chosen completions (0 for pure SimPO).
    #[schemars(range(min = 0.0))]
    pub cpo_alpha: f64,
    #[schemars(range(min = 0.0, max = 0.5))]
    pub label_smoothing: f64,
    #[serde(flatten)]
    pub tokens: PreferenceTokens,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for SimpoParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            learning_rate: 1e-6,
            beta: 2.0,
            loss_type: CpoLossType::Simpo,
            simpo_gamma: 0.5,
            cpo_alpha: 0.0,
            label_smoothing: 0.0,
            tokens: PreferenceTokens::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for SimpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "simpo";
    const SUMMARY: &'static str = "SimPO / CPO, reference-free preference optimisation";
}

impl StageSpec for SimpoParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        check_tokens(&self.tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// The best and the worst sample of each prompt.
    BestWorst,
    /// Every pair whose score gap exceeds `min_margin`.
    AllPairs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoundReference {
    /// The starting model, every round.
    Initial,
    /// The previous round's policy.
    Previous,
}

/// Per-round overrides of iterative DPO (`[stages.X.round.2]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoundOverrides {
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: Option<f64>,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: Option<f64>,
    #[schemars(range(min = 2))]
    pub num_samples: Option<u32>,
    #[schemars(range(min = 0.0))]
    pub temperature: Option<f64>,
    #[schemars(range(min = 0.0))]
    pub min_margin: Option<f64>,
    #[schemars(range(min = 1))]
    pub epochs: Option<u32>,
}

/// Generate, judge, pair and DPO-train, for several rounds; each round is its own cached node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct IterativeDpoParams {
    pub model: String,
    /// Prompts.
    pub data: String,
    pub judge: Judge,
    #[schemars(range(min = 1, max = 1000))]
    pub rounds: u32,
    /// Completions sampled per prompt each round.
    #[schemars(range(min = 2))]
    pub num_samples: u32,
    pub pairing: Pairing,
    #[schemars(range(min = 0.0))]
    pub min_margin: f64,
    pub reference: RoundReference,
    /// Overrides for single rounds, by round number.
    pub round: BTreeMap<String, RoundOverrides>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub beta: f64,
    pub loss_type: OneOrMany<DpoLossType>,
    pub loss_weights: Option<Vec<f64>>,
    #[schemars(range(min = 0.0, max = 0.5))]
    pub label_smoothing: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub discopop_tau: f64,
    pub f_divergence_type: FDivergenceType,
    pub f_alpha_divergence_coef: f64,
    /// LD-DPO: weight of the log-probs of tokens past the shorter completion's length.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ld_alpha: Option<f64>,
    /// WPO weighting.
    pub use_weighting: bool,
    /// RPO: weight of the NLL term on chosen completions.
    #[schemars(range(min = 0.0))]
    pub rpo_alpha: Option<f64>,
    #[serde(flatten)]
    pub tokens: PreferenceTokens,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for IterativeDpoParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            judge: Judge::Node(String::new()),
            rounds: 3,
            num_samples: 4,
            pairing: Pairing::BestWorst,
            min_margin: 0.0,
            reference: RoundReference::Initial,
            round: BTreeMap::new(),
            sampling: Sampling::default(),
            learning_rate: 1e-6,
            beta: 0.1,
            loss_type: OneOrMany::One(DpoLossType::Sigmoid),
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 1.0,
            ld_alpha: None,
            use_weighting: false,
            rpo_alpha: None,
            tokens: PreferenceTokens::default(),
            train: TrainArgs {
                epochs: 1,
                ..TrainArgs::default()
            },
        }
    }
}

/// The kind of one round: the parts and the stage itself (its last round) share it.
const ROUND_KIND: &str = "iterative_dpo/round";

impl Kind for IterativeDpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data", "judge"];
    const NAME: &'static str = "iterative_dpo";
    const SUMMARY: &'static str = "rounds of sample, judge, pair and DPO";
}

impl IterativeDpoParams {
    /// The parameters of round `n` (1-based): shared ones with that round's overrides applied.
    /// `rounds` and the override table itself are left out, so that adding a round or
    /// overriding a later one leaves earlier rounds' keys unchanged.
    pub fn round_params(&self, n: u32) -> serde_json::Value {
        let mut params = super::to_params(self);
        let map = params
            .as_object_mut()
            .expect("struct serialises to an object");
        map.remove("rounds");
        map.remove("round");
        if let Some(overrides) = self.round.get(&n.to_string()) {
            let overrides = super::to_params(overrides);
            for (key, value) in overrides.as_object().expect("object") {
                if !value.is_null() {
                    map.insert(key.clone(), value.clone());
                }
            }
        }
        map.insert("round".into(), json!(n));
        super::without_references(params, &self.inputs())
    }
}

impl StageSpec for IterativeDpoParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        let mut inputs = vec![
            input("model", &self.model, Expect::Model),
            input("data", &self.data, Expect::Dataset),
        ];
        inputs.extend(judge_input(&self.judge));
        inputs
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    /// Rounds 1..R-1 are parts `round-N`; the stage itself is round R, so raising `rounds`
    /// turns the old last round into a part with an unchanged key.
    fn expand(&self) -> Expansion {
        let judge_role = judge_input(&self.judge).map(|j| j.role);
        let round_inputs = |n: u32| {
            let mut inputs = vec![
                ("model".to_owned(), PartInput::Role("model".into())),
                ("data".to_owned(), PartInput::Role("data".into())),
            ];
            if n > 1 {
                inputs.push((
                    "previous".into(),
                    PartInput::Part(format!("round-{}", n - 1)),
                ));
            }
            if let Some(role) = &judge_role {
                inputs.push(("judge".into(), PartInput::Role(role.clone())));
            }
            inputs
        };
        let parts = (1..self.rounds)
            .map(|n| PartSpec {
                name: format!("round-{n}"),
                kind: ROUND_KIND.into(),
                params: self.round_params(n),
                inputs: round_inputs(n),
            })
            .collect();
        let stage_inputs = if self.rounds > 1 {
            vec![("previous".into(), format!("round-{}", self.rounds - 1))]
        } else {
            Vec::new()
        };
        Expansion {
            parts,
            stage_inputs,
        }
    }
    fn key_params(&self) -> serde_json::Value {
        self.round_params(self.rounds)
    }
    fn key_kind(&self) -> &'static str {
        ROUND_KIND
    }
    fn deps(&self) -> Vec<(ValuePath, String)> {
        super::generation::judge_deps(&self.judge)
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_tokens(&self.tokens);
        errors.extend(check_judge(&self.judge));
        errors.extend(check_losses(
            &self.loss_type,
            self.loss_weights.as_deref(),
            self.label_smoothing,
        ));
        for key in self.round.keys() {
            let valid = key
                .parse::<u32>()
                .is_ok_and(|n| (1..=self.rounds).contains(&n));
            if !valid {
                errors.push(FieldError::new(
                    ValuePath::root().key("round").key(key),
                    format!(
                        "round overrides are keyed by round number 1..={}",
                        self.rounds
                    ),
                ));
            }
        }
        errors
    }
}
