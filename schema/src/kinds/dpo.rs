//! The `dpo` kind and the DPO family of losses, whose options `iterative_dpo`'s rounds take too
//! ([`DpoLossArgs`]). Names and defaults are TRL 1.16's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::preference::{REF_LOGPS_PART, inputs_with_reference, ref_logps_expansion};
use super::{
    Expansion, FieldError, InputField, Kind, OneOrMany, PreferenceTokens, Produces, StageSpec,
    TrainArgs, stage_common,
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

/// The DPO family's loss options: what `dpo` and every round of `iterative_dpo` take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct DpoLossArgs {
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
}

impl Default for DpoLossArgs {
    fn default() -> Self {
        Self {
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
        }
    }
}

impl DpoLossArgs {
    /// Every loss type with its weight (missing `loss_weights` weigh each 1, as TRL does), and
    /// RPO's `rpo_alpha` as the `sft` loss type with that weight, which is what TRL computes.
    pub fn weighted_losses(&self) -> Vec<(DpoLossType, f64)> {
        let types = self.loss_type.to_vec();
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; types.len()]);
        let mut losses: Vec<(DpoLossType, f64)> = types.into_iter().zip(weights).collect();
        if let Some(alpha) = self.rpo_alpha {
            losses.push((DpoLossType::Sft, alpha));
        }
        losses
    }

    /// One weight per loss type, and `exo_pair`'s required smoothing.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let losses = self.loss_type.to_vec();
        if let Some(weights) = &self.loss_weights
            && weights.len() != losses.len()
        {
            errors.push(FieldError::new(
                ValuePath::root().key("loss_weights"),
                format!(
                    "loss_weights has {} entries but loss_type has {}",
                    weights.len(),
                    losses.len()
                ),
            ));
        }
        if losses.contains(&DpoLossType::ExoPair) && self.label_smoothing <= 0.0 {
            errors.push(FieldError::new(
                ValuePath::root().key("label_smoothing"),
                "loss_type `exo_pair` needs label_smoothing > 0 (TRL uses 1e-3)",
            ));
        }
        errors
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
    #[serde(flatten)]
    pub loss: DpoLossArgs,
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
            loss: DpoLossArgs::default(),
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
    const PARTS: &'static [&'static str] = &[REF_LOGPS_PART];
}

impl StageSpec for DpoParams {
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        inputs_with_reference(&self.model, self.reference.as_deref(), &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn expand(&self) -> Expansion {
        // A reference that moves during training (TR-DPO) cannot be precomputed.
        if self.sync_ref_model {
            Expansion::default()
        } else {
            ref_logps_expansion::<Self>(&self.tokens)
        }
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = self.tokens.check();
        errors.extend(self.loss.check());
        errors.extend(self.train.check_lora(Produces::Model));
        if self.sync_ref_model && self.train.lora.is_some() {
            // As in TRL: a reference that mixes towards the policy needs a second full model.
            errors.push(FieldError::new(
                ValuePath::root().key("sync_ref_model"),
                "`sync_ref_model` (TR-DPO) cannot be combined with `lora`: the reference of a LoRA stage is its base with the adapters disabled",
            ));
        }
        errors
    }
}
