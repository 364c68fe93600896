//! The frozen reference's per-token log-probs of every pair's completions: computed once by a
//! kind's `ref_logps` part, stored as `ref_logps.safetensors` in its artifact, and read by every
//! epoch, stage and recipe with the same reference and data (TRL's
//! `precompute_ref_log_probs`, kept across runs).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::PreferenceTokens;
use safetensors::{Dtype, SafeTensors};

use super::pairs::{TokenizedPair, TokenizedPairs};
use crate::data::Rows;
use crate::error::StageError;
use crate::kind::Stage;
use crate::logps::{PromptCompletion, sequence_logps};
use crate::model::{CausalLm, load_causal_lm};
use crate::padding::Pad;
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// Pairs per reference forward pass (chosen and rejected together). Fixed, so that the cached
/// values never depend on a training setting.
pub const PAIRS_PER_PASS: usize = 8;

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

/// The reference's per-token log-probs of `pairs`, [`PAIRS_PER_PASS`] pairs per forward pass.
/// `interrupted` is asked before each pass; `done` is told how many pairs are done after it.
pub fn compute(
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    pad: Pad,
    _device: &Device,
    interrupted: &dyn Fn() -> bool,
    done: &mut dyn FnMut(usize),
) -> Result<RefLogps, TrainError> {
    let mut cache = RefLogps::default();
    for (pass, chunk) in pairs.chunks(PAIRS_PER_PASS).enumerate() {
        if interrupted() {
            return Err(TrainError::Interrupted { step: pass as u64 });
        }
        let rows: Vec<&PromptCompletion> = chunk
            .iter()
            .map(|p| &p.chosen)
            .chain(chunk.iter().map(|p| &p.rejected))
            .collect();
        let mut values = sequence_logps(reference, &rows, pad, rows.len());
        let rejected = values.split_off(chunk.len());
        for ((pair, chosen), rejected) in chunk.iter().zip(values).zip(rejected) {
            cache.rows.insert(pair.row, (chosen, rejected));
        }
        done(pass * PAIRS_PER_PASS + chunk.len());
    }
    Ok(cache)
}

/// What a kind's `ref_logps` part does: tokenise the stage's data with the reference's
/// tokenizer (`tokenize`: pairs, or KTO's rows with their KL rows in the two slots), run the
/// reference over them, and write the cache with its summary (`pairs`, `dropped`, mean
/// `logps/chosen` and `logps/rejected`).
pub fn run_part<P: rudder_schema::StageSpec>(
    stage: &Stage<'_, P>,
    tokens: &PreferenceTokens,
    tokenize: impl Fn(&Tokenizer, &Rows) -> Result<TokenizedPairs, TrainError>,
    device: &Device,
) -> Result<StageOutcome, TrainError> {
    let reference = stage.inputs.model("reference")?;
    let rows = stage.inputs.rows("data")?;
    let tokenized = tokenize(&reference.tokenizer, &rows)?;
    if let Some(warning) = tokenized.warning(tokens) {
        stage.progress().println(&warning);
    }
    let (_, model) = load_causal_lm(&reference.dir, device)?;
    stage.progress().set_length(tokenized.pairs.len() as u64);
    let interrupted = || stage.is_interrupted();
    let cache = compute(
        &model,
        &tokenized.pairs,
        stage.pad(reference.tokenizer.pad_id().unwrap_or(0)),
        device,
        &interrupted,
        &mut |done| stage.progress().set_position(done as u64),
    )?;
    cache.save(&stage.out_dir().join(REF_LOGPS_FILE))?;
    let n = cache.rows.len() as f64;
    let mean = |side: fn(&PairTokenLogps) -> &Vec<f32>| {
        cache
            .rows
            .values()
            .map(|v| side(v).iter().map(|&x| f64::from(x)).sum::<f64>())
            .sum::<f64>()
            / n.max(1.0)
    };
    let summary = [
        ("pairs".to_string(), n),
        ("dropped".to_string(), tokenized.dropped as f64),
        ("logps/chosen".to_string(), mean(|v| &v.0)),
        ("logps/rejected".to_string(), mean(|v| &v.1)),
    ]
    .into_iter()
    .collect();
    Ok(StageOutcome { summary })
}

/// The cached values of `pairs` from a `ref_logps` artifact directory.
pub fn load_for(
    artifact: &Path,
    pairs: &[TokenizedPair],
) -> Result<Vec<PairTokenLogps>, TrainError> {
    RefLogps::load(&artifact.join(REF_LOGPS_FILE))?
        .for_pairs(pairs)
        .map_err(TrainError::Input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preference::pairs::TokenizedPair;

    fn row(prompt: usize, completion: usize) -> PromptCompletion {
        PromptCompletion {
            prompt: (0..prompt as u32).collect(),
            completion: (100..100 + completion as u32).collect(),
        }
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
