//! Kinds that train from data with a fixed objective: tokenizer, pretrain, sft, reward.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Expect, FieldError, InputField, Kind, Produces, StageSpec, TrainArgs, input, model_and_data,
    stage_common,
};
use crate::source::ValuePath;

/// Train a byte-level BPE tokenizer on text data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TokenizerParams {
    /// Text dataset to train on.
    pub data: String,
    /// Vocabulary size, special tokens included.
    #[schemars(range(min = 64, max = 1048576))]
    pub vocab_size: u32,
    /// Merges must occur at least this often.
    pub min_frequency: u32,
    /// Special tokens, given ids 0.. in this order.
    pub special_tokens: Vec<String>,
    /// Column with the text (`text` by default).
    pub text_field: String,
    /// Jinja chat template written to tokenizer_config.json.
    pub chat_template: Option<String>,
}

impl Default for TokenizerParams {
    fn default() -> Self {
        Self {
            data: String::new(),
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
                .map(String::from)
                .to_vec(),
            text_field: "text".into(),
            chat_template: None,
        }
    }
}

impl Kind for TokenizerParams {
    const REQUIRED: &'static [&'static str] = &["data"];
    const NAME: &'static str = "tokenizer";
    const SUMMARY: &'static str = "train a byte-level BPE tokenizer";
}

impl StageSpec for TokenizerParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        vec![input("data", &self.data, Expect::Dataset)]
    }
    fn produces(&self) -> Produces {
        Produces::Tokenizer
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.special_tokens.len() as u64 + 256 > u64::from(self.vocab_size) {
            errors.push(FieldError::new(
                ValuePath::root().key("vocab_size"),
                "vocab_size must leave room for the 256 byte tokens and the special tokens",
            ));
        }
        errors
    }
}

/// Train a fresh model (a `models.X` with `arch`) on text, next-token loss over packed sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PretrainParams {
    /// A model node with a fresh architecture (`arch = "llama"`).
    pub model: String,
    /// Text dataset.
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    /// Tokens per packed training sequence.
    #[schemars(range(min = 8))]
    pub max_length: u32,
    pub text_field: String,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for PretrainParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            learning_rate: 3e-4,
            max_length: 512,
            text_field: "text".into(),
            train: TrainArgs {
                lr_scheduler_type: super::LrSchedulerType::Cosine,
                warmup_ratio: 0.05,
                epochs: 1,
                ..TrainArgs::default()
            },
        }
    }
}

impl Kind for PretrainParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "pretrain";
    const SUMMARY: &'static str = "train a fresh model on text";
}

impl StageSpec for PretrainParams {
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
        // A fresh model has no pretrained base for adapters to adapt.
        match self.train.lora {
            Some(_) => vec![FieldError::new(
                ValuePath::root().key("lora"),
                "`pretrain` trains a fresh model in full; LoRA adapters need a pretrained base (use them in `sft` and later stages)",
            )],
            None => Vec::new(),
        }
    }
}

/// Supervised fine-tuning on text, prompt/completion, Alpaca or conversational data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct SftParams {
    pub model: String,
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    /// Sequences longer than this are truncated.
    #[schemars(range(min = 8))]
    pub max_length: u32,
    /// Train on completion tokens only (prompt/completion data); `false` trains on all tokens.
    pub completion_only_loss: bool,
    /// Train on assistant turns only (conversational data).
    pub assistant_only_loss: bool,
    /// Pack several examples into each sequence.
    pub packing: bool,
    /// Column with the text for plain-text data.
    pub dataset_text_field: String,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for SftParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            learning_rate: 2e-5,
            max_length: 1024,
            completion_only_loss: true,
            assistant_only_loss: true,
            packing: false,
            dataset_text_field: "text".into(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for SftParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "sft";
    const SUMMARY: &'static str = "supervised fine-tuning";
}

impl StageSpec for SftParams {
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
        self.train.check_lora(Produces::Model)
    }
}

/// Bradley-Terry reward model on preference data (`margin` column optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RewardParams {
    pub model: String,
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
    #[schemars(range(min = 8))]
    pub max_length: u32,
    /// Adds `coef * mean((r_c + r_r)^2)` to the loss, centring rewards on zero.
    #[schemars(range(min = 0.0))]
    pub center_rewards_coefficient: Option<f64>,
    /// Fraction of the pairs held out for evaluation metrics.
    #[schemars(range(min = 0.0, max = 0.5))]
    pub eval_ratio: f64,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for RewardParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            learning_rate: 1e-5,
            max_length: 1024,
            center_rewards_coefficient: None,
            eval_ratio: 0.0,
            train: TrainArgs {
                epochs: 1,
                ..TrainArgs::default()
            },
        }
    }
}

impl Kind for RewardParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "reward";
    const SUMMARY: &'static str = "train a reward model on preference pairs";
}

impl StageSpec for RewardParams {
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::RewardModel
    }
    fn check(&self) -> Vec<FieldError> {
        self.train.check_lora(Produces::RewardModel)
    }
}
