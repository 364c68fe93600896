//! Supervised fine-tuning (`sft`): TRL's dataset formats tokenised into sequences with a
//! per-token training mask, optionally packed, then the causal LM objective (the token-mean
//! negative log-likelihood over the masked tokens of the whole batch).
//!
//! - prompt/completion: `[BOS] prompt completion [EOS]`, with the completion tokens (EOS
//!   included) trained on when `completion_only_loss`, every token after BOS otherwise;
//! - plain text: `[BOS] text [EOS]`, every token after BOS;
//! - conversations: the chat template's rendering, with only the assistant output trained on
//!   when `assistant_only_loss` (the rules are in [`crate::data`]'s module docs).
//!
//! `packing` packs examples into rows of `max_length` (best fit decreasing); each attends only
//! to itself. The artifact is the model directory with its tokenizer and `metrics.jsonl` (with
//! `lora`, the merged model and its PEFT adapter in `adapter/`).

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::SftParams;

use crate::artifacts::save_trained_model;
use crate::data::{SftExample, Turns};
use crate::kind::{Stage, StageKind};
use crate::tokenizer::Tokenizer;
use crate::train::{SftObjective, SftSequence, TrainError};

pub struct Sft;

impl StageKind for Sft {
    type Params = SftParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, SftParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let model = stage.inputs.model("model")?;
        let rows = stage.inputs.rows("data")?;
        let examples = rows.sft_examples(&p.dataset_text_field)?;
        let opts = SftTokenization {
            max_length: p.max_length as usize,
            completion_only_loss: p.completion_only_loss,
            assistant_only_loss: p.assistant_only_loss,
        };
        let mut sequences = tokenize(&model.tokenizer, &examples, &opts)?;
        if p.packing {
            sequences = pack(&sequences, opts.max_length);
        }
        let (config, weights) = stage.trainable_lm(&model.dir, &p.train, device)?;
        let objective = SftObjective {
            pad: stage.pad(model.tokenizer.pad_id().unwrap_or(0)),
        };
        let cfg = stage.train_config(p.learning_rate, &p.train);
        let (trained, report) = stage.fit(&objective, weights, &sequences, &cfg, device)?;
        save_trained_model(
            stage.out_dir(),
            &trained,
            &config.saved_as(p.train.save_dtype),
            &model.tokenizer,
            p.train.lora.as_ref(),
        )?;
        let mut summary = report.summary();
        summary.insert("examples".into(), examples.len() as f64);
        if p.packing {
            summary.insert("packed_rows".into(), sequences.len() as f64);
        }
        Ok(StageOutcome { summary })
    }
}

/// Most examples in one packed row: segment ids are bytes, 0 meaning padding.
pub const MAX_SEGMENTS: usize = 255;

/// Packs sequences into rows of at most `max_length` tokens, best fit decreasing (TRL's `bfd`
/// strategy): longest first, each into the fullest row it still fits. Each example keeps its own
/// segment, so it attends only to itself, with positions from 0: the loss equals the unpacked
/// one while far less compute goes to padding.
pub fn pack(sequences: &[SftSequence], max_length: usize) -> Vec<SftSequence> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].input_ids.len()));
    let mut rows: Vec<SftSequence> = Vec::new();
    // (room left, row): the smallest room that fits is the best fit.
    let mut open: std::collections::BTreeSet<(usize, usize)> = Default::default();
    for i in order {
        let seq = &sequences[i];
        let len = seq.input_ids.len();
        let fit = open.range((len, 0)..).next().copied();
        let row = match fit {
            Some(entry) => {
                open.remove(&entry);
                entry.1
            }
            None => {
                rows.push(SftSequence {
                    input_ids: Vec::with_capacity(max_length),
                    target: Vec::with_capacity(max_length),
                    segments: Some(Vec::with_capacity(max_length)),
                });
                rows.len() - 1
            }
        };
        let packed = &mut rows[row];
        let segments = packed.segments.get_or_insert_with(Vec::new);
        let segment = segments.last().copied().unwrap_or(0) + 1;
        packed.input_ids.extend_from_slice(&seq.input_ids);
        packed.target.extend_from_slice(&seq.target);
        segments.extend(std::iter::repeat_n(segment, len));
        let room = max_length.saturating_sub(packed.input_ids.len());
        if room > 0 && usize::from(segment) < MAX_SEGMENTS {
            open.insert((room, row));
        }
    }
    rows
}

/// How examples are turned into sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftTokenization {
    pub max_length: usize,
    pub completion_only_loss: bool,
    pub assistant_only_loss: bool,
}

impl Default for SftTokenization {
    fn default() -> Self {
        Self {
            max_length: 1024,
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

/// Tokenises every example; sequences longer than `max_length` keep their start.
pub fn tokenize(
    tokenizer: &Tokenizer,
    examples: &[SftExample],
    opts: &SftTokenization,
) -> Result<Vec<SftSequence>, TrainError> {
    examples
        .iter()
        .map(|ex| {
            let mut seq = tokenize_one(tokenizer, ex, opts)?;
            seq.input_ids.truncate(opts.max_length);
            seq.target.truncate(opts.max_length);
            Ok(seq)
        })
        .collect()
}

fn tokenize_one(
    tokenizer: &Tokenizer,
    example: &SftExample,
    opts: &SftTokenization,
) -> Result<SftSequence, TrainError> {
    match example {
        SftExample::PromptCompletion { prompt, completion } => {
            // TRL tokenises the prompt and prompt + completion and splits at their common prefix.
            let split = tokenizer.split_answers(prompt, &[completion])?;
            let n_prompt = split.prompt.len();
            let mut input_ids = split.prompt;
            input_ids.extend(split.answers.into_iter().flatten());
            let mut target: Vec<bool> = (0..input_ids.len())
                .map(|i| i > 0 && (!opts.completion_only_loss || i >= n_prompt))
                .collect();
            if let (true, Turns::Chat(p), Turns::Chat(c)) =
                (opts.assistant_only_loss, prompt, completion)
            {
                let messages: Vec<_> = p.iter().chain(c).cloned().collect();
                let (_, assistant) = tokenizer.conversation_ids(&messages)?;
                for (t, a) in target
                    .iter_mut()
                    .zip(assistant.iter().chain(std::iter::repeat(&false)))
                {
                    *t &= *a;
                }
            }
            Ok(SftSequence {
                input_ids,
                target,
                segments: None,
            })
        }
        SftExample::Text(text) => {
            let mut input_ids = tokenizer.encode(text, true)?;
            if let Some(eos) = tokenizer.eos_id()
                && input_ids.last() != Some(&eos)
            {
                input_ids.push(eos);
            }
            let target = (0..input_ids.len()).map(|i| i > 0).collect();
            Ok(SftSequence {
                input_ids,
                target,
                segments: None,
            })
        }
        SftExample::Conversation(messages) => {
            let (input_ids, assistant) = tokenizer.conversation_ids(messages)?;
            let target = assistant
                .iter()
                .enumerate()
                .map(|(i, &a)| i > 0 && (a || !opts.assistant_only_loss))
                .collect();
            Ok(SftSequence {
                input_ids,
                target,
                segments: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::model::{ModelConfig, random_causal_lm};
    use crate::padding::Pad;
    use crate::train::Objective;

    fn example(len: usize, first_target: usize, salt: u32) -> SftSequence {
        SftSequence {
            input_ids: (0..len as u32).map(|i| (i * 7 + salt) % 61 + 1).collect(),
            target: (0..len).map(|i| i >= first_target).collect(),
            segments: None,
        }
    }

    #[test]
    fn packing_fits_rows_best_first_and_keeps_every_token() {
        let seqs: Vec<SftSequence> = [9, 3, 7, 5, 2, 6]
            .iter()
            .enumerate()
            .map(|(i, &len)| example(len, 1, i as u32))
            .collect();
        let rows = pack(&seqs, 10);
        // Longest first, each into the fullest row it fits: [9], [7, 3], [6, 2], [5].
        let lengths: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
        assert_eq!(lengths, vec![9, 10, 8, 5]);
        assert_eq!(
            rows[1].segments.as_deref(),
            Some(&[1, 1, 1, 1, 1, 1, 1, 2, 2, 2][..])
        );
        let total: usize = rows.iter().map(|r| r.num_targets()).sum();
        let expect: usize = seqs.iter().map(|s| s.num_targets()).sum();
        assert_eq!(total, expect);
    }

    #[test]
    fn a_packed_batch_has_the_loss_of_its_examples_unpacked() {
        let device = crate::test_device();
        let cfg = ModelConfig::llama(64, 32, 64, 2, 4, 2);
        let model = random_causal_lm(&cfg, 3, &device);
        let seqs: Vec<SftSequence> = [12, 5, 9, 7, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| example(len, 2, i as u32))
            .collect();
        let packed = pack(&seqs, 16);
        assert!(packed.len() < seqs.len());
        let objective = SftObjective { pad: Pad::exact(0) };
        let loss = |rows: &[SftSequence]| -> f64 {
            let refs: Vec<&SftSequence> = rows.iter().collect();
            let out = Objective::forward(&objective, &model, &refs, &device).unwrap();
            out.loss_sum.into_scalar::<f64>() / Objective::weight(&objective, &refs)
        };
        let (unpacked, packed) = (loss(&seqs), loss(&packed));
        assert!(
            (unpacked - packed).abs() / unpacked < 1e-5,
            "{unpacked} vs {packed}"
        );
    }
}
