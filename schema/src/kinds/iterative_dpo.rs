//! The `iterative_dpo` kind: rounds of sample, judge, pair and DPO update, each round its own
//! cached part (`STAGE/round-N`); the stage itself is the last round. The rounds take the
//! `dpo` kind's loss options ([`DpoLossArgs`]).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    DpoLossArgs, Expansion, Expect, FieldError, InputField, Judge, Kind, PartInput, PartSpec,
    PreferenceTokens, Produces, Sampling, StageSpec, TrainArgs, check_judge, input, judge_input,
    part_kind, stage_common,
};
use crate::source::ValuePath;

/// The part kind of one round: the parts and the stage itself (its last round) share it.
pub const ROUND_PART: &str = "round";

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
    #[serde(flatten)]
    pub loss: DpoLossArgs,
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
            loss: DpoLossArgs::default(),
            tokens: PreferenceTokens::default(),
            train: TrainArgs {
                epochs: 1,
                ..TrainArgs::default()
            },
        }
    }
}

impl Kind for IterativeDpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "data", "judge"];
    const NAME: &'static str = "iterative_dpo";
    const SUMMARY: &'static str = "rounds of sample, judge, pair and DPO";
    const PARTS: &'static [&'static str] = &[ROUND_PART];
}

/// One round's settings: the stage's, with that round's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    /// 1-based.
    pub round: u32,
    pub beta: f64,
    pub learning_rate: f64,
    pub num_samples: u32,
    pub sampling: Sampling,
    pub min_margin: f64,
    pub epochs: u32,
}

impl IterativeDpoParams {
    /// The name of round `n`'s part (rounds `1..rounds` are parts; the stage is the last).
    pub fn round_part_name(n: u32) -> String {
        format!("{ROUND_PART}-{n}")
    }

    /// The round a vertex runs: the part's number, or the last round for the stage itself.
    pub fn round_of(&self, part: Option<&PartSpec>) -> Option<u32> {
        match part {
            None => Some(self.rounds),
            Some(part) => part
                .name
                .strip_prefix(ROUND_PART)?
                .strip_prefix('-')?
                .parse()
                .ok(),
        }
    }

    /// Round `n`'s settings, its overrides applied.
    pub fn round_settings(&self, n: u32) -> RoundSettings {
        let o = self.round.get(&n.to_string()).cloned().unwrap_or_default();
        RoundSettings {
            round: n,
            beta: o.beta.unwrap_or(self.loss.beta),
            learning_rate: o.learning_rate.unwrap_or(self.learning_rate),
            num_samples: o.num_samples.unwrap_or(self.num_samples),
            sampling: Sampling {
                temperature: o.temperature.unwrap_or(self.sampling.temperature),
                ..self.sampling.clone()
            },
            min_margin: o.min_margin.unwrap_or(self.min_margin),
            epochs: o.epochs.unwrap_or(self.train.epochs),
        }
    }

    /// The parameters of round `n` (1-based) as they enter its key: shared ones with that
    /// round's overrides applied. `rounds` and the override table itself are left out, so that
    /// adding a round or overriding a later one leaves earlier rounds' keys unchanged.
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
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
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
                    super::PREVIOUS_ROUND_ROLE.into(),
                    PartInput::Part(Self::round_part_name(n - 1)),
                ));
            }
            if let Some(role) = &judge_role {
                inputs.push(("judge".into(), PartInput::Role(role.clone())));
            }
            inputs
        };
        let parts = (1..self.rounds)
            .map(|n| PartSpec {
                name: Self::round_part_name(n),
                kind: part_kind(Self::NAME, ROUND_PART),
                params: self.round_params(n),
                inputs: round_inputs(n),
            })
            .collect();
        let stage_inputs = if self.rounds > 1 {
            vec![(
                super::PREVIOUS_ROUND_ROLE.into(),
                Self::round_part_name(self.rounds - 1),
            )]
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
    fn key_kind(&self) -> String {
        part_kind(Self::NAME, ROUND_PART)
    }
    fn deps(&self) -> Vec<(ValuePath, String)> {
        super::generation::judge_deps(&self.judge)
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = self.tokens.check();
        errors.extend(check_judge(&self.judge));
        errors.extend(self.train.check_lora(Produces::Model));
        errors.extend(self.loss.check());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_settings_apply_that_rounds_overrides_only() {
        let mut params = IterativeDpoParams {
            loss: DpoLossArgs {
                beta: 0.1,
                ..DpoLossArgs::default()
            },
            num_samples: 4,
            ..IterativeDpoParams::default()
        };
        params.round.insert(
            "2".into(),
            RoundOverrides {
                beta: Some(0.3),
                temperature: Some(1.2),
                ..RoundOverrides::default()
            },
        );
        let one = params.round_settings(1);
        let two = params.round_settings(2);
        assert_eq!(one.beta, 0.1);
        assert_eq!(two.beta, 0.3);
        assert_eq!(two.sampling.temperature, 1.2);
        assert_eq!(one.sampling.temperature, params.sampling.temperature);
        assert_eq!(two.num_samples, 4);
        assert_eq!(two.round, 2);
        assert_eq!(params.round_params(2)["beta"], 0.3);
        assert_eq!(params.round_params(1)["beta"], 0.1);
    }

    #[test]
    fn parts_are_named_by_their_round() {
        let params = IterativeDpoParams {
            rounds: 3,
            ..IterativeDpoParams::default()
        };
        let parts = params.expand().parts;
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].name, "round-2");
        assert_eq!(parts[1].kind, "iterative_dpo/round");
        assert_eq!(params.round_of(Some(&parts[1])), Some(2));
        assert_eq!(params.round_of(None), Some(3));
    }
}
