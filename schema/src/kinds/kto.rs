//! The `kto` kind: Kahneman-Tversky optimisation on paired or unpaired data. Names and defaults
//! are TRL 1.16's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::preference::{REF_LOGPS_PART, inputs_with_reference, ref_logps_expansion};
use super::{
    Expansion, FieldError, InputField, Kind, PreferenceTokens, Produces, StageSpec, TrainArgs,
    stage_common,
};

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
    const PARTS: &'static [&'static str] = &[REF_LOGPS_PART];
}

impl StageSpec for KtoParams {
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
        ref_logps_expansion::<Self>(&self.tokens)
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = self.tokens.check();
        errors.extend(self.train.check_lora(Produces::Model));
        errors
    }
}
