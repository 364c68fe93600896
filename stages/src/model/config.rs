//! `ModelConfig`: the architecture hyper-parameters read from (and written back to) a Hugging Face
//! `config.json`. It owns the parsing rules (transformers 4 and 5 layouts, defaults, the list of
//! supported architectures) and nothing about tensors.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::StageError;

/// The Hugging Face model classes this crate can load and save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    /// A Llama backbone with a scalar `score` head (reward and value models).
    LlamaForSequenceClassification,
}

impl Architecture {
    /// Parses a name from config.json's `architectures` list.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::LlamaForCausalLM,
            "MistralForCausalLM" => Self::MistralForCausalLM,
            "Qwen2ForCausalLM" => Self::Qwen2ForCausalLM,
            "LlamaForSequenceClassification" => Self::LlamaForSequenceClassification,
            _ => return None,
        })
    }

    /// The class name written to config.json.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlamaForCausalLM => "LlamaForCausalLM",
            Self::MistralForCausalLM => "MistralForCausalLM",
            Self::Qwen2ForCausalLM => "Qwen2ForCausalLM",
            Self::LlamaForSequenceClassification => "LlamaForSequenceClassification",
        }
    }

    /// The `model_type` transformers uses to pick the config class.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::LlamaForCausalLM | Self::LlamaForSequenceClassification => "llama",
            Self::MistralForCausalLM => "mistral",
            Self::Qwen2ForCausalLM => "qwen2",
        }
    }

    /// Whether the model ends in a scalar head instead of a language-model head.
    pub fn is_sequence_classifier(self) -> bool {
        self == Self::LlamaForSequenceClassification
    }
}

/// Hyper-parameters of a Llama-family decoder, named as in config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (plain multi-head attention).
    pub num_key_value_heads: usize,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Default 2048 (informative: positions are not limited by it).
    pub max_position_embeddings: usize,
    /// Default 1e-6.
    pub rms_norm_eps: f64,
    /// Default 10000.
    pub rope_theta: f64,
    /// Default false for Llama and Mistral.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (true for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral/Qwen2 sliding-window attention span, when enabled.
    pub sliding_window: Option<usize>,
    /// Std of fresh weights. Default 0.02.
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The original config.json object, so that keys this crate does not interpret survive a
    /// load/save round trip.
    pub raw: Map<String, Value>,
    /// The dtype the weights are saved in: the loaded weights' dtype (set when they are read),
    /// fp32 for a fresh model; config.json's `dtype`/`torch_dtype` name it.
    pub dtype: WeightDtype,
}

/// A floating-point dtype of stored weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// The name transformers writes in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }

    /// The dtype a stage's `save_dtype` asks for, given the input's.
    pub fn resolve(self, save: rudder_schema::kinds::SaveDtype) -> WeightDtype {
        use rudder_schema::kinds::SaveDtype;
        match save {
            SaveDtype::Auto => self,
            SaveDtype::Fp32 => WeightDtype::F32,
            SaveDtype::Bf16 => WeightDtype::Bf16,
            SaveDtype::F16 => WeightDtype::F16,
        }
    }
}

impl ModelConfig {
    /// This configuration with the weights to be saved in the dtype `save` asks for.
    pub fn saved_as(&self, save: rudder_schema::kinds::SaveDtype) -> ModelConfig {
        ModelConfig {
            dtype: self.dtype.resolve(save),
            ..self.clone()
        }
    }

    /// A fresh Llama architecture with transformers' defaults for everything not given.
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        Self {
            architecture: Architecture::LlamaForCausalLM,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            raw: Map::new(),
            dtype: WeightDtype::F32,
        }
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self, StageError> {
        let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| StageError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&value, path)
    }

    /// Parses a config.json value; `path` only labels errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self, StageError> {
        let bad = |message: String| StageError::Config {
            path: path.to_path_buf(),
            message,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;

        let architecture = match obj.get("architectures") {
            Some(Value::Array(list)) => {
                let name = list
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("`architectures` is empty".into()))?;
                Architecture::from_name(name).ok_or_else(|| {
                    StageError::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        name: name.to_string(),
                    }
                })?
            }
            Some(_) => return Err(bad("`architectures` must be a list of strings".into())),
            // Configs without `architectures` still name their family in `model_type`.
            None => match obj.get("model_type").and_then(Value::as_str) {
                Some("llama") | None => Architecture::LlamaForCausalLM,
                Some("mistral") => Architecture::MistralForCausalLM,
                Some("qwen2") => Architecture::Qwen2ForCausalLM,
                Some(other) => {
                    return Err(StageError::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        name: format!("model_type {other}"),
                    });
                }
            },
        };

        let usize_key = |key: &str| -> Result<Option<usize>, StageError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, got {v}"))),
            }
        };
        let required = |key: &str| -> Result<usize, StageError> {
            match usize_key(key)? {
                Some(0) => Err(bad(format!("`{key}` must be positive"))),
                Some(n) => Ok(n),
                None => Err(bad(format!("missing `{key}`"))),
            }
        };
        let f64_key = |key: &str| -> Result<Option<f64>, StageError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{key}` must be a number, got {v}"))),
            }
        };
        let bool_key = |key: &str| -> Result<Option<bool>, StageError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{key}` must be true or false, got {v}"))),
            }
        };
        let token_id = |key: &str| -> Result<Vec<u32>, StageError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as u32)
                            .ok_or_else(|| bad(format!("`{key}` must hold token ids, got {v}")))
                    })
                    .collect(),
                Some(v) => v
                    .as_u64()
                    .map(|n| vec![n as u32])
                    .ok_or_else(|| bad(format!("`{key}` must be a token id, got {v}"))),
            }
        };

        let vocab_size = required("vocab_size")?;
        let hidden_size = required("hidden_size")?;
        let intermediate_size = required("intermediate_size")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = usize_key("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match usize_key("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(bad(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no `head_dim` is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim must be even and positive, got {head_dim}"
            )));
        }

        // Shapes are products of these sizes; one that overflows describes no model (and would
        // wrap or panic where the shapes are computed).
        for (what, a, b) in [
            (
                "num_attention_heads x head_dim",
                num_attention_heads,
                head_dim,
            ),
            (
                "num_key_value_heads x head_dim",
                num_key_value_heads,
                head_dim,
            ),
            ("vocab_size x hidden_size", vocab_size, hidden_size),
            (
                "hidden_size x intermediate_size",
                hidden_size,
                intermediate_size,
            ),
            (
                "hidden_size x num_attention_heads x head_dim",
                hidden_size,
                num_attention_heads.saturating_mul(head_dim),
            ),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > isize::MAX as usize) {
                return Err(bad(format!("{what} ({a} x {b}) is too large")));
            }
        }

        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(bad(format!(
                "hidden_act `{act}` is not supported (only silu)"
            )));
        }

        // transformers 5 moved `rope_theta` (and `rope_scaling`) into `rope_parameters`.
        let rope_params = obj.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                bad(format!(
                    "`rope_parameters.rope_theta` must be a number, got {v}"
                ))
            })?,
            None => f64_key("rope_theta")?.unwrap_or(10000.0),
        };
        let rope_type = rope_params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .or_else(|| {
                obj.get("rope_scaling")
                    .and_then(Value::as_object)
                    .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            })
            .and_then(Value::as_str);
        if let Some(kind) = rope_type
            && kind != "default"
        {
            return Err(bad(format!(
                "rope type `{kind}` is not supported (only the default rotary embedding)"
            )));
        }

        let attention_bias = bool_key("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 always has q/k/v biases and never an o_proj bias.
            Architecture::Qwen2ForCausalLM => (true, false),
            _ => (attention_bias, attention_bias),
        };

        let sliding_window = match architecture {
            Architecture::Qwen2ForCausalLM => {
                if bool_key("use_sliding_window")?.unwrap_or(false) {
                    usize_key("sliding_window")?
                } else {
                    None
                }
            }
            Architecture::MistralForCausalLM => usize_key("sliding_window")?,
            _ => None,
        };

        if architecture.is_sequence_classifier() {
            let labels = usize_key("num_labels")?.or_else(|| {
                obj.get("id2label")
                    .and_then(Value::as_object)
                    .map(|m| m.len())
            });
            if let Some(n) = labels
                && n != 1
            {
                return Err(bad(format!(
                    "a sequence classifier must have exactly one label (a scalar reward), found {n}"
                )));
            }
        }

        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: usize_key("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f64_key("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: bool_key("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: bool_key("mlp_bias")?.unwrap_or(false),
            sliding_window,
            initializer_range: f64_key("initializer_range")?.unwrap_or(0.02),
            bos_token_id: token_id("bos_token_id")?.first().copied(),
            eos_token_ids: token_id("eos_token_id")?,
            pad_token_id: token_id("pad_token_id")?.first().copied(),
            raw: obj.clone(),
            dtype: WeightDtype::F32,
        })
    }

    /// The config.json object transformers needs to load the saved weights: the original keys,
    /// with every key this crate interprets overwritten by its current value.
    pub fn to_json(&self) -> Value {
        let mut obj = self.raw.clone();
        // Written in the transformers-5 layout; drop the older top-level copy so the two never
        // disagree.
        obj.remove("rope_theta");
        obj.remove("rope_scaling");
        let updates = json!({
            "architectures": [self.architecture.name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "dtype": self.dtype.torch_name(),
        });
        // transformers 4 reads `torch_dtype`: kept, and made to agree, where the file had it.
        if obj.contains_key("torch_dtype") {
            obj.insert(
                "torch_dtype".into(),
                Value::String(self.dtype.torch_name().into()),
            );
        }
        for (k, v) in updates.as_object().expect("literal object") {
            obj.insert(k.clone(), v.clone());
        }
        match self.architecture {
            Architecture::Qwen2ForCausalLM => {}
            _ => {
                obj.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
                obj.insert("mlp_bias".into(), Value::Bool(self.mlp_bias));
            }
        }
        if self.architecture.is_sequence_classifier() {
            obj.insert("num_labels".into(), json!(1));
            obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
            obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        }
        let ids = |v: Option<u32>| v.map_or(Value::Null, |id| json!(id));
        obj.insert("bos_token_id".into(), ids(self.bos_token_id));
        obj.insert("pad_token_id".into(), ids(self.pad_token_id));
        obj.insert(
            "eos_token_id".into(),
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        Value::Object(obj)
    }

    /// Number of query heads sharing one key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig, StageError> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    #[test]
    fn defaults_and_head_dim() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.initializer_range, 0.02);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.n_rep(), 2);
    }

    #[test]
    fn rope_theta_both_layouts() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        assert_eq!(parse(v).unwrap().rope_theta, 500000.0);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
        assert_eq!(parse(v).unwrap().rope_theta, 1e6);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        let c = parse(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn missing_key_is_an_error() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size"));
    }

    #[test]
    fn round_trip() {
        let c = parse(base()).unwrap();
        let again = parse(c.to_json()).unwrap();
        assert_eq!(again.head_dim, c.head_dim);
        assert_eq!(again.num_key_value_heads, 2);
    }
}
