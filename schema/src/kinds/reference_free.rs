//! The reference-free preference kinds: `orpo` and `simpo` (SimPO, and CPO with its other
//! losses). Names and defaults are TRL 1.16's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    FieldError, InputField, Kind, PreferenceTokens, Produces, StageSpec, TrainArgs, model_and_data,
    stage_common,
};

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
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = self.tokens.check();
        errors.extend(self.train.check_lora(Produces::Model));
        errors
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
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = self.tokens.check();
        errors.extend(self.train.check_lora(Produces::Model));
        errors
    }
}
