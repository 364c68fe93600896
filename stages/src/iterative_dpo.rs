//! The `iterative_dpo` stage kind: rounds of sample, judge, pair and DPO update, each round an
//! internal node `STAGE/round-N` (kind `iterative_dpo/round`) keyed by its own parameters and the
//! previous round's artifact; the stage node itself is the last round. One runner serves both.
//!
//! A round:
//! 1. starts from the previous round's model (round 1: the stage's `model`);
//! 2. samples `num_samples` completions of every prompt (the stage's sampling settings; the
//!    generator's seed is derived from the stage's seed and the round number);
//! 3. scores them with the judge (a reward model node, a rule or a command, as in `evaluate`);
//! 4. builds preference pairs per prompt: `best_worst` takes the best-scored sample as chosen and
//!    the worst as rejected (the first of equal scores in sample order), `all_pairs` takes every
//!    pair of samples, the better one chosen; in both modes a pair needs a score gap strictly
//!    greater than `min_margin`. Prompts whose samples all score the same are skipped and counted
//!    (`ties`); prompts with a gap, but none above `min_margin`, are counted as `below_margin`;
//! 5. tokenises the pairs exactly as `dpo` does ([`tokenize_pairs`]), computes the reference's
//!    log-probs (`reference = "initial"`: the stage's starting model; `"previous"`: the round's
//!    starting model) and runs a DPO update with [`DpoObjective`] through the training loop.
//!
//! A round that builds no pair keeps its starting model unchanged (and says so). The artifact is
//! the model directory (with its tokenizer), `metrics.jsonl` (the DPO steps), `samples.jsonl`
//! (every sample with its score), `pairs.jsonl` (the pairs, a `dpo`-ready dataset with their
//! scores) and `rounds.jsonl`: one line per round so far (the previous round's lines, then this
//! one's), so the final artifact holds the whole per-round table. Each round's summary (shown by
//! `rudder metrics`) has `round`, `score` (mean judge score of the round's samples, that is of the
//! policy the round starts from), `pairs`, `ties`, `below_margin`, and the DPO metrics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::{IterativeDpoParams, Pairing, RoundReference, Sampling};
use serde_json::{Value, json};

use crate::backend::{AutodiffTask, BackendTask, dispatch, dispatch_autodiff};
use crate::data::{PreferencePair, Rows};
use crate::dpo::{DpoExample, DpoObjective};
use crate::generate_stage::{Generated, generate_options, generate_samples, length_stats};
use crate::judge::{Sample, Scorer};
use crate::logps::{PromptCompletion, sequence_logps};
use crate::model::{load_causal_lm, save_causal_lm};
use crate::preference::loss::DpoLossConfig;
use crate::preference_data::{TokenizedPair, tokenize_pairs};
use crate::runner::{self, METRICS_FILE};
use crate::train::{TrainConfig, TrainError, TrainReport};

/// One line per round so far.
pub const ROUNDS_FILE: &str = "rounds.jsonl";
/// Every sample of the round with its score.
pub const SAMPLES_FILE: &str = "samples.jsonl";
/// The round's preference pairs.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// Pairs per reference forward pass. Fixed, so that reference values never depend on a training
/// setting.
const PAIRS_PER_PASS: usize = 8;

/// Runs rounds of `iterative_dpo`: register it once for the part kind `iterative_dpo/round` and
/// once for the stage kind `iterative_dpo` (its last round).
pub struct IterativeDpoRunner {
    pub kind: &'static str,
}

impl Runner for IterativeDpoRunner {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_round(ctx)?)
    }
}

/// One round's settings: the stage's, with that round's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    pub round: u32,
    pub beta: f64,
    pub learning_rate: f64,
    pub num_samples: u32,
    pub sampling: Sampling,
    pub min_margin: f64,
    pub epochs: u32,
}

impl RoundSettings {
    pub fn new(params: &IterativeDpoParams, round: u32) -> Self {
        let o = params
            .round
            .get(&round.to_string())
            .cloned()
            .unwrap_or_default();
        Self {
            round,
            beta: o.beta.unwrap_or(params.beta),
            learning_rate: o.learning_rate.unwrap_or(params.learning_rate),
            num_samples: o.num_samples.unwrap_or(params.num_samples),
            sampling: Sampling {
                temperature: o.temperature.unwrap_or(params.sampling.temperature),
                ..params.sampling.clone()
            },
            min_margin: o.min_margin.unwrap_or(params.min_margin),
            epochs: o.epochs.unwrap_or(params.train.epochs),
        }
    }
}

/// A pair by position: the prompt, and the chosen and rejected samples of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairIndex {
    pub prompt: usize,
    pub chosen: usize,
    pub rejected: usize,
}

/// The pairs of a round and the prompts that gave none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pairs {
    pub pairs: Vec<PairIndex>,
    /// Prompts whose samples all scored the same.
    pub ties: usize,
    /// Prompts with different scores but no gap above `min_margin`.
    pub below_margin: usize,
}

/// Builds the pairs from each prompt's sample scores (`scores[prompt][sample]`).
pub fn build_pairs(scores: &[Vec<f64>], pairing: Pairing, min_margin: f64) -> Pairs {
    let mut out = Pairs::default();
    for (prompt, s) in scores.iter().enumerate() {
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = s.iter().copied().fold(f64::INFINITY, f64::min);
        if s.len() < 2 || max == min {
            out.ties += 1;
            continue;
        }
        let before = out.pairs.len();
        match pairing {
            Pairing::BestWorst => {
                // Scores that are all NaN have no best or worst: nothing to learn from.
                let (Some(best), Some(worst)) = (
                    s.iter().position(|&x| x == max),
                    s.iter().position(|&x| x == min),
                ) else {
                    out.ties += 1;
                    continue;
                };
                if max - min > min_margin {
                    out.pairs.push(PairIndex {
                        prompt,
                        chosen: best,
                        rejected: worst,
                    });
                }
            }
            Pairing::AllPairs => {
                for i in 0..s.len() {
                    for j in i + 1..s.len() {
                        if (s[i] - s[j]).abs() > min_margin {
                            let (chosen, rejected) = if s[i] > s[j] { (i, j) } else { (j, i) };
                            out.pairs.push(PairIndex {
                                prompt,
                                chosen,
                                rejected,
                            });
                        }
                    }
                }
            }
        }
        if out.pairs.len() == before {
            out.below_margin += 1;
        }
    }
    out
}

/// SplitMix64 of the stage's seed and a stream number: a round's generation and shuffling seeds.
fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The round this vertex runs: a part's `round` parameter, or the last for the stage itself.
fn round_number(ctx: &StageContext<'_>, params: &IterativeDpoParams) -> Result<u32, TrainError> {
    match ctx.part {
        None => Ok(params.rounds),
        Some(part) => part
            .params
            .get("round")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| TrainError::Input(format!("{}: no round number", ctx.name))),
    }
}

fn write_lines(path: &Path, lines: &[Value]) -> Result<(), TrainError> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        })
}

/// The previous round's `rounds.jsonl` lines.
fn previous_rounds(dir: &Path) -> Result<Vec<Value>, TrainError> {
    let path = dir.join(ROUNDS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Io {
        path: path.clone(),
        source: e,
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Input(format!("{}: not a JSON line: {e}", path.display())))
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

fn run_round(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<IterativeDpoParams>(ctx)?;
    let n = round_number(ctx, params)?;
    let round = RoundSettings::new(params, n);
    let initial_dir = runner::model_dir(ctx)?;
    let previous_dir: Option<PathBuf> = if n > 1 {
        Some(
            runner::input(ctx, "previous")?
                .path
                .clone()
                .ok_or_else(|| TrainError::Input("the previous round has no artifact".into()))?,
        )
    } else {
        None
    };
    let start_dir = previous_dir.clone().unwrap_or_else(|| initial_dir.clone());
    let reference_dir = match params.reference {
        RoundReference::Initial => initial_dir.clone(),
        RoundReference::Previous => start_dir.clone(),
    };
    let tokenizer = runner::checked_tokenizer(&start_dir)?;
    let rows = runner::data_rows(ctx)?;
    let prompts = rows.prompts()?;

    // Sample.
    let batch_size = params.train.batch_size.max(1);
    let opts = generate_options(
        &round.sampling,
        batch_size,
        derive_seed(ctx.seed, 2 * u64::from(n)),
    );
    ctx.progress.set_length(prompts.len() as u64);
    ctx.progress.set_message(format!(
        "round {n}: sampling {} per prompt",
        round.num_samples
    ));
    let generated = generate_samples(
        ctx,
        &start_dir,
        &tokenizer,
        &prompts,
        round.num_samples as usize,
        &opts,
        0,
    )?;

    // Judge.
    ctx.progress.set_message(format!("round {n}: scoring"));
    let scores = dispatch(
        runner::backend(ctx)?,
        ScoreTask {
            ctx,
            params,
            rows: &rows,
            generated: &generated,
            batch_size: batch_size as usize,
        },
    )??;
    let per_prompt = round.num_samples.max(1) as usize;
    let by_prompt: Vec<Vec<f64>> = scores.chunks(per_prompt).map(<[f64]>::to_vec).collect();

    // Pair.
    let built = build_pairs(&by_prompt, params.pairing, round.min_margin);
    let sample = |prompt: usize, s: usize| &generated[prompt * per_prompt + s];
    let pairs: Vec<PreferencePair> = built
        .pairs
        .iter()
        .map(|p| PreferencePair {
            prompt: prompts[p.prompt].clone(),
            chosen: sample(p.prompt, p.chosen).completion.completion.clone(),
            rejected: sample(p.prompt, p.rejected).completion.completion.clone(),
            margin: None,
        })
        .collect();
    let tokenized = tokenize_pairs(&tokenizer, &pairs, &params.tokens)?;
    if let Some(warning) = tokenized.warning(&params.tokens) {
        ctx.progress.println(&warning);
    }

    write_samples(ctx, &generated, &scores)?;
    write_pairs(ctx, &built, &pairs, &by_prompt)?;

    // Update.
    let train_args = rudder_schema::kinds::TrainArgs {
        epochs: round.epochs,
        ..params.train.clone()
    };
    let cfg = runner::train_config(
        round.learning_rate,
        &train_args,
        derive_seed(ctx.seed, 2 * u64::from(n) + 1),
        Some(ctx.work_dir),
    );
    let loss = DpoLossConfig {
        losses: {
            let types = params.loss_type.to_vec();
            let weights = params
                .loss_weights
                .clone()
                .unwrap_or_else(|| vec![1.0; types.len()]);
            let mut losses: Vec<_> = types.into_iter().zip(weights).collect();
            // RPO's NLL term is the `sft` loss type with that weight, as in the `dpo` kind.
            if let Some(alpha) = params.rpo_alpha {
                losses.push((rudder_schema::kinds::DpoLossType::Sft, alpha));
            }
            losses
        },
        beta: round.beta,
        label_smoothing: params.label_smoothing,
        discopop_tau: params.discopop_tau,
        f_divergence_type: params.f_divergence_type,
        f_alpha_divergence_coef: params.f_alpha_divergence_coef,
    };
    let report = dispatch_autodiff(
        runner::backend(ctx)?,
        RoundTask {
            ctx,
            start_dir: &start_dir,
            reference_dir: &reference_dir,
            pairs: &tokenized.pairs,
            objective: DpoObjective {
                pad_id: tokenizer.pad_id().unwrap_or(0),
                loss,
                ld_alpha: params.ld_alpha,
                use_weighting: params.use_weighting,
            },
            cfg,
        },
    )??;
    tokenizer.save(ctx.out_dir)?;
    if tokenized.pairs.is_empty() {
        ctx.progress.println(&format!(
            "round {n}: no preference pair (ties {}, below margin {}); the model is unchanged",
            built.ties, built.below_margin
        ));
    }

    let (length, eos_fraction) = length_stats(&generated);
    let mut summary: BTreeMap<String, f64> = report.summary();
    summary.insert("round".into(), f64::from(n));
    summary.insert("score".into(), mean(&scores));
    summary.insert("pairs".into(), tokenized.pairs.len() as f64);
    summary.insert("dropped".into(), tokenized.dropped as f64);
    summary.insert("ties".into(), built.ties as f64);
    summary.insert("below_margin".into(), built.below_margin as f64);
    summary.insert("samples".into(), generated.len() as f64);
    summary.insert("length".into(), length);
    summary.insert("eos_fraction".into(), eos_fraction);

    let mut rounds = match &previous_dir {
        Some(dir) => previous_rounds(dir)?,
        None => Vec::new(),
    };
    rounds.push(json!(summary));
    write_lines(&ctx.out_dir.join(ROUNDS_FILE), &rounds)?;
    if ctx.part.is_none() {
        for line in rounds_table(&rounds) {
            ctx.progress.println(&line);
        }
    }
    Ok(StageOutcome { summary })
}

/// The per-round table: round, mean score, pairs, ties and the last DPO step's loss and reward
/// accuracy.
pub fn rounds_table(rounds: &[Value]) -> Vec<String> {
    let columns = [
        ("round", "round"),
        ("score", "score"),
        ("pairs", "pairs"),
        ("ties", "ties"),
        ("loss", "dpo_loss"),
        ("rewards/accuracies", "accuracy"),
    ];
    let mut lines = vec![
        columns
            .iter()
            .map(|(_, title)| format!("{title:>9}"))
            .collect::<Vec<_>>()
            .join(" "),
    ];
    for r in rounds {
        let cells: Vec<String> = columns
            .iter()
            .map(|(key, _)| match r.get(*key).and_then(Value::as_f64) {
                Some(v) if matches!(*key, "round" | "pairs" | "ties") => format!("{v:>9.0}"),
                Some(v) => format!("{v:>9.4}"),
                None => format!("{:>9}", "-"),
            })
            .collect();
        lines.push(cells.join(" "));
    }
    lines
}

fn write_samples(
    ctx: &StageContext<'_>,
    generated: &[Generated],
    scores: &[f64],
) -> Result<(), TrainError> {
    let lines: Vec<Value> = generated
        .iter()
        .zip(scores)
        .map(|(g, score)| {
            json!({
                "prompt": g.completion.prompt,
                "completion": g.completion.completion,
                "sample": g.sample,
                "row": g.row,
                "finish_reason": g.completion.finish_reason,
                "score": score,
            })
        })
        .collect();
    write_lines(&ctx.out_dir.join(SAMPLES_FILE), &lines)
}

fn write_pairs(
    ctx: &StageContext<'_>,
    built: &Pairs,
    pairs: &[PreferencePair],
    scores: &[Vec<f64>],
) -> Result<(), TrainError> {
    let lines: Vec<Value> = built
        .pairs
        .iter()
        .zip(pairs)
        .map(|(p, pair)| {
            json!({
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "chosen_score": scores[p.prompt][p.chosen],
                "rejected_score": scores[p.prompt][p.rejected],
                "row": p.prompt,
            })
        })
        .collect();
    write_lines(&ctx.out_dir.join(PAIRS_FILE), &lines)
}

struct ScoreTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    params: &'a IterativeDpoParams,
    rows: &'a Rows,
    generated: &'a [Generated],
    batch_size: usize,
}

impl BackendTask for ScoreTask<'_, '_> {
    type Output = Result<Vec<f64>, TrainError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let scorer =
            Scorer::<B>::from_stage(self.ctx, &self.params.judge, self.batch_size, &device)?;
        let samples: Vec<Sample<'_>> = self
            .generated
            .iter()
            .map(|g| Sample {
                prompt: &g.completion.prompt,
                completion: &g.completion.completion,
                row: self.rows.rows.get(g.row),
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
                "the judge ({}) gave a non-finite score to sample {i}",
                scorer.describe()
            )));
        }
        Ok(scores)
    }
}

struct RoundTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    start_dir: &'a Path,
    reference_dir: &'a Path,
    pairs: &'a [TokenizedPair],
    objective: DpoObjective,
    cfg: TrainConfig,
}

impl AutodiffTask for RoundTask<'_, '_> {
    type Output = Result<TrainReport, TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (model_cfg, model) = load_causal_lm::<B>(self.start_dir, &device)?;
        if self.pairs.is_empty() {
            std::fs::File::create(self.ctx.out_dir.join(METRICS_FILE)).map_err(|e| {
                TrainError::Io {
                    path: self.ctx.out_dir.join(METRICS_FILE),
                    source: e,
                }
            })?;
            save_causal_lm(&model, &model_cfg, self.ctx.out_dir)?;
            return Ok(TrainReport::default());
        }
        self.ctx.progress.set_message("reference log-probs".into());
        let examples = {
            let (_, reference) = load_causal_lm::<B::InnerBackend>(self.reference_dir, &device)?;
            let mut examples = Vec::with_capacity(self.pairs.len());
            for chunk in self.pairs.chunks(PAIRS_PER_PASS) {
                if self.ctx.is_interrupted() {
                    return Err(TrainError::Interrupted { step: 0 });
                }
                let rows: Vec<&PromptCompletion> = chunk
                    .iter()
                    .map(|p| &p.chosen)
                    .chain(chunk.iter().map(|p| &p.rejected))
                    .collect();
                let mut values = sequence_logps(
                    &reference,
                    &rows,
                    self.objective.pad_id,
                    rows.len(),
                    &device,
                );
                let rejected = values.split_off(chunk.len());
                for ((pair, reference_chosen), reference_rejected) in
                    chunk.iter().zip(values).zip(rejected)
                {
                    examples.push(DpoExample {
                        pair: pair.clone(),
                        reference_chosen,
                        reference_rejected,
                    });
                }
            }
            examples
        };
        self.ctx.progress.set_message(String::new());
        runner::train_causal_lm(
            self.ctx,
            model,
            &model_cfg,
            &self.objective,
            &examples,
            &self.cfg,
            &device,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_schema::kinds::RoundOverrides;

    fn p(prompt: usize, chosen: usize, rejected: usize) -> PairIndex {
        PairIndex {
            prompt,
            chosen,
            rejected,
        }
    }

    #[test]
    fn best_worst_pairs_the_extremes_and_skips_ties() {
        let scores = vec![
            vec![0.5, 1.0, -1.0, 1.0], // best: the first 1.0; worst: -1.0
            vec![0.2, 0.2, 0.2, 0.2],  // all tie
            vec![0.0, 0.1, 0.0, 0.05], // gap 0.1
        ];
        let built = build_pairs(&scores, Pairing::BestWorst, 0.0);
        assert_eq!(built.pairs, vec![p(0, 1, 2), p(2, 1, 0)]);
        assert_eq!((built.ties, built.below_margin), (1, 0));

        // A margin of 0.5 keeps only the first prompt's pair.
        let built = build_pairs(&scores, Pairing::BestWorst, 0.5);
        assert_eq!(built.pairs, vec![p(0, 1, 2)]);
        assert_eq!((built.ties, built.below_margin), (1, 1));
    }

    #[test]
    fn all_pairs_keeps_every_gap_above_the_margin() {
        let scores = vec![vec![0.0, 1.0, 0.4], vec![3.0, 3.0]];
        let built = build_pairs(&scores, Pairing::AllPairs, 0.0);
        assert_eq!(built.pairs, vec![p(0, 1, 0), p(0, 2, 0), p(0, 1, 2)]);
        assert_eq!((built.ties, built.below_margin), (1, 0));
        let built = build_pairs(&scores, Pairing::AllPairs, 0.5);
        assert_eq!(built.pairs, vec![p(0, 1, 0), p(0, 1, 2)]);
        // Equal samples within a prompt with a gap elsewhere are simply not paired.
        let built = build_pairs(&[vec![1.0, 1.0, 0.0]], Pairing::AllPairs, 0.0);
        assert_eq!(built.pairs, vec![p(0, 0, 2), p(0, 1, 2)]);
    }

    #[test]
    fn scores_that_are_not_numbers_build_no_pair() {
        let scores = vec![vec![f64::NAN, f64::NAN]];
        for pairing in [Pairing::BestWorst, Pairing::AllPairs] {
            assert!(build_pairs(&scores, pairing, 0.0).pairs.is_empty());
        }
    }

    #[test]
    fn round_settings_apply_that_rounds_overrides_only() {
        let mut params = IterativeDpoParams {
            beta: 0.1,
            num_samples: 4,
            ..IterativeDpoParams::default()
        };
        params.round.insert(
            "2".into(),
            RoundOverrides {
                beta: Some(0.3),
                temperature: Some(1.2),
                ..RoundOverrides::default()
            },
        );
        let one = RoundSettings::new(&params, 1);
        let two = RoundSettings::new(&params, 2);
        assert_eq!(one.beta, 0.1);
        assert_eq!(two.beta, 0.3);
        assert_eq!(two.sampling.temperature, 1.2);
        assert_eq!(one.sampling.temperature, params.sampling.temperature);
        assert_eq!(two.num_samples, 4);
        assert_eq!(two.round, 2);
    }

    #[test]
    fn round_seeds_differ() {
        assert_ne!(derive_seed(1, 2), derive_seed(1, 3));
        assert_ne!(derive_seed(1, 2), derive_seed(2, 2));
    }

    #[test]
    fn the_table_has_a_line_per_round() {
        let rounds = vec![
            json!({"round": 1.0, "score": 0.25, "pairs": 10.0, "ties": 2.0, "loss": 0.69}),
            json!({"round": 2.0, "score": 0.5, "pairs": 8.0, "ties": 4.0}),
        ];
        let lines = rounds_table(&rounds);
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("0.2500") && lines[1].contains("0.6900"));
        assert!(lines[2].trim_end().ends_with('-'));
    }
}
