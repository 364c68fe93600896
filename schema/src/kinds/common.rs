//! Parameter groups shared by several stage kinds: the training loop's arguments (named as the
//! Hugging Face Trainer names them), sampling settings, judges, and the small value types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Learning-rate schedule, as the Hugging Face Trainer's `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

/// The training loop's arguments, shared by every training stage. Names and defaults follow the
/// Hugging Face `TrainingArguments` (without the `per_device_train_` prefixes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TrainArgs {
    /// Sequences per optimiser micro-batch.
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    /// Passes over the data; ignored when `max_steps` is set.
    #[schemars(range(min = 1))]
    pub epochs: u32,
    /// Stop after this many optimiser steps (overrides `epochs`).
    #[schemars(range(min = 1))]
    pub max_steps: Option<u64>,
    #[schemars(range(min = 1))]
    pub gradient_accumulation_steps: u32,
    /// Decoupled AdamW weight decay; never applied to biases and normalisation weights.
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adam_beta1: f64,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adam_beta2: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub adam_epsilon: f64,
    pub lr_scheduler_type: LrSchedulerType,
    pub warmup_steps: u64,
    /// Fraction of the total steps used for linear warm-up (when `warmup_steps` is 0).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: f64,
    /// Clip gradients to this global L2 norm; 0 turns clipping off.
    #[schemars(range(min = 0.0))]
    pub max_grad_norm: f64,
    /// `false` keeps the data order.
    pub shuffle: bool,
    /// When shuffling, batch examples of similar length together (within groups of 50 batches,
    /// as the Hugging Face Trainer's `group_by_length`), so little compute goes to padding.
    pub group_by_length: bool,
    /// Write `metrics.jsonl` every this many steps (not part of the artifact key).
    #[schemars(range(min = 1))]
    pub logging_steps: u64,
    /// Save a resumable checkpoint every this many steps; 0 turns periodic checkpoints off
    /// (not part of the artifact key: resuming gives the same result).
    pub checkpoint_every: u64,
    /// Where logged metrics also go, besides `metrics.jsonl`, as the Hugging Face Trainer's
    /// `report_to`: `["tensorboard"]` writes TensorBoard event files into the artifact (not part
    /// of the artifact key).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<ReportTo>,
    /// The dtype the trained weights are saved in: `auto` keeps the input model's (a bf16
    /// model stays bf16), or `fp32`, `bf16`, `f16`. config.json's `dtype`/`torch_dtype` follow.
    /// `auto` is left out of the parameters a key is made of, so keys made before it existed
    /// stay the same.
    #[serde(skip_serializing_if = "SaveDtype::is_auto")]
    pub save_dtype: SaveDtype,
}

/// The dtype of saved weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaveDtype {
    /// The input model's dtype (fp32 for a fresh model).
    #[default]
    Auto,
    Fp32,
    Bf16,
    F16,
}

impl SaveDtype {
    pub fn is_auto(&self) -> bool {
        *self == SaveDtype::Auto
    }
}

/// A logging integration of `report_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    /// TensorBoard event files (`events.out.tfevents.*`) beside `metrics.jsonl`.
    Tensorboard,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            batch_size: 8,
            epochs: 3,
            max_steps: None,
            gradient_accumulation_steps: 1,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            shuffle: true,
            group_by_length: true,
            logging_steps: 10,
            checkpoint_every: 100,
            report_to: Vec::new(),
            save_dtype: SaveDtype::Auto,
        }
    }
}

/// Parameters that never change an artifact: they are removed before keys are computed.
pub const NOT_IN_KEY: &[&str] = &[
    "logging_steps",
    "checkpoint_every",
    "report_to",
    "description",
];

/// Sampling settings for generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct Sampling {
    #[schemars(range(min = 1))]
    pub max_new_tokens: u32,
    /// 0 is greedy decoding.
    #[schemars(range(min = 0.0))]
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: u32,
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1.0))]
    pub top_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Where truncation keeps tokens when a sequence is longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    KeepStart,
    KeepEnd,
}

/// A judge scores completions: a reward-model node, a rule, or a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Judge {
    /// The name of a reward-model node.
    Node(String),
    Rule(RuleJudge),
    Command(CommandJudge),
}

/// A rule-based judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleJudge {
    pub rule: Rule,
    /// `exact_match`: the dataset column holding the expected answer.
    pub column: Option<String>,
    /// `exact_match`: regex whose first capture group is compared; `regex`: the pattern to find.
    pub pattern: Option<String>,
    /// `length`: the length (in characters) that scores highest.
    pub target: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    ExactMatch,
    Regex,
    Length,
}

/// A judge command: reads JSONL `{prompt, completion}` on stdin, writes one number per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandJudge {
    pub command: String,
    /// Files the command reads (hashed into the key).
    #[serde(default)]
    pub deps: Vec<String>,
}

/// One value or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(t) => vec![t.clone()],
            Self::Many(ts) => ts.clone(),
        }
    }
}
