//! Preference data tokenised as TRL 1.16 tokenises it ([`Tokenizer::split_answers`], rules in
//! [`crate::data`]): for strings `prompt = [BOS] + BPE(prompt)` and `completion =
//! BPE(completion) + [EOS]`; for conversations the prompt's rendering with the generation prompt
//! and the template's rendering of the answer after it, end-of-turn text included.
//!
//! Truncation: the prompt keeps its last `max_prompt_length` tokens, a completion its first
//! `max_completion_length`, then prompt + completion is cut to `max_length` keeping the start
//! (`keep_start`) or the end (`keep_end`). A pair where either completion has no token left
//! cannot be scored and is dropped (and counted), never turned into a NaN.
//!
//! Unpaired (KTO) rows are tokenised the same way and given their KL row: the same prompt with
//! the previous row's completion.

use rudder_schema::kinds::{PreferenceTokens, TruncationMode};

use crate::data::{PreferencePair, UnpairedExample};
use crate::logps::PromptCompletion;
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// A tokenised preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    /// The pair's row in the data (0-based), so cached values can be matched back to it.
    pub row: usize,
    pub chosen: PromptCompletion,
    pub rejected: PromptCompletion,
}

impl TokenizedPair {
    /// The longer side's length: what the pair occupies in a concatenated batch.
    pub fn padded_length(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }
}

/// Tokenised pairs and how many were dropped for having no completion token left.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPairs {
    pub pairs: Vec<TokenizedPair>,
    pub dropped: usize,
}

impl TokenizedPairs {
    /// The warning to show when pairs were dropped.
    pub fn warning(&self, opts: &PreferenceTokens) -> Option<String> {
        (self.dropped > 0).then(|| {
            format!(
                "warning: {} of {} examples have no completion token left after truncation to \
                 max_length {} and are skipped",
                self.dropped,
                self.dropped + self.pairs.len(),
                opts.max_length
            )
        })
    }
}

fn truncate(mut row: PromptCompletion, opts: &PreferenceTokens) -> PromptCompletion {
    if let Some(max) = opts.max_prompt_length {
        let max = max as usize;
        if row.prompt.len() > max {
            row.prompt.drain(..row.prompt.len() - max);
        }
    }
    if let Some(max) = opts.max_completion_length {
        row.completion.truncate(max as usize);
    }
    let max = opts.max_length as usize;
    let excess = row.len().saturating_sub(max);
    if excess > 0 {
        match opts.truncation_mode {
            TruncationMode::KeepStart => {
                let keep = max.saturating_sub(row.prompt.len());
                row.prompt.truncate(max);
                row.completion.truncate(keep);
            }
            TruncationMode::KeepEnd => {
                // The prompt keeps at least one token: the first token is never predicted, so a
                // completion that started the sequence would lose its first token's log-prob.
                let from_prompt = excess.min(row.prompt.len().saturating_sub(1));
                row.prompt.drain(..from_prompt);
                let from_completion = (excess - from_prompt).min(row.completion.len());
                row.completion.drain(..from_completion);
            }
        }
    }
    row
}

/// Tokenises `pairs` with TRL's prompt/completion split and the truncation settings.
pub fn tokenize_pairs(
    tokenizer: &Tokenizer,
    pairs: &[PreferencePair],
    opts: &PreferenceTokens,
) -> Result<TokenizedPairs, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut dropped = 0;
    for (row, pair) in pairs.iter().enumerate() {
        let split = tokenizer.split_answers(&pair.prompt, &[&pair.chosen, &pair.rejected])?;
        let mut answers = split.answers.into_iter();
        let mut side = || {
            truncate(
                PromptCompletion {
                    prompt: split.prompt.clone(),
                    completion: answers.next().expect("one answer per side"),
                },
                opts,
            )
        };
        let chosen = side();
        let rejected = side();
        if chosen.completion.is_empty() || rejected.completion.is_empty() {
            dropped += 1;
            continue;
        }
        out.push(TokenizedPair {
            row,
            chosen,
            rejected,
        });
    }
    Ok(TokenizedPairs {
        pairs: out,
        dropped,
    })
}

/// A tokenised unpaired (KTO) row with its KL row: the same prompt followed by the previous
/// row's completion (the first row takes the last row's), TRL's mismatched pairs for the KL
/// estimate. Rows rotate over the whole dataset, so the pairing does not depend on the batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedRow {
    pub row: usize,
    pub sequence: PromptCompletion,
    pub kl: PromptCompletion,
    pub desirable: bool,
}

impl UnpairedRow {
    /// The row as the reference cache stores it: the completion in place of `chosen`, the KL
    /// completion in place of `rejected`.
    pub fn as_pair(&self) -> TokenizedPair {
        TokenizedPair {
            row: self.row,
            chosen: self.sequence.clone(),
            rejected: self.kl.clone(),
        }
    }
}

/// Tokenises unpaired examples and builds their KL rows; rows with no completion token left
/// after truncation are dropped (and counted) before the KL rows are paired.
pub fn tokenize_unpaired(
    tokenizer: &Tokenizer,
    examples: &[UnpairedExample],
    opts: &PreferenceTokens,
) -> Result<(Vec<UnpairedRow>, usize), TrainError> {
    let mut kept = Vec::with_capacity(examples.len());
    for (row, example) in examples.iter().enumerate() {
        let split = tokenizer.split_answers(&example.prompt, &[&example.completion])?;
        let sequence = truncate(
            PromptCompletion {
                prompt: split.prompt,
                completion: split.answers.into_iter().next().expect("one answer"),
            },
            opts,
        );
        if !sequence.completion.is_empty() {
            kept.push((row, sequence, example.desirable));
        }
    }
    let dropped = examples.len() - kept.len();
    let rows = (0..kept.len())
        .map(|i| {
            let previous = &kept[(i + kept.len() - 1) % kept.len()].1;
            let (row, sequence, desirable) = &kept[i];
            let kl = truncate(
                PromptCompletion {
                    prompt: sequence.prompt.clone(),
                    completion: previous.completion.clone(),
                },
                opts,
            );
            UnpairedRow {
                row: *row,
                sequence: sequence.clone(),
                kl,
                desirable: *desirable,
            }
        })
        .collect();
    Ok((rows, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: usize, completion: usize) -> PromptCompletion {
        PromptCompletion {
            prompt: (0..prompt as u32).collect(),
            completion: (100..100 + completion as u32).collect(),
        }
    }

    fn opts(max_length: u32, mode: TruncationMode) -> PreferenceTokens {
        PreferenceTokens {
            max_length,
            truncation_mode: mode,
            ..PreferenceTokens::default()
        }
    }

    #[test]
    fn keep_start_cuts_the_completion_end_then_the_prompt() {
        let t = truncate(row(4, 6), &opts(8, TruncationMode::KeepStart));
        assert_eq!((t.prompt.len(), t.completion.len()), (4, 4));
        assert_eq!(t.completion, vec![100, 101, 102, 103]);
        let t = truncate(row(10, 3), &opts(8, TruncationMode::KeepStart));
        assert_eq!((t.prompt.len(), t.completion.len()), (8, 0));
    }

    #[test]
    fn keep_end_cuts_the_prompt_start_first() {
        let t = truncate(row(4, 6), &opts(8, TruncationMode::KeepEnd));
        assert_eq!(t.prompt, vec![2, 3]);
        assert_eq!(t.completion.len(), 6);
        let t = truncate(row(2, 10), &opts(8, TruncationMode::KeepEnd));
        assert_eq!(t.prompt, vec![1]);
        assert_eq!(t.completion, (103..110).collect::<Vec<u32>>());
    }

    #[test]
    fn prompt_and_completion_limits_apply_first() {
        let o = PreferenceTokens {
            max_prompt_length: Some(3),
            max_completion_length: Some(2),
            ..PreferenceTokens::default()
        };
        let t = truncate(row(5, 5), &o);
        assert_eq!(t.prompt, vec![2, 3, 4]);
        assert_eq!(t.completion, vec![100, 101]);
    }
}
