//! Text generation from a causal LM: prompts are batched with left padding, prefilled once, then
//! decoded token by token with a KV cache (or, for checking, by re-running the whole sequence).
//! Tokens are chosen on the host from the last position's logits: greedy at temperature 0,
//! otherwise sampled after temperature, top-k and top-p filtering, with a seeded ChaCha8
//! generator so that the same seed gives the same completions on every backend. A row stops at
//! an EOS token or after `max_new_tokens`.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use rudder_schema::Backend as Compute;

use crate::data::Turns;
use crate::error::StageError;
use crate::model::{CausalLm, ModelConfig, load_causal_lm};
use crate::tokenizer::Tokenizer;

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateOptions {
    /// Most tokens generated per prompt (EOS included). Default 128.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax). Default 1.0.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens; 0 disables. Default 0.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables. Default 1.0.
    pub top_p: f64,
    /// Seed of the sampling generator. Default 0.
    pub seed: u64,
    /// Prompts per forward pass. Default 8.
    pub batch_size: usize,
    /// Decode with a KV cache (true) or by re-running the whole sequence (false, slower, for
    /// checking). Default true.
    pub use_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            batch_size: 8,
            use_cache: true,
        }
    }
}

impl GenerateOptions {
    fn validate(&self) -> Result<(), StageError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(StageError::Generate(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(StageError::Generate(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.batch_size == 0 {
            return Err(StageError::Generate("batch_size must be positive".into()));
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// `max_new_tokens` were generated without EOS.
    Length,
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The prompt as the model saw it: the text, or a conversation's rendering with the chat
    /// template.
    pub prompt: String,
    /// The generated text, special tokens (an end-of-turn token) skipped.
    pub completion: String,
    /// The generated ids, the final EOS included when there is one.
    pub completion_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Generated ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedIds {
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Generates completions for `prompts` with the model (and its tokenizer) in `model_dir`.
/// Prompts are encoded as in training: strings with the tokenizer's special tokens,
/// conversations with the chat template and its generation prompt.
pub fn generate(
    model_dir: &Path,
    prompts: &[Turns],
    opts: &GenerateOptions,
    backend: Compute,
) -> Result<Vec<Completion>, StageError> {
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    generate_with_tokenizer(model_dir, &tokenizer, prompts, opts, backend)
}

/// Like [`generate`], with a tokenizer from elsewhere (a model directory without one, such as a
/// fresh architecture trained with a separate tokenizer stage).
pub fn generate_with_tokenizer(
    model_dir: &Path,
    tokenizer: &Tokenizer,
    prompts: &[Turns],
    opts: &GenerateOptions,
    backend: Compute,
) -> Result<Vec<Completion>, StageError> {
    opts.validate()?;
    let device = crate::backend::device(backend)?;
    let (config, model) = load_causal_lm(model_dir, &device)?;
    let (eos_ids, pad_id) = stop_tokens(model_dir, &config, tokenizer)?;
    generate_text(&model, tokenizer, prompts, &eos_ids, pad_id, opts)
}

/// The tokens generation stops at (config.json's and generation_config.json's `eos_token_id`s
/// and the tokenizer's EOS) and the padding id, of the model in `dir`.
pub fn stop_tokens(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<(Vec<u32>, u32), StageError> {
    let mut eos_ids = config.eos_token_ids.clone();
    eos_ids.extend(generation_config_eos(dir)?);
    eos_ids.extend(tokenizer.eos_id());
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let pad_id = tokenizer.pad_id().or(config.pad_token_id).unwrap_or(0);
    Ok((eos_ids, pad_id))
}

/// `eos_token_id` of generation_config.json (one id or a list), when the file exists.
pub fn generation_config_eos(dir: &Path) -> Result<Vec<u32>, StageError> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|source| StageError::Json { path, source })?;
    Ok(match value.get("eos_token_id") {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => Vec::new(),
    })
}

/// Encodes prompts, generates, decodes.
pub fn generate_text(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Turns],
    eos_ids: &[u32],
    pad_id: u32,
    opts: &GenerateOptions,
) -> Result<Vec<Completion>, StageError> {
    let encoded = prompts
        .iter()
        .map(|p| tokenizer.prompt_ids(p))
        .collect::<Result<Vec<_>, _>>()?;
    let generated = generate_ids(model, &encoded, eos_ids, pad_id, opts)?;
    prompts
        .iter()
        .zip(generated)
        .map(|(prompt, g)| {
            Ok(Completion {
                prompt: tokenizer.prompt_text(prompt)?,
                completion: tokenizer.decode(&g.ids, true)?,
                completion_ids: g.ids,
                finish_reason: g.finish_reason,
            })
        })
        .collect()
}

/// Generates from tokenised prompts, `opts.batch_size` prompts at a time, on the model's device.
pub fn generate_ids(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    pad_id: u32,
    opts: &GenerateOptions,
) -> Result<Vec<GeneratedIds>, StageError> {
    let device = &model.device();
    opts.validate()?;
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(StageError::Generate(format!(
            "prompt {i} encodes to no tokens"
        )));
    }
    let vocab = model.model.embed_tokens.weight.dims()[0];
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(StageError::Generate(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(opts.batch_size) {
        out.extend(generate_batch(
            model, chunk, eos_ids, pad_id, opts, &mut rng, device,
        ));
    }
    Ok(out)
}

fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let batch = rows.len();
    let seq = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(flat, [batch, seq]), device)
}

/// Logits of the last position, one row per batch element.
fn last_logits(
    model: &CausalLm,
    ids: Tensor<2, Int>,
    padding: &[Vec<u8>],
    cache: Option<&mut crate::model::KvCache>,
) -> Vec<Vec<f32>> {
    let [batch, seq] = ids.dims();
    let hidden = model.model.forward(ids, Some(padding), cache);
    let d = hidden.dims()[2];
    let last = hidden.slice([0..batch, seq - 1..seq, 0..d]);
    let logits = model.head(last);
    let vocab = logits.dims()[2];
    let flat: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("converted to f32");
    flat.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn generate_batch(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    eos_ids: &[u32],
    pad_id: u32,
    opts: &GenerateOptions,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Vec<GeneratedIds> {
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Left padding: every row's last prompt token sits at the same column. The batch is as
    // wide as the longest prompt rounded up to the device's shape bucket (exact on `cpu`), so
    // that GPU backends compile kernels for a few prompt widths only.
    let width =
        crate::padding::Pad::new(pad_id, crate::backend::shape_bucket(device)).length(longest, 0);
    let mut rows: Vec<Vec<u32>> = Vec::with_capacity(batch);
    let mut padding: Vec<Vec<u8>> = Vec::with_capacity(batch);
    for p in prompts {
        let pad = width - p.len();
        let mut row = vec![pad_id; pad];
        row.extend_from_slice(p);
        rows.push(row);
        let mut mask = vec![0u8; pad];
        mask.extend(std::iter::repeat_n(1u8, p.len()));
        padding.push(mask);
    }
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut finished: Vec<Option<FinishReason>> = vec![None; batch];
    if opts.max_new_tokens == 0 {
        return generated
            .into_iter()
            .map(|ids| GeneratedIds {
                ids,
                finish_reason: FinishReason::Length,
            })
            .collect();
    }

    let mut cache = opts.use_cache.then(|| model.model.new_cache());
    let mut logits = last_logits(model, ids_tensor(&rows, device), &padding, cache.as_mut());
    for step in 0..opts.max_new_tokens {
        let mut next = Vec::with_capacity(batch);
        let mut next_mask = Vec::with_capacity(batch);
        for (i, row_logits) in logits.iter().enumerate() {
            if finished[i].is_some() {
                next.push(pad_id);
                next_mask.push(0u8);
                continue;
            }
            let token = choose_token(row_logits, opts, rng);
            generated[i].push(token);
            if eos_ids.contains(&token) {
                finished[i] = Some(FinishReason::Eos);
            } else if generated[i].len() == opts.max_new_tokens {
                finished[i] = Some(FinishReason::Length);
            }
            next.push(token);
            next_mask.push(1u8);
        }
        if finished.iter().all(Option::is_some) || step + 1 == opts.max_new_tokens {
            break;
        }
        for ((row, mask), (&t, &m)) in rows
            .iter_mut()
            .zip(padding.iter_mut())
            .zip(next.iter().zip(&next_mask))
        {
            row.push(t);
            mask.push(m);
        }
        logits = match cache.as_mut() {
            Some(cache) => {
                let new_ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
                let new_mask: Vec<Vec<u8>> = next_mask.iter().map(|&m| vec![m]).collect();
                last_logits(model, ids_tensor(&new_ids, device), &new_mask, Some(cache))
            }
            None => last_logits(model, ids_tensor(&rows, device), &padding, None),
        };
    }
    generated
        .into_iter()
        .zip(finished)
        .map(|(ids, f)| GeneratedIds {
            ids,
            finish_reason: f.unwrap_or(FinishReason::Length),
        })
        .collect()
}

/// A uniform draw in [0, 1) with 53 random bits.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from one row of logits.
pub fn choose_token(logits: &[f32], opts: &GenerateOptions, rng: &mut ChaCha8Rng) -> u32 {
    if opts.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from(l) / opts.temperature)
        .collect();
    // Candidates sorted by decreasing logit (ties by index, for determinism).
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    if opts.top_k > 0 && opts.top_k < order.len() {
        // Like transformers, keep every token tied with the k-th.
        let kth = scaled[order[opts.top_k - 1]];
        order.retain(|&i| scaled[i] >= kth);
    }
    let max = scaled[order[0]];
    let weights: Vec<f64> = order.iter().map(|&i| (scaled[i] - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if opts.top_p < 1.0 {
        let mut cum = 0.0;
        for (n, w) in weights.iter().enumerate() {
            cum += w / total;
            if cum >= opts.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let target = uniform(rng) * kept_total;
    let mut cum = 0.0;
    for (n, w) in weights[..keep].iter().enumerate() {
        cum += w;
        if target < cum {
            return order[n] as u32;
        }
    }
    order[keep - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f64, top_k: usize, top_p: f64) -> GenerateOptions {
        GenerateOptions {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            choose_token(&[0.0, 3.0, 3.0, 1.0], &opts(0.0, 0, 1.0), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..50 {
            assert_eq!(
                choose_token(&[0.0, 1.0, 2.5, 2.0], &opts(1.0, 1, 1.0), &mut rng),
                2
            );
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two tokens.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[choose_token(&logits, &opts(1.0, 0, 0.8), &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Within the nucleus, the ratio follows the renormalised probabilities (e : 1).
        let ratio = seen[0] as f64 / seen[1] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.4, "{ratio}");
    }

    #[test]
    fn sampling_is_seeded() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| choose_token(&logits, &opts(1.0, 0, 1.0), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn finish_reason_serialises_lowercase() {
        assert_eq!(
            serde_json::to_string(&FinishReason::Eos).unwrap(),
            "\"eos\""
        );
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).unwrap(),
            "\"length\""
        );
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(opts(-1.0, 0, 1.0).validate().is_err());
        assert!(opts(1.0, 0, 0.0).validate().is_err());
    }
}
