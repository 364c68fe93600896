//! The error type of the model layer: loading and saving Hugging Face directories, tokenizers,
//! chat templates, generation and backend selection. Each variant carries what a caller needs to
//! tell the user what to fix (the file, the tensor, the expected and found shapes).

use std::path::PathBuf;

/// Everything that can go wrong below a stage: bad model files, tokenizers, backends.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid model config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "unsupported architecture `{name}` in {path}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, LlamaForSequenceClassification"
    )]
    UnsupportedArchitecture { path: PathBuf, name: String },
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    MissingWeights { dir: PathBuf },
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {dir}")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("tensor `{name}` in {dir} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {dir} has dtype {dtype}; supported: F32, BF16, F16")]
    UnsupportedDtype {
        dir: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid generation options: {0}")]
    Generate(String),
    #[error(
        "backend `{backend}` is not compiled into this binary; rebuild with `--features {feature}`"
    )]
    BackendNotCompiled {
        backend: &'static str,
        feature: &'static str,
    },
    #[error("LoRA: {0}")]
    Lora(String),
    #[error("invalid PEFT adapter config {path}: {message}")]
    AdapterConfig { path: PathBuf, message: String },
    #[error(
        "precision `{precision}` needs {dtype} tensors, and backend `{backend}` has none on this device; use precision = \"fp32\""
    )]
    PrecisionUnsupported {
        precision: &'static str,
        backend: &'static str,
        dtype: String,
    },
    #[error("backend `{backend}` is unavailable: {message}")]
    BackendUnavailable {
        backend: &'static str,
        message: String,
    },
}

impl StageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.into(),
            source,
        }
    }
}
