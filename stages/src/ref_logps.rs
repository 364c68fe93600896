//! The internal `STAGE/ref_logps` node of the preference kinds: the frozen reference model's
//! per-token log-probs of every pair's completions, computed once. Its key holds only the
//! reference, the data and the tokenisation settings, so every epoch, stage and recipe that needs
//! the same values reads them from the store instead of running the reference again (TRL's
//! `precompute_ref_log_probs`, kept across runs).

use std::path::Path;

use burn::tensor::backend::Backend;
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::PreferenceTokens;

use crate::backend::{BackendTask, dispatch};
use crate::logps::{PromptCompletion, sequence_logps};
use crate::model::load_causal_lm;
use crate::preference_data::{
    PairTokenLogps, REF_LOGPS_FILE, RefLogps, TokenizedPair, TokenizedPairs, UnpairedRow,
    tokenize_pairs, tokenize_unpaired,
};
use crate::runner;
use crate::train::TrainError;

/// Pairs per reference forward pass (chosen and rejected together). Fixed, so that the cached
/// values never depend on a training setting.
const PAIRS_PER_PASS: usize = 8;

/// Runs `dpo/ref_logps` and `kto/ref_logps` parts.
pub struct RefLogpsRunner {
    pub kind: &'static str,
}

impl Runner for RefLogpsRunner {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_part(ctx)?)
    }
}

fn run_part(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let part = ctx
        .part
        .ok_or_else(|| TrainError::Input(format!("`{}` runs only as a part", ctx.kind)))?;
    let tokens: PreferenceTokens = serde_json::from_value(part.params.clone())
        .map_err(|e| TrainError::Input(format!("{}: bad tokenisation settings: {e}", ctx.name)))?;
    let dir = runner::model_dir_of(ctx, "reference")?;
    let tokenizer = runner::checked_tokenizer(&dir)?;
    let rows = runner::data_rows(ctx)?;
    // KTO's rows are single completions with their KL rows, cached in the same two slots.
    let tokenized = if ctx.kind.starts_with("kto/") {
        let (rows, dropped) = tokenize_unpaired(&tokenizer, &rows.unpaired_examples()?, &tokens)?;
        TokenizedPairs {
            pairs: rows.iter().map(UnpairedRow::as_pair).collect(),
            dropped,
        }
    } else {
        tokenize_pairs(&tokenizer, &rows.preference_pairs()?, &tokens)?
    };
    if let Some(warning) = tokenized.warning(&tokens) {
        ctx.progress.println(&warning);
    }
    let cache = dispatch(
        runner::backend(ctx)?,
        ReferenceTask {
            ctx,
            dir: &dir,
            pairs: &tokenized.pairs,
            pad_id: tokenizer.pad_id().unwrap_or(0),
        },
    )??;
    cache.save(&ctx.out_dir.join(REF_LOGPS_FILE))?;
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

struct ReferenceTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    dir: &'a Path,
    pairs: &'a [TokenizedPair],
    pad_id: u32,
}

impl BackendTask for ReferenceTask<'_, '_> {
    type Output = Result<RefLogps, TrainError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (_, model) = load_causal_lm::<B>(self.dir, &device)?;
        self.ctx.progress.set_length(self.pairs.len() as u64);
        let mut cache = RefLogps::default();
        for (done, chunk) in self.pairs.chunks(PAIRS_PER_PASS).enumerate() {
            if self.ctx.is_interrupted() {
                return Err(TrainError::Interrupted { step: done as u64 });
            }
            let rows: Vec<&PromptCompletion> = chunk
                .iter()
                .map(|p| &p.chosen)
                .chain(chunk.iter().map(|p| &p.rejected))
                .collect();
            let mut values = sequence_logps(&model, &rows, self.pad_id, rows.len(), &device);
            let rejected = values.split_off(chunk.len());
            for ((pair, chosen), rejected) in chunk.iter().zip(values).zip(rejected) {
                cache.rows.insert(pair.row, (chosen, rejected));
            }
            self.ctx
                .progress
                .set_position((done * PAIRS_PER_PASS + chunk.len()) as u64);
        }
        Ok(cache)
    }
}
