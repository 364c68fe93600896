//! A stage's inputs as typed values: what each role the engine bound (`model`, `data`,
//! `reference`, `ref_logps`, ...) is, resolved once from the engine's [`StageInput`]s when a
//! stage starts, and read by the kind through one accessor per need: a model directory with its
//! configuration and checked tokenizer, a dataset's rows, a fresh architecture, an earlier
//! part's artifact, a judge.
//!
//! Owns the checks every kind needs of its inputs (a model has weights and a tokenizer that fits
//! its vocabulary, a dataset has rows); what a kind does with them is the kind's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use rudder_engine::Key;
use rudder_engine::runner::{InputKind, StageInput};
use rudder_schema::ModelSpec;
use rudder_schema::kinds::Judge;

use crate::data::{Format, Layout, Rows, read_rows};
use crate::judge::Scorer;
use crate::model::{ModelConfig, load_config};
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// What one input role is bound to.
#[derive(Debug, Clone)]
enum Binding {
    /// A model directory: `models.X.hf` or a model-producing stage's artifact.
    Model(PathBuf),
    /// `models.X.hf` with a PEFT adapter, not yet merged (see [`Inputs::merge_adapters`]).
    Adapted { base: PathBuf, adapter: PathBuf },
    /// A fresh architecture: no weights yet, its configuration and its tokenizer's location.
    Fresh {
        spec: Box<ModelSpec>,
        tokenizer: Option<PathBuf>,
    },
    /// A data file with the format and column renames to read it with.
    Data {
        path: PathBuf,
        format: Option<Format>,
        /// The row layout the dataset names, if any.
        layout: Option<Layout>,
        columns: BTreeMap<String, String>,
    },
    /// Another stage's (or part's) artifact directory, or a plain file.
    Path(PathBuf),
    /// An input without files (cannot be read).
    Missing,
}

/// One resolved input.
#[derive(Debug, Clone)]
struct Resolved {
    node: String,
    key: Key,
    binding: Binding,
}

/// A model directory ready to load: its configuration and the tokenizer stored beside it,
/// checked against the model's vocabulary.
#[derive(Clone)]
pub struct ModelInput {
    /// The node it comes from, for messages.
    pub node: String,
    pub key: Key,
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
}

/// A fresh architecture's configuration and its tokenizer.
#[derive(Clone)]
pub struct FreshModel {
    pub node: String,
    pub spec: ModelSpec,
    pub tokenizer: Tokenizer,
}

/// A stage's inputs by role.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    by_role: BTreeMap<String, Resolved>,
}

impl Inputs {
    /// Types every input the engine bound; reads no file.
    pub fn resolve(inputs: &[StageInput]) -> Self {
        let by_role = inputs
            .iter()
            .map(|input| {
                let binding = match (&input.kind, &input.path) {
                    (InputKind::FreshModel { spec, tokenizer }, _) => Binding::Fresh {
                        spec: Box::new(spec.clone()),
                        tokenizer: tokenizer.clone(),
                    },
                    (_, None) => Binding::Missing,
                    (InputKind::Model, Some(path)) => Binding::Model(path.clone()),
                    (InputKind::AdaptedModel { adapter }, Some(path)) => Binding::Adapted {
                        base: path.clone(),
                        adapter: adapter.clone(),
                    },
                    (InputKind::Dataset { format, columns }, Some(path)) => {
                        // A row layout is named in place of the file format, which then
                        // follows the extension.
                        let file_format = if format.is_layout() {
                            extension_format(path)
                        } else {
                            Format::from_name(format.as_str())
                        };
                        Binding::Data {
                            path: path.clone(),
                            format: file_format,
                            layout: Layout::from_name(format.as_str()),
                            columns: columns.clone(),
                        }
                    }
                    (InputKind::Artifact { .. } | InputKind::File, Some(path)) => {
                        Binding::Path(path.clone())
                    }
                };
                let resolved = Resolved {
                    node: input.node.clone(),
                    key: input.key,
                    binding,
                };
                (input.role.clone(), resolved)
            })
            .collect();
        Self { by_role }
    }

    /// The PEFT adapter directory of the model bound to `role`, when that model is base +
    /// adapter: a model with `adapter` (before [`Inputs::merge_adapters`]), or a LoRA stage's
    /// artifact (its `adapter/` folder).
    pub fn incoming_adapter(&self, role: &str) -> Result<PathBuf, TrainError> {
        let input = self.get(role)?;
        let adapter = match &input.binding {
            Binding::Adapted { adapter, .. } => adapter.clone(),
            Binding::Model(dir) | Binding::Path(dir) => dir.join(crate::artifacts::ADAPTER_DIR),
            _ => PathBuf::new(),
        };
        if !adapter
            .join(crate::model::lora::ADAPTER_CONFIG_FILE)
            .is_file()
        {
            return Err(TrainError::Input(format!(
                "model `{}` has no LoRA adapter to continue (no {})",
                input.node,
                adapter
                    .join(crate::model::lora::ADAPTER_CONFIG_FILE)
                    .display()
            )));
        }
        Ok(adapter)
    }

    /// Binds `role`, when it is a model with an unmerged PEFT adapter, to its base directory
    /// (whose configuration and tokenizer a merge would copy), for a stage that attaches the
    /// adapter to the base itself: no merged copy is written.
    pub fn unmerged_base(&mut self, role: &str) {
        if let Some(input) = self.by_role.get_mut(role)
            && let Binding::Adapted { base, .. } = &input.binding
        {
            input.binding = Binding::Model(base.clone());
        }
    }

    /// Merges every model bound with a PEFT adapter into a model directory under `scratch`
    /// (the stage's work directory, which is keyed, so a merge left by an earlier attempt is
    /// the same and is reused), so that kinds read it as any model.
    pub fn merge_adapters(
        &mut self,
        scratch: &Path,
        backend: rudder_schema::Backend,
    ) -> Result<(), TrainError> {
        for (role, input) in &mut self.by_role {
            let Binding::Adapted { base, adapter } = &input.binding else {
                continue;
            };
            let merged = scratch.join("adapted").join(role);
            if !merged.join(crate::model::hf::CONFIG_FILE).is_file() {
                let partial = scratch.join("adapted").join(format!("{role}.partial"));
                let _ = std::fs::remove_dir_all(&partial);
                let device = crate::backend::device(backend)?;
                merge_adapter(base, adapter, &partial, &device).map_err(|e| {
                    TrainError::Input(format!(
                        "model `{}`: adapter {}: {e}",
                        input.node,
                        adapter.display()
                    ))
                })?;
                std::fs::rename(&partial, &merged).map_err(|e| TrainError::io(&merged, e))?;
            }
            input.binding = Binding::Model(merged);
        }
        Ok(())
    }

    fn get(&self, role: &str) -> Result<&Resolved, TrainError> {
        self.by_role
            .get(role)
            .ok_or_else(|| TrainError::Input(format!("the stage has no `{role}` input")))
    }

    /// Whether `role` is bound.
    pub fn has(&self, role: &str) -> bool {
        self.by_role.contains_key(role)
    }

    /// The node (or part) bound to `role`.
    pub fn node(&self, role: &str) -> Result<&str, TrainError> {
        Ok(&self.get(role)?.node)
    }

    /// The key of the input bound to `role`.
    pub fn key(&self, role: &str) -> Result<Key, TrainError> {
        Ok(self.get(role)?.key)
    }

    /// The directory of the model bound to `role`: a Hugging Face directory or an earlier
    /// stage's model artifact.
    pub fn model_dir(&self, role: &str) -> Result<PathBuf, TrainError> {
        let input = self.get(role)?;
        match &input.binding {
            Binding::Fresh { .. } => Err(TrainError::Input(format!(
                "model `{}` is a fresh architecture with no weights; train it with a `pretrain` stage first",
                input.node
            ))),
            Binding::Model(path) | Binding::Path(path) | Binding::Data { path, .. }
                if path.is_dir() =>
            {
                Ok(path.clone())
            }
            Binding::Model(path) | Binding::Path(path) | Binding::Data { path, .. } => {
                Err(TrainError::Input(format!(
                    "model `{}`: {} is not a model directory",
                    input.node,
                    path.display()
                )))
            }
            Binding::Missing => Err(TrainError::Input(format!(
                "model `{}` has no directory",
                input.node
            ))),
            Binding::Adapted { .. } => Err(TrainError::Input(format!(
                "model `{}`: its adapter was not merged",
                input.node
            ))),
        }
    }

    /// The model bound to `role`, with its configuration and its checked tokenizer.
    pub fn model(&self, role: &str) -> Result<ModelInput, TrainError> {
        let dir = self.model_dir(role)?;
        let input = self.get(role)?;
        let (config, tokenizer) = checked_tokenizer(&dir)?;
        Ok(ModelInput {
            node: input.node.clone(),
            key: input.key,
            dir,
            config,
            tokenizer,
        })
    }

    /// The fresh architecture bound to `role`, with its tokenizer; `None` when the role is
    /// bound to a model with weights.
    pub fn fresh_model(&self, role: &str) -> Result<Option<FreshModel>, TrainError> {
        let input = self.get(role)?;
        let Binding::Fresh { spec, tokenizer } = &input.binding else {
            return Ok(None);
        };
        let path = tokenizer.as_ref().ok_or_else(|| {
            TrainError::Input(format!(
                "fresh model `{}` has no tokenizer; set `tokenizer` in its [models] table",
                input.node
            ))
        })?;
        Ok(Some(FreshModel {
            node: input.node.clone(),
            spec: (**spec).clone(),
            tokenizer: tokenizer_at(path)?,
        }))
    }

    /// The rows of the dataset bound to `role`, read with its declared format and column
    /// renames (a stage's data output is read by its extension).
    pub fn rows(&self, role: &str) -> Result<Rows, TrainError> {
        let input = self.get(role)?;
        let (path, format, layout, columns) = match &input.binding {
            Binding::Data {
                path,
                format,
                layout,
                columns,
            } => (path, *format, *layout, columns.clone()),
            Binding::Path(path) | Binding::Model(path) => {
                (path, extension_format(path), None, BTreeMap::new())
            }
            Binding::Fresh { .. } | Binding::Missing | Binding::Adapted { .. } => {
                return Err(TrainError::Input(format!(
                    "data `{}` has no file",
                    input.node
                )));
            }
        };
        let format = format.ok_or_else(|| {
            TrainError::Input(format!(
                "data `{}`: cannot tell the format of {} (expected jsonl, json, parquet or txt)",
                input.node,
                path.display()
            ))
        })?;
        let rows = read_rows(path, format, &columns)?.with_layout(layout);
        if rows.rows.is_empty() {
            return Err(TrainError::NoData(format!(" in {}", path.display())));
        }
        Ok(rows)
    }

    /// The artifact directory (or file) bound to `role`: an earlier part's output, such as a
    /// stage's `ref_logps` or the previous round.
    pub fn artifact(&self, role: &str) -> Result<PathBuf, TrainError> {
        let input = self.get(role)?;
        match &input.binding {
            Binding::Path(path) | Binding::Model(path) | Binding::Data { path, .. } => {
                Ok(path.clone())
            }
            Binding::Fresh { .. } | Binding::Missing | Binding::Adapted { .. } => Err(
                TrainError::Input(format!("`{}` has no artifact", input.node)),
            ),
        }
    }

    /// The plain file bound to `role` (a dataset's file, or a stage's output file) and its
    /// format when it has one.
    pub fn file(&self, role: &str) -> Result<(PathBuf, Option<Format>), TrainError> {
        let input = self.get(role)?;
        let (path, format) = match &input.binding {
            Binding::Data { path, format, .. } => (path, *format),
            Binding::Path(path) | Binding::Model(path) => {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                (path, Format::from_name(&ext.to_ascii_lowercase()))
            }
            Binding::Fresh { .. } | Binding::Missing | Binding::Adapted { .. } => {
                return Err(TrainError::Input(format!("`{}` is not a file", input.node)));
            }
        };
        if !path.is_file() {
            return Err(TrainError::Input(format!("`{}` is not a file", input.node)));
        }
        Ok((path.clone(), format))
    }

    /// The judge a stage names: a reward-model node (bound to `role`), a rule, or a command run
    /// in `recipe_dir`. `batch_size` is the reward model's sequences per forward pass.
    pub fn judge(
        &self,
        judge: &Judge,
        role: &str,
        recipe_dir: &Path,
        batch_size: usize,
        device: &Device,
    ) -> Result<Scorer, TrainError> {
        match judge {
            Judge::Node(_) => {
                let dir = self.model_dir(role)?;
                let (_, tokenizer) = checked_tokenizer(&dir)?;
                Scorer::reward_model(&dir, tokenizer, batch_size, device)
            }
            Judge::Rule(rule) => Scorer::rule(rule),
            Judge::Command(command) => Ok(Scorer::command(command, recipe_dir)),
        }
    }
}

/// The file format a path's extension names.
fn extension_format(path: &Path) -> Option<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    Format::from_name(&ext.to_ascii_lowercase())
}

/// The tokenizer stored beside a model's weights.
pub fn model_tokenizer(dir: &Path) -> Result<Tokenizer, TrainError> {
    if !dir.join("tokenizer.json").is_file() {
        return Err(TrainError::Input(format!(
            "no tokenizer.json in model directory {}; a model used for training needs its tokenizer",
            dir.display()
        )));
    }
    Ok(Tokenizer::from_dir(dir)?)
}

/// A model directory's configuration and its tokenizer, refused when the tokenizer's ids do not
/// fit the model's embedding table.
pub fn checked_tokenizer(dir: &Path) -> Result<(ModelConfig, Tokenizer), TrainError> {
    let tokenizer = model_tokenizer(dir)?;
    let config = check_vocab(dir, &tokenizer)?;
    Ok((config, tokenizer))
}

/// The configuration of the model in `dir`, refused when `tokenizer`'s ids do not fit its
/// embedding table.
pub fn check_vocab(dir: &Path, tokenizer: &Tokenizer) -> Result<ModelConfig, TrainError> {
    let config = load_config(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(TrainError::Input(format!(
            "the tokenizer in {} has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(config)
}

/// A tokenizer from a tokenizer stage's directory or a tokenizer.json file (with the
/// tokenizer_config.json beside it, when there is one).
fn tokenizer_at(path: &Path) -> Result<Tokenizer, TrainError> {
    if path.is_dir() {
        return model_tokenizer(path);
    }
    let config = path.with_file_name("tokenizer_config.json");
    Ok(Tokenizer::from_files(
        path,
        config.is_file().then_some(config.as_path()),
    )?)
}

/// Writes `base` with the PEFT adapter `adapter` merged into it as a model directory `out`,
/// with the base's tokenizer files. A `SEQ_CLS` adapter is applied to a reward model.
fn merge_adapter(
    base: &Path,
    adapter: &Path,
    out: &Path,
    device: &Device,
) -> Result<(), TrainError> {
    use crate::model::{hf, lora};
    let config_path = adapter.join(lora::ADAPTER_CONFIG_FILE);
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Input(format!("{}: {e}", config_path.display())))?;
    let reward = config.get("task_type").and_then(serde_json::Value::as_str) == Some("SEQ_CLS");
    if reward {
        let (cfg, model) = hf::load_reward_model(base, device)?;
        let (model, _) = lora::load_adapter(model, adapter)?;
        hf::save_reward_model(&lora::merge(&model), &cfg, out)?;
    } else {
        let (cfg, model) = hf::load_causal_lm(base, device)?;
        let (model, _) = lora::load_adapter(model, adapter)?;
        hf::save_causal_lm(&lora::merge(&model), &cfg, out)?;
    }
    model_tokenizer(base)?.save(out)?;
    Ok(())
}
