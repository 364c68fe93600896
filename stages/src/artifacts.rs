//! What stages write into their artifact besides model weights: the JSONL files (metrics,
//! completions, samples, rollouts, rounds), and model directories saved with their tokenizer (and, for LoRA
//! stages, their PEFT adapter).
//! One writer per format, so every file of one kind is written the same way. The model files
//! themselves (config.json, safetensors) are `model::hf`'s.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use rudder_schema::kinds::LoraArgs;

use crate::model::lora::{merge, save_adapter};
use crate::model::{CausalLm, ModelConfig, RewardModel, save_causal_lm, save_reward_model};
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// The metrics file every training artifact holds.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Writes `lines` (each already one JSON document) as a JSONL file.
pub fn write_lines<S: AsRef<str>>(
    path: &Path,
    lines: impl IntoIterator<Item = S>,
) -> Result<(), TrainError> {
    let mut text = String::new();
    for line in lines {
        text.push_str(line.as_ref());
        text.push('\n');
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TrainError::io(path, e))
}

/// Writes one compact JSON object per line.
pub fn write_jsonl<'a>(
    path: &Path,
    values: impl IntoIterator<Item = &'a Value>,
) -> Result<(), TrainError> {
    write_lines(path, values.into_iter().map(Value::to_string))
}

/// Reads a JSONL file written by [`write_jsonl`] (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Input(format!("{}: not a JSON line: {e}", path.display())))
        })
        .collect()
}

/// Saves a causal LM as a Hugging Face directory with its tokenizer.
pub fn save_model(
    dir: &Path,
    model: &CausalLm,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<(), TrainError> {
    save_causal_lm(model, config, dir)?;
    tokenizer.save(dir)?;
    Ok(())
}

/// The folder of a LoRA stage's artifact that holds its PEFT adapter.
pub const ADAPTER_DIR: &str = "adapter";

/// Saves a trained causal LM. With LoRA settings the adapters go to `DIR/adapter/` as a PEFT
/// adapter directory (with the tokenizer), and `DIR` gets the merged model, which later stages
/// read as any model.
pub fn save_trained_model(
    dir: &Path,
    model: &CausalLm,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    lora: Option<&LoraArgs>,
) -> Result<(), TrainError> {
    match lora {
        None => save_model(dir, model, config, tokenizer),
        Some(args) => {
            let adapter_dir = dir.join(ADAPTER_DIR);
            save_adapter(model, args, &adapter_dir)?;
            tokenizer.save(&adapter_dir)?;
            save_model(dir, &merge(model), config, tokenizer)
        }
    }
}

/// [`save_trained_model`] for a reward (or value) model.
pub fn save_trained_scorer(
    dir: &Path,
    model: &RewardModel,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    lora: Option<&LoraArgs>,
) -> Result<(), TrainError> {
    match lora {
        None => save_scorer(dir, model, config, tokenizer),
        Some(args) => {
            let adapter_dir = dir.join(ADAPTER_DIR);
            save_adapter(model, args, &adapter_dir)?;
            tokenizer.save(&adapter_dir)?;
            save_scorer(dir, &merge(model), config, tokenizer)
        }
    }
}

/// Saves a reward (or value) model as a Hugging Face directory with its tokenizer.
pub fn save_scorer(
    dir: &Path,
    model: &RewardModel,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    save_reward_model(model, config, dir)?;
    tokenizer.save(dir)?;
    Ok(())
}
