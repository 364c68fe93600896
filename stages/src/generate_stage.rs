//! The `generate` stage kind: `num_samples` completions for every prompt of a dataset, written
//! as `completions.jsonl`, a dataset that later stages read (`prompt`, `completion`, `sample`,
//! `finish_reason`, and `row`, the 0-based position of the prompt's row in the source data).
//! [`generate_samples`] is shared with `evaluate`.

use std::io::Write;
use std::path::Path;

use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::{GenerateParams, Sampling};
use serde_json::json;

use crate::generate::{Completion, FinishReason, GenerateOptions, generate_with_tokenizer};
use crate::runner;
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// The dataset a `generate` stage writes.
pub const COMPLETIONS_FILE: &str = "completions.jsonl";

/// One generated completion of one prompt.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Position of the prompt in the prompt list (and of its row in the data).
    pub row: usize,
    /// Which of the prompt's `num_samples` completions this is.
    pub sample: usize,
    pub completion: Completion,
}

/// How to sample, from a stage's parameters.
pub fn generate_options(sampling: &Sampling, batch_size: u32, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: sampling.max_new_tokens as usize,
        temperature: sampling.temperature,
        top_k: sampling.top_k as usize,
        top_p: sampling.top_p,
        seed,
        batch_size: batch_size.max(1) as usize,
        use_cache: true,
    }
}

/// SplitMix64: spreads (seed, chunk) into unrelated generator seeds.
fn mix(seed: u64, chunk: u64) -> u64 {
    let mut z = seed ^ chunk.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `num_samples` completions of every prompt, ordered by prompt then sample. Generation runs one
/// batch (`opts.batch_size` completions) per call, so the progress bar (counted in prompts,
/// starting at `done`) moves and Ctrl-C stops between batches; each batch's sampler is seeded
/// from `opts.seed` and the batch's position, so the result does not depend on anything else.
pub fn generate_samples(
    ctx: &StageContext<'_>,
    model_dir: &Path,
    tokenizer: &Tokenizer,
    prompts: &[String],
    num_samples: usize,
    opts: &GenerateOptions,
    done: u64,
) -> Result<Vec<Generated>, TrainError> {
    let num_samples = num_samples.max(1);
    let items: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|row| (0..num_samples).map(move |sample| (row, sample)))
        .collect();
    let backend = runner::backend(ctx)?;
    let mut out = Vec::with_capacity(items.len());
    for (chunk_index, chunk) in items.chunks(opts.batch_size.max(1)).enumerate() {
        if ctx.is_interrupted() {
            return Err(TrainError::Input("interrupted".into()));
        }
        let chunk_prompts: Vec<String> =
            chunk.iter().map(|&(row, _)| prompts[row].clone()).collect();
        let chunk_opts = GenerateOptions {
            seed: mix(opts.seed, chunk_index as u64),
            ..opts.clone()
        };
        let completions =
            generate_with_tokenizer(model_dir, tokenizer, &chunk_prompts, &chunk_opts, backend)?;
        for (&(row, sample), completion) in chunk.iter().zip(completions) {
            out.push(Generated {
                row,
                sample,
                completion,
            });
        }
        ctx.progress
            .set_position(done + (out.len() / num_samples) as u64);
    }
    Ok(out)
}

/// Mean completion length in tokens and the fraction of completions that ended with EOS.
pub fn length_stats(generated: &[Generated]) -> (f64, f64) {
    let n = generated.len().max(1) as f64;
    let tokens: usize = generated
        .iter()
        .map(|g| g.completion.completion_ids.len())
        .sum();
    let eos = generated
        .iter()
        .filter(|g| g.completion.finish_reason == FinishReason::Eos)
        .count();
    (tokens as f64 / n, eos as f64 / n)
}

/// Runs `generate` stages.
pub struct GenerateRunner;

impl Runner for GenerateRunner {
    fn kind(&self) -> &'static str {
        "generate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_stage(ctx)?)
    }
}

fn run_stage(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<GenerateParams>(ctx)?;
    let (dir, tokenizer) = runner::model_with_tokenizer(ctx)?;
    let prompts = runner::data_rows(ctx)?.prompts()?;
    let opts = generate_options(&params.sampling, params.batch_size, ctx.seed);
    ctx.progress.set_length(prompts.len() as u64);
    let generated = generate_samples(
        ctx,
        &dir,
        &tokenizer,
        &prompts,
        params.num_samples as usize,
        &opts,
        0,
    )?;
    let path = ctx.out_dir.join(COMPLETIONS_FILE);
    let mut text = String::new();
    for g in &generated {
        let line = json!({
            "prompt": g.completion.prompt,
            "completion": g.completion.completion,
            "sample": g.sample,
            "finish_reason": g.completion.finish_reason,
            "row": g.row,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TrainError::Io { path, source: e })?;
    let (length, eos_fraction) = length_stats(&generated);
    let summary = [
        ("samples".to_string(), generated.len() as f64),
        ("length".to_string(), length),
        ("eos_fraction".to_string(), eos_fraction),
    ]
    .into_iter()
    .collect();
    Ok(StageOutcome { summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_seeds_differ_and_are_stable() {
        assert_eq!(mix(7, 0), mix(7, 0));
        assert_ne!(mix(7, 0), mix(7, 1));
        assert_ne!(mix(7, 0), mix(8, 0));
    }

    #[test]
    fn sampling_parameters_map_onto_generation_options() {
        let sampling = Sampling {
            max_new_tokens: 5,
            temperature: 0.0,
            top_k: 3,
            top_p: 0.9,
        };
        let opts = generate_options(&sampling, 4, 11);
        assert_eq!(opts.max_new_tokens, 5);
        assert_eq!(opts.temperature, 0.0);
        assert_eq!(opts.top_k, 3);
        assert_eq!(opts.top_p, 0.9);
        assert_eq!(opts.seed, 11);
        assert_eq!(opts.batch_size, 4);
    }
}
