//! Pre-training (`pretrain`): a fresh Llama-family model (`models.X` with `arch`) or an
//! existing one, trained with the next-token loss on plain text. Every row becomes
//! `[BOS] text [EOS]` (BOS when the tokenizer adds one); the rows are concatenated in order and
//! cut into sequences of `max_length` tokens (the last, shorter one is kept), so no compute goes
//! to padding. Every token but a sequence's first is a target; the objective, metrics and loop
//! are the causal LM's, as in `sft`.
//!
//! A fresh model's `vocab_size` follows its tokenizer unless the recipe sets a larger one; its
//! weights are drawn from the stage's seed (see `model::random_causal_lm`), so the same recipe
//! gives the same model on every backend.

use std::path::Path;

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::ModelSpec;
use rudder_schema::kinds::PretrainParams;
use rudder_schema::recipe::Arch;

use crate::artifacts::save_model;
use crate::inputs::{FreshModel, ModelInput};
use crate::kind::{Stage, StageKind};
use crate::model::{Architecture, ModelConfig, load_causal_lm, random_causal_lm};
use crate::tokenizer::Tokenizer;
use crate::train::{SftObjective, SftSequence, TrainError};

pub struct Pretrain;

/// Where training starts.
enum Start {
    /// A fresh architecture: weights drawn from the stage's seed.
    Fresh(FreshModel),
    /// An existing model's weights.
    Weights(ModelInput),
}

impl StageKind for Pretrain {
    type Params = PretrainParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, PretrainParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let start = match stage.inputs.fresh_model("model")? {
            Some(fresh) => Start::Fresh(fresh),
            None => Start::Weights(stage.inputs.model("model")?),
        };
        let tokenizer = match &start {
            Start::Fresh(fresh) => &fresh.tokenizer,
            Start::Weights(model) => &model.tokenizer,
        };
        let rows = stage.inputs.rows("data")?;
        let texts = rows
            .rows
            .iter()
            .map(|row| rows.string(row, &p.text_field))
            .collect::<Result<Vec<_>, _>>()?;
        let sequences = pack(tokenizer, &texts, p.max_length as usize)?;
        if sequences.is_empty() {
            return Err(TrainError::NoData(
                " (the text is shorter than two tokens)".into(),
            ));
        }
        // A fresh architecture starts from weights drawn from the seed.
        let (config, model) = match &start {
            Start::Fresh(fresh) => {
                let config = fresh_config(&fresh.spec, tokenizer)?;
                let model = random_causal_lm(&config, stage.seed(), device);
                (config, model)
            }
            Start::Weights(input) => load_causal_lm(&input.dir, device)?,
        };
        let objective = SftObjective {
            pad: stage.pad(tokenizer.pad_id().unwrap_or(0)),
        };
        let cfg = stage.train_config(p.learning_rate, &p.train);
        let (trained, report) = stage.fit(&objective, model, &sequences, &cfg, device)?;
        save_model(
            stage.out_dir(),
            &trained,
            &config.saved_as(p.train.save_dtype),
            tokenizer,
        )?;
        let mut summary = report.summary();
        summary.insert("sequences".into(), sequences.len() as f64);
        Ok(StageOutcome { summary })
    }
}

/// Packs token streams into training sequences of at most `max_length` tokens.
pub fn pack(
    tokenizer: &Tokenizer,
    texts: &[String],
    max_length: usize,
) -> Result<Vec<SftSequence>, TrainError> {
    if max_length < 2 {
        return Err(TrainError::Config("max_length must be at least 2".into()));
    }
    let eos = tokenizer.eos_id();
    let mut stream = Vec::new();
    for text in texts {
        stream.extend(tokenizer.encode(text, true)?);
        if let Some(eos) = eos {
            stream.push(eos);
        }
    }
    Ok(stream
        .chunks(max_length)
        .filter(|chunk| chunk.len() >= 2)
        .map(|chunk| SftSequence {
            input_ids: chunk.to_vec(),
            target: (0..chunk.len()).map(|i| i > 0).collect(),
            segments: None,
        })
        .collect())
}

/// The configuration of a fresh model from its recipe table and tokenizer.
pub fn fresh_config(spec: &ModelSpec, tokenizer: &Tokenizer) -> Result<ModelConfig, TrainError> {
    let need = |value: Option<u32>, field: &str| {
        value.map(|v| v as usize).ok_or_else(|| {
            TrainError::Input(format!(
                "a fresh model needs `{field}` in its [models] table"
            ))
        })
    };
    let arch = spec.arch.ok_or_else(|| {
        TrainError::Input("the model has neither `hf` nor `arch`; nothing to train".into())
    })?;
    let vocab = match spec.vocab_size {
        Some(v) if (v as usize) < tokenizer.vocab_size() => {
            return Err(TrainError::Input(format!(
                "vocab_size {v} is smaller than the tokenizer's {} tokens",
                tokenizer.vocab_size()
            )));
        }
        Some(v) => v as usize,
        None => tokenizer.vocab_size(),
    };
    let heads = need(spec.num_attention_heads, "num_attention_heads")?;
    let mut cfg = ModelConfig::llama(
        vocab,
        need(spec.hidden_size, "hidden_size")?,
        need(spec.intermediate_size, "intermediate_size")?,
        need(spec.num_hidden_layers, "num_hidden_layers")?,
        heads,
        spec.num_key_value_heads.map_or(heads, |v| v as usize),
    );
    if !cfg.hidden_size.is_multiple_of(heads) && spec.head_dim.is_none() {
        return Err(TrainError::Input(format!(
            "hidden_size {} is not a multiple of num_attention_heads {heads}; set head_dim",
            cfg.hidden_size
        )));
    }
    if !heads.is_multiple_of(cfg.num_key_value_heads) {
        return Err(TrainError::Input(format!(
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {}",
            cfg.num_key_value_heads
        )));
    }
    if let Some(d) = spec.head_dim {
        cfg.head_dim = d as usize;
    }
    if let Some(n) = spec.max_position_embeddings {
        cfg.max_position_embeddings = n as usize;
    }
    if let Some(x) = spec.rope_theta {
        cfg.rope_theta = x;
    }
    if let Some(x) = spec.rms_norm_eps {
        cfg.rms_norm_eps = x;
    }
    if let Some(x) = spec.initializer_range {
        cfg.initializer_range = x;
    }
    cfg.tie_word_embeddings = spec.tie_word_embeddings.unwrap_or(false);
    let bias = spec.attention_bias.unwrap_or(false);
    match arch {
        Arch::Llama => {
            cfg.qkv_bias = bias;
            cfg.o_bias = bias;
        }
        Arch::Mistral => cfg.architecture = Architecture::MistralForCausalLM,
        Arch::Qwen2 => {
            cfg.architecture = Architecture::Qwen2ForCausalLM;
            cfg.qkv_bias = true;
        }
    }
    cfg.bos_token_id = tokenizer.bos_id();
    cfg.eos_token_ids = tokenizer.eos_id().into_iter().collect();
    cfg.pad_token_id = tokenizer.pad_id();
    // A fresh model obeys the rules a loaded config.json does (e.g. RoPE needs an even head_dim).
    ModelConfig::from_json(&cfg.to_json(), Path::new("the fresh model's config"))
        .map_err(|e| TrainError::Input(e.to_string()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/tokenizer"
        ));
        Tokenizer::from_dir(dir).unwrap()
    }

    #[test]
    fn packing_concatenates_rows_and_cuts_sequences() {
        let tok = tokenizer();
        let texts = vec!["The dog ran.".to_string(), "Birds build nests.".to_string()];
        let mut stream = Vec::new();
        for t in &texts {
            stream.extend(tok.encode(t, true).unwrap());
            stream.push(2);
        }
        let seqs = pack(&tok, &texts, 5).unwrap();
        let joined: Vec<u32> = seqs.iter().flat_map(|s| s.input_ids.clone()).collect();
        // A trailing single token cannot be trained on and is dropped.
        let expect_len = if stream.len() % 5 == 1 {
            stream.len() - 1
        } else {
            stream.len()
        };
        assert_eq!(joined, stream[..expect_len]);
        assert!(seqs.iter().all(|s| s.input_ids.len() <= 5));
        assert!(
            seqs.iter()
                .all(|s| !s.target[0] && s.target[1..].iter().all(|&t| t))
        );
        assert!(pack(&tok, &texts, 1).is_err());
    }

    fn spec() -> ModelSpec {
        serde_json::from_value(serde_json::json!({
            "arch": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }))
        .unwrap()
    }

    #[test]
    fn fresh_config_follows_the_tokenizer() {
        let tok = tokenizer();
        let cfg = fresh_config(&spec(), &tok).unwrap();
        assert_eq!(cfg.vocab_size, 512);
        assert_eq!(cfg.architecture, Architecture::Qwen2ForCausalLM);
        assert!(cfg.qkv_bias);
        assert_eq!(cfg.head_dim, 8);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert_eq!(cfg.bos_token_id, Some(1));

        let mut small = spec();
        small.vocab_size = Some(100);
        assert!(fresh_config(&small, &tok).is_err());
        let mut odd = spec();
        odd.num_key_value_heads = Some(3);
        assert!(fresh_config(&odd, &tok).is_err());
        let mut missing = spec();
        missing.hidden_size = None;
        let err = fresh_config(&missing, &tok).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }
}
