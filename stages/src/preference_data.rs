//! Preference data for the offline preference kinds (DPO family, ORPO, SimPO/CPO): tokenising
//! pairs as TRL does, truncating them, and the reference log-prob cache that `STAGE/ref_logps`
//! writes once and every epoch, stage and recipe with the same reference and data reads.
//!
//! Tokenisation (TRL 1.16, non-conversational): the EOS text is appended to each completion, the
//! prompt and `prompt + completion` are encoded with special tokens, and the completion is the
//! whole text's tokens after the prompt's. So `prompt = [BOS] + BPE(prompt)` and
//! `completion = BPE(completion) + [EOS]`.
//!
//! Truncation: the prompt keeps its last `max_prompt_length` tokens, a completion its first
//! `max_completion_length`, then prompt + completion is cut to `max_length` keeping the start
//! (`keep_start`) or the end (`keep_end`). A pair where either completion has no token left
//! cannot be scored and is dropped (and counted), never turned into a NaN.

use std::collections::BTreeMap;
use std::path::Path;

use rudder_schema::kinds::{PreferenceTokens, TruncationMode};
use safetensors::{Dtype, SafeTensors};

use crate::data::{PreferencePair, UnpairedExample};
use crate::error::StageError;
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
        let side = |completion: &str| -> Result<PromptCompletion, TrainError> {
            let split = tokenizer.split_prompt_completion(&pair.prompt, completion)?;
            Ok(truncate(
                PromptCompletion {
                    prompt: split.prompt_ids,
                    completion: split.completion_ids,
                },
                opts,
            ))
        };
        let chosen = side(&pair.chosen)?;
        let rejected = side(&pair.rejected)?;
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
        let split = tokenizer.split_prompt_completion(&example.prompt, &example.completion)?;
        let sequence = truncate(
            PromptCompletion {
                prompt: split.prompt_ids,
                completion: split.completion_ids,
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

/// The file in a `ref_logps` artifact.
pub const REF_LOGPS_FILE: &str = "ref_logps.safetensors";

/// A pair's per-token log-probs: chosen, rejected.
pub type PairTokenLogps = (Vec<f32>, Vec<f32>);

/// Per-token reference log-probs of every kept pair, by data row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RefLogps {
    /// Data row -> (chosen, rejected) per-token log-probs.
    pub rows: BTreeMap<usize, PairTokenLogps>,
}

impl RefLogps {
    /// Writes the cache as safetensors: `rows` (i64), and per side the concatenated per-token
    /// values with each row's offsets.
    pub fn save(&self, path: &Path) -> Result<(), StageError> {
        let mut rows = Vec::new();
        let mut sides: [(Vec<f32>, Vec<i64>); 2] = [(Vec::new(), vec![0]), (Vec::new(), vec![0])];
        for (&row, (chosen, rejected)) in &self.rows {
            rows.push(row as i64);
            for ((values, offsets), side) in sides.iter_mut().zip([chosen, rejected]) {
                values.extend(side);
                offsets.push(values.len() as i64);
            }
        }
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("rows".into(), Dtype::I64, vec![rows.len()], i64s(&rows)),
            (
                "chosen_offsets".into(),
                Dtype::I64,
                vec![sides[0].1.len()],
                i64s(&sides[0].1),
            ),
            (
                "chosen_logps".into(),
                Dtype::F32,
                vec![sides[0].0.len()],
                f32s(&sides[0].0),
            ),
            (
                "rejected_offsets".into(),
                Dtype::I64,
                vec![sides[1].1.len()],
                i64s(&sides[1].1),
            ),
            (
                "rejected_logps".into(),
                Dtype::F32,
                vec![sides[1].0.len()],
                f32s(&sides[1].0),
            ),
        ];
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StageError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        safetensors::serialize_to_file(views, None, path).map_err(|e| StageError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, StageError> {
        let bad = |message: String| StageError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let i64s = |name: &str| -> Result<Vec<i64>, StageError> {
            let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect())
        };
        let f32s = |name: &str| -> Result<Vec<f32>, StageError> {
            let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect())
        };
        let rows = i64s("rows")?;
        let side = |prefix: &str| -> Result<Vec<Vec<f32>>, StageError> {
            let offsets = i64s(&format!("{prefix}_offsets"))?;
            let values = f32s(&format!("{prefix}_logps"))?;
            if offsets.len() != rows.len() + 1 {
                return Err(bad(format!("{prefix}_offsets does not match rows")));
            }
            offsets
                .windows(2)
                .map(|w| {
                    values
                        .get(w[0] as usize..w[1] as usize)
                        .map(<[f32]>::to_vec)
                        .ok_or_else(|| bad(format!("{prefix}_offsets out of range")))
                })
                .collect()
        };
        let chosen = side("chosen")?;
        let rejected = side("rejected")?;
        Ok(Self {
            rows: rows
                .into_iter()
                .zip(chosen.into_iter().zip(rejected))
                .map(|(row, sides)| (row as usize, sides))
                .collect(),
        })
    }

    /// The cached values of each pair, checked against the policy's tokenisation: a reference
    /// whose tokenizer splits the data differently cannot be compared token for token.
    pub fn for_pairs(&self, pairs: &[TokenizedPair]) -> Result<Vec<PairTokenLogps>, String> {
        pairs
            .iter()
            .map(|pair| {
                let (chosen, rejected) = self.rows.get(&pair.row).ok_or_else(|| {
                    format!(
                        "the reference log-probs have no entry for row {}",
                        pair.row + 1
                    )
                })?;
                if chosen.len() != pair.chosen.completion.len()
                    || rejected.len() != pair.rejected.completion.len()
                {
                    return Err(format!(
                        "row {}: the reference model's tokenizer splits the completions into \
                         {}/{} tokens but the policy's into {}/{}; the policy and the reference \
                         must share a tokenizer",
                        pair.row + 1,
                        chosen.len(),
                        rejected.len(),
                        pair.chosen.completion.len(),
                        pair.rejected.completion.len()
                    ));
                }
                Ok((chosen.clone(), rejected.clone()))
            })
            .collect()
    }
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

    #[test]
    fn cache_round_trips_and_checks_token_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REF_LOGPS_FILE);
        let mut cache = RefLogps::default();
        cache.rows.insert(0, (vec![-1.0, -2.0], vec![-3.0]));
        cache.rows.insert(2, (vec![], vec![-0.5, -0.25, -0.125]));
        cache.save(&path).unwrap();
        let loaded = RefLogps::load(&path).unwrap();
        assert_eq!(loaded, cache);
        let pair = TokenizedPair {
            row: 0,
            chosen: row(1, 2),
            rejected: row(1, 1),
        };
        assert_eq!(
            loaded.for_pairs(std::slice::from_ref(&pair)).unwrap(),
            vec![(vec![-1.0, -2.0], vec![-3.0])]
        );
        let wrong = TokenizedPair {
            rejected: row(1, 2),
            ..pair.clone()
        };
        assert!(
            loaded
                .for_pairs(&[wrong])
                .unwrap_err()
                .contains("tokenizer")
        );
        let missing = TokenizedPair { row: 1, ..pair };
        assert!(loaded.for_pairs(&[missing]).unwrap_err().contains("row 2"));
    }
}
