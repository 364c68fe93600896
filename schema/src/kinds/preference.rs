//! What the offline preference kinds share (`dpo`, `kto`, `orpo`, `simpo`, the rounds of
//! `iterative_dpo`): the tokenisation settings, the reference model's role, and the
//! `ref_logps` part that computes the frozen reference's log-probs once. Each kind's own
//! parameters are in its module; names and defaults are TRL 1.16's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Expansion, Expect, FieldError, InputField, PartInput, PartSpec, input, part_kind};
use super::{Kind, TruncationMode};
use crate::source::ValuePath;

/// The part that computes the frozen reference's per-token log-probs once (`STAGE/ref_logps`).
pub const REF_LOGPS_PART: &str = "ref_logps";

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

impl PreferenceTokens {
    /// `max_prompt_length` must leave room for a completion.
    pub fn check(&self) -> Vec<FieldError> {
        match self.max_prompt_length {
            Some(p) if p >= self.max_length => vec![FieldError::new(
                ValuePath::root().key("max_prompt_length"),
                "max_prompt_length must be smaller than max_length",
            )],
            _ => Vec::new(),
        }
    }
}

/// The references of a kind with a frozen reference: `model`, `reference` (the policy's starting
/// `model` unless given) and `data`.
pub(crate) fn inputs_with_reference(
    model: &str,
    reference: Option<&str>,
    data: &str,
) -> Vec<InputField> {
    let reference = match reference {
        Some(reference) => input("reference", reference, Expect::Model),
        None => InputField {
            role: "reference".into(),
            ..input("model", model, Expect::Model)
        },
    };
    vec![
        input("model", model, Expect::Model),
        reference,
        input("data", data, Expect::Dataset),
    ]
}

/// The `ref_logps` part of kind `K`, keyed only by what determines the values (the reference,
/// the data and the tokenisation settings), so that every stage and recipe with the same
/// reference and data shares them; the stage reads it as its `ref_logps` input.
pub(crate) fn ref_logps_expansion<K: Kind>(tokens: &PreferenceTokens) -> Expansion {
    Expansion {
        parts: vec![PartSpec {
            name: REF_LOGPS_PART.into(),
            kind: part_kind(K::NAME, REF_LOGPS_PART),
            params: serde_json::to_value(tokens).expect("serialisable"),
            inputs: vec![
                ("reference".into(), PartInput::Role("reference".into())),
                ("data".into(), PartInput::Role("data".into())),
            ],
        }],
        stage_inputs: vec![(REF_LOGPS_PART.into(), REF_LOGPS_PART.into())],
    }
}
