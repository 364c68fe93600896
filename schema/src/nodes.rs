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

    /// The length multiple that training batches (`pad_to_multiple_of`) and generation's key/value
    /// cache are padded to when a recipe says nothing: 1 on `cpu`, where every length costs the
    /// same and results stay exactly as without padding, and 64 on the GPU backends, which
    /// compile and autotune kernels for every new tensor shape.
    pub fn default_pad_multiple(self) -> usize {
        match self {
            Backend::Cpu => 1,
            Backend::Wgpu | Backend::Cuda => 64,
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
    /// Everything in fp32.
    Fp32,
    /// Matmuls and activations in bf16, trained weights and optimizer state in fp32, the
    /// log-softmax and losses in fp32.
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}` (fp32 or bf16)")),
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
    /// How many stages run at once on this machine; the CLI's `-j` wins. Default: one per
    /// four cores (GPU stages one at a time).
    #[schemars(range(min = 1))]
    pub jobs: Option<u32>,
    /// How `rudder run` uses a remote store: `read` fetches an artifact the store lacks from
    /// the remote instead of building it, `read-write` also pushes what it builds. The CLI's
    /// `--remote-cache` wins; `--remote` alone means `read-write`.
    pub remote_cache: RemoteCache,
}

impl Default for RecipeMeta {
    fn default() -> Self {
        Self {
            name: None,
            description: None,
            seed: 0,
            backend: Backend::Cpu,
            precision: Precision::Fp32,
            jobs: None,
            remote_cache: RemoteCache::Off,
        }
    }
}

/// How `rudder run` uses a remote store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteCache {
    /// The remote is not used (unless `--remote` is given).
    #[default]
    Off,
    /// Fetch what the store lacks from the remote instead of building it.
    Read,
    /// Fetch, and push every artifact the run builds.
    ReadWrite,
}

impl RemoteCache {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteCache::Off => "off",
            RemoteCache::Read => "read",
            RemoteCache::ReadWrite => "read-write",
        }
    }

    pub fn reads(self) -> bool {
        self != RemoteCache::Off
    }

    pub fn writes(self) -> bool {
        self == RemoteCache::ReadWrite
    }
}

impl std::str::FromStr for RemoteCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(RemoteCache::Off),
            "read" => Ok(RemoteCache::Read),
            "read-write" => Ok(RemoteCache::ReadWrite),
            other => Err(format!(
                "unknown remote cache mode `{other}` (off, read or read-write)"
            )),
        }
    }
}

/// One `[remotes.NAME]` table: a remote store artifacts are pushed to and pulled from. Never
/// credentials: those come from the environment (`AWS_*`, `GOOGLE_APPLICATION_CREDENTIALS`,
/// `AZURE_*`). Not part of any key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`, `file:///path`,
    /// or a plain path (a shared filesystem; relative to the file that declares it).
    pub url: String,
    /// The remote that `push`, `pull` and `gc --remote` use when none is named.
    #[serde(default)]
    pub default: bool,
}

/// URL schemes a remote may have (besides a plain path).
pub const REMOTE_SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "file"];

/// Checks a remote's URL: a known scheme (or a plain path), and no credentials in it.
pub fn check_remote_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("the remote's `url` is empty".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        // A plain path to a shared directory.
        return Ok(());
    };
    if !REMOTE_SCHEMES.contains(&scheme) {
        return Err(format!(
            "unsupported remote scheme `{scheme}://` (s3://, gs://, az://, file://, or a plain path)"
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        return Err(
            "the remote's URL holds credentials: they belong in the environment, not in a file"
                .into(),
        );
    }
    if rest.contains('?') {
        return Err(
            "the remote's URL has a query string (a SAS token?): credentials and options come from the environment"
                .into(),
        );
    }
    if scheme == "file" {
        if !rest.starts_with('/') {
            return Err(
                "a file:// URL needs an absolute path (file:///path), or write a plain path".into(),
            );
        }
    } else if authority.is_empty() {
        return Err(format!(
            "`{scheme}://` needs a bucket or container: {scheme}://NAME/prefix"
        ));
    }
    Ok(())
}

/// Where stages run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// On threads of the `rudder` process.
    #[default]
    Local,
    /// One Slurm job (`sbatch`) per stage, over a store on a shared filesystem.
    Slurm,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            other => Err(format!("unknown executor `{other}` (local or slurm)")),
        }
    }
}

/// The `[executor]` table: where stages run; the CLI's `--executor` wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorSpec {
    pub kind: ExecutorKind,
    /// The `rudder` binary that Slurm jobs run, as the compute nodes see it. Default: the one
    /// that submits them.
    pub rudder: Option<String>,
    /// Seconds between two polls of `squeue`.
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub poll_seconds: f64,
    /// Resources of every stage's job; a stage's own `resources` win, field by field.
    pub resources: Resources,
}

impl Default for ExecutorSpec {
    fn default() -> Self {
        Self {
            kind: ExecutorKind::Local,
            rudder: None,
            poll_seconds: 2.0,
            resources: Resources::default(),
        }
    }
}

/// What a stage asks of a cluster scheduler. Never part of a key: where and with how much a
/// stage runs does not change what it produces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// GPUs on the stage's node (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// CPU cores (`--cpus-per-task`); also the stage's thread budget.
    #[schemars(range(min = 1))]
    pub cpus: Option<u32>,
    /// Memory of the node (`--mem`): a whole number with an optional K, M, G or T suffix.
    pub mem: Option<String>,
    /// Wall-clock limit (`--time`): `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` or `D-HH:MM:SS`.
    pub time: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Further `sbatch` options, passed as written: `["--qos=high", "--constraint=a100"]`.
    pub extra: Vec<String>,
}

impl Resources {
    /// These resources with `defaults` filling the fields left unset; `extra` options of both
    /// apply, the defaults' first (so that a stage's own option comes last and wins in sbatch).
    pub fn or(&self, defaults: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.or(defaults.gpus),
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self
                .partition
                .clone()
                .or_else(|| defaults.partition.clone()),
            account: self.account.clone().or_else(|| defaults.account.clone()),
            extra: defaults.extra.iter().chain(&self.extra).cloned().collect(),
        }
    }

    /// Values Slurm would refuse, as `(field, index in extra, message)`.
    pub fn check(&self) -> Vec<(&'static str, Option<usize>, String)> {
        let mut errors = Vec::new();
        if let Some(mem) = &self.mem
            && !is_slurm_memory(mem)
        {
            errors.push((
                "mem",
                None,
                format!("`mem = \"{mem}\"` is not a memory size (e.g. \"64G\", \"512M\")"),
            ));
        }
        if let Some(time) = &self.time
            && !is_slurm_time(time)
        {
            errors.push((
                "time",
                None,
                format!("`time = \"{time}\"` is not a Slurm time limit (e.g. \"4:00:00\", \"1-12:00\", \"30\")"),
            ));
        }
        for (field, value) in [("partition", &self.partition), ("account", &self.account)] {
            if let Some(value) = value
                && (value.is_empty() || value.chars().any(char::is_whitespace))
            {
                errors.push((
                    field,
                    None,
                    format!("`{field}` must be one word, not \"{value}\""),
                ));
            }
        }
        for (i, option) in self.extra.iter().enumerate() {
            if !option.starts_with('-') {
                errors.push((
                    "extra",
                    Some(i),
                    format!("`{option}` is not an sbatch option (they start with `-`, e.g. \"--qos=high\")"),
                ));
            }
        }
        errors
    }
}

/// `--mem`: digits with an optional unit suffix.
fn is_slurm_memory(text: &str) -> bool {
    let digits = text.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    text.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `--time`: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` (or `UNLIMITED`).
fn is_slurm_time(text: &str) -> bool {
    if matches!(text, "UNLIMITED" | "INFINITE" | "unlimited" | "infinite") {
        return true;
    }
    let number = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    let (days, clock) = match text.split_once('-') {
        Some((days, clock)) => (Some(days), clock),
        None => (None, text),
    };
    if days.is_some_and(|d| !number(d)) {
        return false;
    }
    let parts: Vec<&str> = clock.split(':').collect();
    parts.iter().all(|p| number(p)) && (1..=3).contains(&parts.len())
}

/// Data formats: a file format (`jsonl`, `json`, `parquet`, `txt`), or a row layout (`trl`,
/// `sharegpt`, `alpaca`) for rows that could be read two ways, the file format then following
/// the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Jsonl,
    Json,
    Parquet,
    Txt,
    /// TRL's field names (`text`, `messages`, `prompt`, `completion`, `chosen`, `rejected`, `label`).
    Trl,
    /// ShareGPT (`conversations`/`messages`, `from`/`value` or `role`/`content`, `system`).
    Sharegpt,
    /// Alpaca (`instruction`, `input`, `output`, `system`, `history`).
    Alpaca,
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
            Self::Trl => "trl",
            Self::Sharegpt => "sharegpt",
            Self::Alpaca => "alpaca",
        }
    }

    /// Whether this names a row layout rather than a file format.
    pub fn is_layout(self) -> bool {
        matches!(self, Self::Trl | Self::Sharegpt | Self::Alpaca)
    }
}

/// A `[datasets.NAME]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Data file, relative to the recipe: .jsonl .json .parquet .txt
    pub path: String,
    /// Defaults to the file extension's format; a row layout (`trl`, `sharegpt`, `alpaca`)
    /// names how rows are read, the file format following the extension.
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
    /// The file format: the declared one, else the extension's.
    pub fn resolved_format(&self) -> Option<DataFormat> {
        self.format
            .filter(|f| !f.is_layout())
            .or_else(|| DataFormat::from_path(&self.path))
    }

    /// The declared row layout, if any.
    pub fn layout(&self) -> Option<DataFormat> {
        self.format.filter(|f| f.is_layout())
    }

    /// What a stage is told: the row layout when one is declared (the file format then
    /// follows the extension), else the file format.
    pub fn input_format(&self) -> Option<DataFormat> {
        self.layout().or_else(|| self.resolved_format())
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
    /// A PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) to
    /// apply to the `hf` model, relative to the recipe: stages read the merged model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
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
    /// What the stage's Slurm job asks for (not in its key).
    pub resources: Option<Resources>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_sizes_and_times() {
        for good in ["64G", "512M", "1000", "2t"] {
            assert!(is_slurm_memory(good), "{good}");
        }
        for bad in ["", "G", "64GB", "1.5G", "-1", "sixty"] {
            assert!(!is_slurm_memory(bad), "{bad}");
        }
        for good in [
            "30",
            "30:00",
            "4:00:00",
            "1-12",
            "1-12:30",
            "2-00:00:00",
            "UNLIMITED",
        ] {
            assert!(is_slurm_time(good), "{good}");
        }
        for bad in ["", "4h", "1:2:3:4", "-5", "1-", "a-1", "4::00"] {
            assert!(!is_slurm_time(bad), "{bad}");
        }
    }

    #[test]
    fn a_stage_s_resources_win_field_by_field() {
        let defaults = Resources {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            extra: vec!["--qos=normal".into()],
            ..Resources::default()
        };
        let own = Resources {
            gpus: Some(1),
            partition: Some("big".into()),
            extra: vec!["--qos=high".into()],
            ..Resources::default()
        };
        let merged = own.or(&defaults);
        assert_eq!(merged.gpus, Some(1));
        assert_eq!(merged.partition.as_deref(), Some("big"));
        assert_eq!(merged.account.as_deref(), Some("lab"));
        assert_eq!(merged.extra, ["--qos=normal", "--qos=high"]);
    }
}
