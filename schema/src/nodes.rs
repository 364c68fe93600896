//! The tables a recipe is made of, as typed values: `[recipe]`, `[datasets.*]`, `[models.*]`,
//! and the fields every `[stages.*]` has besides its kind's parameters. Their JSON Schemas
//! (derived) are what recipes are validated against.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The compute backend a stage runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Cpu,
    Wgpu,
    Cuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "wgpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            other => Err(format!("unknown backend `{other}` (cpu, wgpu or cuda)")),
        }
    }
}

/// Numeric precision of training and inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
        }
    }
}

/// The `[recipe]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RecipeMeta {
    /// Defaults to the file name without `.toml`.
    pub name: Option<String>,
    pub description: Option<String>,
    /// Default seed of every stage.
    pub seed: u64,
    /// Default backend of every stage; the CLI's `--backend` wins.
    pub backend: Backend,
    pub precision: Precision,
}

impl Default for RecipeMeta {
    fn default() -> Self {
        Self {
            name: None,
            description: None,
            seed: 0,
            backend: Backend::Cpu,
            precision: Precision::Fp32,
        }
    }
}

/// Data file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Jsonl,
    Json,
    Parquet,
    Txt,
}

impl DataFormat {
    pub fn from_path(path: &str) -> Option<Self> {
        let ext = Path::new(path).extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" => Some(Self::Jsonl),
            "json" => Some(Self::Json),
            "parquet" => Some(Self::Parquet),
            "txt" => Some(Self::Txt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Json => "json",
            Self::Parquet => "parquet",
            Self::Txt => "txt",
        }
    }
}

/// A `[datasets.NAME]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Data file, relative to the recipe: .jsonl .json .parquet .txt
    pub path: String,
    /// Defaults to the file extension's format.
    pub format: Option<DataFormat>,
    /// Renames to the standard field names: `{ prompt = "question" }`.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Pin: the run fails if the file's BLAKE3 differs.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub blake3: Option<String>,
    pub description: Option<String>,
}

impl DatasetSpec {
    pub fn resolved_format(&self) -> Option<DataFormat> {
        self.format.or_else(|| DataFormat::from_path(&self.path))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// A `[models.NAME]` table: a local Hugging Face directory, or a fresh architecture with
/// config.json's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Local Hugging Face model directory, relative to the recipe.
    pub hf: Option<String>,
    /// A fresh architecture (trained from scratch by `pretrain`).
    pub arch: Option<Arch>,
    /// A tokenizer stage or a tokenizer.json path; a fresh model's vocab_size follows it.
    pub tokenizer: Option<String>,
    #[schemars(range(min = 1))]
    pub vocab_size: Option<u32>,
    #[schemars(range(min = 1))]
    pub hidden_size: Option<u32>,
    #[schemars(range(min = 1))]
    pub intermediate_size: Option<u32>,
    #[schemars(range(min = 1))]
    pub num_hidden_layers: Option<u32>,
    #[schemars(range(min = 1))]
    pub num_attention_heads: Option<u32>,
    #[schemars(range(min = 1))]
    pub num_key_value_heads: Option<u32>,
    #[schemars(range(min = 1))]
    pub head_dim: Option<u32>,
    #[schemars(range(min = 1))]
    pub max_position_embeddings: Option<u32>,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub rope_theta: Option<f64>,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub rms_norm_eps: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub initializer_range: Option<f64>,
    pub description: Option<String>,
}

/// Fields every stage has besides its kind's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageCommon {
    /// The stage kind.
    pub kind: String,
    /// Ordering-only dependencies.
    #[serde(default)]
    pub after: Vec<String>,
    pub description: Option<String>,
    /// Overrides the recipe's seed.
    pub seed: Option<u64>,
    /// Overrides the recipe's backend.
    pub backend: Option<Backend>,
    pub precision: Option<Precision>,
}
