//! Sampling for the kinds that generate from a model (`generate`, `evaluate`,
//! `iterative_dpo`, `constitutional`): a model loaded once with its tokenizer and stop tokens,
//! the recipe's sampling settings as generation options, and `num_samples` completions per
//! prompt generated one seeded batch at a time (so the progress bar moves, Ctrl-C stops between
//! batches, and a batch's completions depend only on the seed and the batch's position).
//! Decoding itself is `generate`'s.

use burn::tensor::Device;
use rudder_engine::runner::Progress;
use rudder_schema::kinds::Sampling;

use crate::data::{Rows, Turns};
use crate::generate::{Completion, FinishReason, GenerateOptions, generate_text, stop_tokens};
use crate::inputs::ModelInput;
use crate::judge::{Sample, Scorer};
use crate::model::{CausalLm, load_causal_lm};
use crate::seeds;
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// One generated completion of one prompt.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Position of the prompt in the prompt list (and of its row in the data).
    pub row: usize,
    /// Which of the prompt's `num_samples` completions this is.
    pub sample: usize,
    /// The prompt as the data gave it.
    pub prompt: Turns,
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

/// A model ready to sample from.
pub struct Sampler {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    pad_id: u32,
}

impl Sampler {
    pub fn load(input: &ModelInput, device: &Device) -> Result<Self, TrainError> {
        let (config, model) = load_causal_lm(&input.dir, device)?;
        let (eos_ids, pad_id) = stop_tokens(&input.dir, &config, &input.tokenizer)?;
        Ok(Self {
            model,
            tokenizer: input.tokenizer.clone(),
            eos_ids,
            pad_id,
        })
    }

    /// `num_samples` completions of every prompt, ordered by prompt then sample, one batch
    /// (`opts.batch_size` completions) at a time, each batch's sampler seeded from `opts.seed`
    /// and the batch's position. The progress bar counts prompts, from `done`.
    #[allow(clippy::too_many_arguments)]
    pub fn samples(
        &self,
        prompts: &[Turns],
        num_samples: usize,
        opts: &GenerateOptions,
        progress: &dyn Progress,
        interrupted: &dyn Fn() -> bool,
        done: u64,
    ) -> Result<Vec<Generated>, TrainError> {
        let num_samples = num_samples.max(1);
        let items: Vec<(usize, usize)> = (0..prompts.len())
            .flat_map(|row| (0..num_samples).map(move |sample| (row, sample)))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for (chunk_index, chunk) in items.chunks(opts.batch_size.max(1)).enumerate() {
            if interrupted() {
                return Err(TrainError::Input("interrupted".into()));
            }
            let chunk_prompts: Vec<Turns> =
                chunk.iter().map(|&(row, _)| prompts[row].clone()).collect();
            let chunk_opts = GenerateOptions {
                seed: seeds::mix(opts.seed, chunk_index as u64),
                ..opts.clone()
            };
            let completions = generate_text(
                &self.model,
                &self.tokenizer,
                &chunk_prompts,
                &self.eos_ids,
                self.pad_id,
                &chunk_opts,
            )?;
            for (&(row, sample), completion) in chunk.iter().zip(completions) {
                out.push(Generated {
                    row,
                    sample,
                    prompt: prompts[row].clone(),
                    completion,
                });
            }
            progress.set_position(done + (out.len() / num_samples) as u64);
        }
        Ok(out)
    }
}

/// The judge's score of every generated completion, in order; `rows` are the prompts' data
/// rows (rule judges read the expected answer from them). A score that is not a finite number
/// is an error naming the sample.
pub fn score(
    scorer: &Scorer,
    rows: &Rows,
    generated: &[Generated],
) -> Result<Vec<f64>, TrainError> {
    let samples: Vec<Sample<'_>> = generated
        .iter()
        .map(|g| Sample {
            prompt: &g.completion.prompt,
            completion: &g.completion.completion,
            row: rows.rows.get(g.row),
            turns: Some(&g.prompt),
        })
        .collect();
    let scores = scorer.score(&samples)?;
    if scores.len() != samples.len() {
        return Err(TrainError::Input(format!(
            "the judge ({}) gave {} scores for {} samples",
            scorer.describe(),
            scores.len(),
            samples.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(TrainError::Input(format!(
            "the judge ({}) gave a non-finite score ({}) to sample {i}",
            scorer.describe(),
            scores[i]
        )));
    }
    Ok(scores)
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

#[cfg(test)]
mod tests {
    use super::*;

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
