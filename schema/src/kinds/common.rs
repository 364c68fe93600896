//! Parameter groups shared by several stage kinds: the training loop's arguments (named as the
//! Hugging Face Trainer names them), sampling settings, judges, and the small value types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Recompute activations in the backward pass instead of keeping them (Burn's balanced
    /// strategy: memory-bound operations are recomputed, compute-bound ones keep their output),
    /// trading compute for memory. The gradients are the same, so it is not part of the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Train low-rank adapters on a frozen base instead of every parameter (PEFT's
    /// `LoraConfig`). Absent: full fine-tuning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraArgs>,
    /// When the model is itself base + adapter (a LoRA stage's artifact or a model with
    /// `adapter`): `false` (the default) trains that adapter further on the same base (a stage
    /// without `lora` over a LoRA stage takes that stage's table); `true` merges it into the
    /// base first and trains a fresh adapter on the merged weights with the stage's `lora`, or,
    /// without `lora`, the merged model in full (TRL's and LLaMA-Factory's name). Over a model
    /// without an adapter it is a recipe error. Part of the key; left out of the parameters
    /// when `false`, so keys made before it existed stay the same.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub merge_adapter: bool,
    /// The dtype the trained weights are saved in: `auto` keeps the input model's (a bf16
    /// model stays bf16), or `fp32`, `bf16`, `f16`. config.json's `dtype`/`torch_dtype` follow.
    /// `auto` is left out of the parameters a key is made of, so keys made before it existed
    /// stay the same.
    #[serde(skip_serializing_if = "SaveDtype::is_auto")]
    pub save_dtype: SaveDtype,
    /// Pad every training batch's sequence length up to a multiple of this (the Hugging Face
    /// collator's name), with pad tokens that are neither attended to nor trained on: GPU
    /// backends then compile and tune kernels for a few lengths instead of every length.
    /// Unset: 1 on `cpu` (exact lengths) and 64 on `wgpu` and `cuda`. The backend is part of
    /// every key, so the effective value is fixed by keyed inputs; unset is left out of the
    /// parameters, so keys made before it existed stay the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pad_to_multiple_of: Option<u32>,
}

/// LoRA (Hu et al. 2021) as PEFT's `LoraConfig` defines it: each targeted linear layer computes
/// `W x + scale * B(A(dropout(x)))` with `W` frozen, `A` Kaiming-uniform and `B` zero at the
/// start, `scale = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraArgs {
    /// Rank of the update (PEFT's `r`).
    #[schemars(range(min = 1))]
    pub r: u32,
    /// Scaling numerator (PEFT's `lora_alpha`).
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub alpha: f64,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`).
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1.0))]
    pub dropout: f64,
    /// The linear layers that get adapters: a list of names, or `"all-linear"` (every linear
    /// layer of the decoder, the output head excepted). PEFT's default for Llama-family models
    /// is `["q_proj", "v_proj"]`.
    pub target_modules: TargetModules,
    /// Scale by `alpha / sqrt(r)` (rank-stabilised LoRA) instead of `alpha / r`.
    pub use_rslora: bool,
    /// Modules trained in full and saved beside the adapters (`score` for reward models).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<SavedModule>,
}

impl Default for LoraArgs {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::List(vec![LinearModule::QProj, LinearModule::VProj]),
            use_rslora: false,
            modules_to_save: Vec::new(),
        }
    }
}

impl LoraArgs {
    /// The settings of a PEFT `adapter_config.json`. Settings rudder does not implement (bias
    /// training, DoRA, other PEFT methods, other layers) are refused rather than ignored.
    pub fn from_peft_config(value: &Value) -> Result<LoraArgs, String> {
        let get = |k: &str| value.get(k).filter(|v| !v.is_null());
        if get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err("only LoRA adapters (`peft_type = \"LORA\"`) are supported".into());
        }
        for (key, ok) in [
            ("bias", serde_json::json!("none")),
            ("use_dora", serde_json::json!(false)),
            ("fan_in_fan_out", serde_json::json!(false)),
        ] {
            if let Some(v) = get(key)
                && *v != ok
            {
                return Err(format!("`{key}` = {v} is not supported (only {ok})"));
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r >= 1)
            .ok_or_else(|| "`r` must be a positive integer".to_owned())?;
        let alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| "`lora_alpha` must be a number".to_owned())?;
        let target_modules = match get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => {
                TargetModules::AllLinear(AllLinear::AllLinear)
            }
            // PEFT matches a name against a module's path suffix, and saves `all-linear` resolved
            // into full paths (`model.layers.0.self_attn.q_proj`): each entry's last segment is
            // the layer it adapts.
            Some(Value::Array(entries)) => {
                let mut list = Vec::new();
                for entry in entries {
                    let name = entry.as_str().unwrap_or_default();
                    let last = name.rsplit('.').next().unwrap_or(name);
                    let module = LinearModule::ALL
                    .into_iter()
                    .find(|m| m.name() == last)
                    .ok_or_else(|| {
                        format!(
                            "`target_modules` entry {entry} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                        )
                    })?;
                    if !list.contains(&module) {
                        list.push(module);
                    }
                }
                list.sort();
                TargetModules::List(list)
            }
            Some(other) => {
                return Err(format!(
                    "`target_modules` must be a list or \"all-linear\", not {other}"
                ));
            }
            None => LoraArgs::default().target_modules,
        };
        let modules_to_save = match get("modules_to_save") {
            // PEFT adds `classifier` for sequence classification; Llama-family models have none.
            Some(Value::Array(entries)) => serde_json::from_value(Value::Array(
                entries
                    .iter()
                    .filter(|e| e.as_str() != Some("classifier"))
                    .cloned()
                    .collect(),
            ))
            .map_err(|e| format!("`modules_to_save`: {e}"))?,
            Some(other) => {
                return Err(format!("`modules_to_save` must be a list, not {other}"));
            }
            None => Vec::new(),
        };
        Ok(LoraArgs {
            r: u32::try_from(r).map_err(|_| "`r` is too large".to_owned())?,
            alpha,
            dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules,
            use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            modules_to_save,
        })
    }

    /// The first setting that makes an adapter trained under `self` a different adapter from
    /// one trained under `other` (`dropout` acts only while training, so it may differ):
    /// `(name, self's value, other's value)`.
    pub fn differs_from(&self, other: &LoraArgs) -> Option<(&'static str, String, String)> {
        fn targets(l: &LoraArgs) -> Vec<LinearModule> {
            LinearModule::ALL
                .into_iter()
                .filter(|&m| l.targets(m))
                .collect()
        }
        fn saved(l: &LoraArgs) -> Vec<&'static str> {
            let mut v: Vec<_> = l.modules_to_save.iter().map(|m| m.name()).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        let names =
            |v: Vec<LinearModule>| format!("{:?}", v.iter().map(|m| m.name()).collect::<Vec<_>>());
        if self.r != other.r {
            return Some(("r", self.r.to_string(), other.r.to_string()));
        }
        if self.alpha != other.alpha {
            return Some(("alpha", self.alpha.to_string(), other.alpha.to_string()));
        }
        if self.use_rslora != other.use_rslora {
            return Some((
                "use_rslora",
                self.use_rslora.to_string(),
                other.use_rslora.to_string(),
            ));
        }
        if targets(self) != targets(other) {
            return Some((
                "target_modules",
                names(targets(self)),
                names(targets(other)),
            ));
        }
        if saved(self) != saved(other) {
            return Some((
                "modules_to_save",
                format!("{:?}", saved(self)),
                format!("{:?}", saved(other)),
            ));
        }
        None
    }

    /// These settings as a reward model trains them: `score` always among `modules_to_save`
    /// (PEFT's `SEQ_CLS` task adds it), after any module the recipe names.
    pub fn for_reward_model(&self) -> LoraArgs {
        let mut lora = self.clone();
        if !lora.modules_to_save.contains(&SavedModule::Score) {
            lora.modules_to_save.push(SavedModule::Score);
        }
        lora
    }

    /// The adapter's scale: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
    pub fn scale(&self) -> f64 {
        let r = f64::from(self.r);
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Whether the linear layer `module` gets an adapter.
    pub fn targets(&self, module: LinearModule) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear(_) => true,
            TargetModules::List(list) => list.contains(&module),
        }
    }
}

/// `target_modules`: `"all-linear"` or a list of layer names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TargetModules {
    AllLinear(AllLinear),
    List(Vec<LinearModule>),
}

/// PEFT's shorthand for every linear layer but the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AllLinear {
    #[serde(rename = "all-linear")]
    AllLinear,
}

/// The linear layers of a Llama-family decoder layer, by their transformers names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LinearModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LinearModule {
    pub const ALL: [LinearModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The transformers name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }
}

/// A module that `modules_to_save` trains in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SavedModule {
    /// The scalar head of a reward model.
    Score,
    /// The language-model head (untied models only).
    LmHead,
}

impl SavedModule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Score => "score",
            Self::LmHead => "lm_head",
        }
    }
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

impl TrainArgs {
    /// The multiple batch lengths are padded to on `backend`: `pad_to_multiple_of`, or 1 on
    /// `cpu` and 64 on the GPU backends when unset.
    pub fn pad_multiple(&self, backend: crate::nodes::Backend) -> usize {
        self.pad_to_multiple_of
            .map_or_else(|| backend.default_pad_multiple(), |m| m as usize)
    }

    /// Checks the `lora` table against what the stage trains: `score` exists only on reward
    /// models, `lm_head` only on language models.
    pub fn check_lora(&self, produces: super::Produces) -> Vec<super::FieldError> {
        let Some(lora) = &self.lora else {
            return Vec::new();
        };
        let reward = matches!(produces, super::Produces::RewardModel);
        lora.modules_to_save
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m, SavedModule::Score) != reward)
            .map(|(i, m)| {
                super::FieldError::new(
                    crate::source::ValuePath::root()
                        .key("lora")
                        .key("modules_to_save")
                        .index(i),
                    format!(
                        "this stage trains a {}, which has no `{}` module",
                        if reward {
                            "reward model"
                        } else {
                            "language model"
                        },
                        m.name()
                    ),
                )
            })
            .collect()
    }
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
            gradient_checkpointing: false,
            lora: None,
            merge_adapter: false,
            save_dtype: SaveDtype::Auto,
            pad_to_multiple_of: None,
        }
    }
}

/// Parameters that never change an artifact: they are removed before keys are computed.
pub const NOT_IN_KEY: &[&str] = &[
    "logging_steps",
    "checkpoint_every",
    "report_to",
    "gradient_checkpointing",
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

/// The input role through which a LoRA stage that continues an incoming adapter receives the
/// base that adapter was trained on (the engine adds it; recipes never name it).
pub const ADAPTER_BASE_ROLE: &str = "adapter_base";

/// The input through which a round of a multi-round kind (`iterative_dpo`) after the first
/// reads the previous round's artifact; with `lora`, such a round continues that round's
/// adapter.
pub const PREVIOUS_ROUND_ROLE: &str = "previous";

/// The kinds whose `lora` trains a language model's adapter (an `iterative_dpo` stage's in each
/// of its rounds).
pub const LANGUAGE_MODEL_ADAPTERS: &[&str] = &[
    "sft",
    "dpo",
    "kto",
    "orpo",
    "simpo",
    "ppo",
    "rloo",
    "grpo",
    "iterative_dpo",
];

/// Whether a stage of `kind` computes in a precision (runs a model): every kind but the
/// tokenizer, `export` (which merges in fp32) and shell commands.
pub fn computes_in_a_precision(kind: &str) -> bool {
    !matches!(kind, "tokenizer" | "export" | "command")
}

/// Whether a `lora` stage of `kind` continues an incoming adapter (see
/// [`continues_adapter_of`]): every kind that takes `lora`, the language-model kinds and
/// `reward`.
pub fn continues_adapters(kind: &str) -> bool {
    LANGUAGE_MODEL_ADAPTERS.contains(&kind) || kind == "reward"
}

/// Whether a `lora` stage of `kind` continues the adapter a `lora` stage of `upstream` trained,
/// when that stage's artifact is its `model`. A language model's adapter is continued by every
/// kind that [`continues_adapters`]: a `reward` stage trains it further on the language model's
/// backbone, under a fresh `score` head (PEFT's `SEQ_CLS` adapter over the same base). A reward
/// model's adapter is continued only by `reward` (on more data); a language-model kind reading
/// a reward model merges it first.
pub fn continues_adapter_of(kind: &str, upstream: &str) -> bool {
    continues_adapters(kind)
        && (LANGUAGE_MODEL_ADAPTERS.contains(&upstream)
            || (kind == "reward" && upstream == "reward"))
}
