//! Iterative DPO (`iterative_dpo`): rounds of sample, judge, pair and DPO update, each round an
//! internal node `STAGE/round-N` (kind `iterative_dpo/round`) keyed by its own parameters and the
//! previous round's artifact; the stage node itself is the last round. One runner serves both.
//!
//! A round:
//! 1. starts from the previous round's model (round 1: the stage's `model`); with `lora`, it
//!    continues that model's adapter on the base it was trained on (round 1 over a plain model,
//!    or with `merge_adapter`, draws a fresh one), so the rounds train one adapter;
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
//!    starting model) and runs a DPO update with `preference::DpoObjective`.
//!
//! A round that builds no pair keeps its starting model unchanged (and says so). The artifact is
//! the model directory (with its tokenizer), `metrics.jsonl` (the DPO steps), `samples.jsonl`
//! (every sample with its score), `pairs.jsonl` (the pairs, a `dpo`-ready dataset with their
//! scores) and `rounds.jsonl`: one line per round so far (the previous round's lines, then this
//! one's), so the final artifact holds the whole per-round table. Each round's summary (shown by
//! `rudder metrics`) has `round`, `score` (mean judge score of the round's samples, that is of the
//! policy the round starts from), `pairs`, `ties`, `below_margin`, and the DPO metrics.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{IterativeDpoParams, Pairing, ROUND_PART, RoundReference, TrainArgs};
use serde_json::{Value, json};

use crate::artifacts::{METRICS_FILE, read_jsonl, save_trained_model, write_jsonl};
use crate::data::PreferencePair;
use crate::kind::{Stage, StageKind};
use crate::losses::DpoLossConfig;
use crate::model::load_causal_lm;
use crate::preference::{DpoExample, DpoObjective, reference, tokenize_pairs};
use crate::sampling::{self, Generated, Sampler, generate_options, length_stats};
use crate::seeds;
use crate::train::{TrainConfig, TrainError};

/// One line per round so far.
pub const ROUNDS_FILE: &str = "rounds.jsonl";
/// Every sample of the round with its score.
pub const SAMPLES_FILE: &str = "samples.jsonl";
/// The round's preference pairs.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// What a round produces; bumped for the rounds and the stage (its last round) together.
const ROUND_VERSION: u32 = 5;

/// The stage itself: its last round.
pub struct IterativeDpo;

impl StageKind for IterativeDpo {
    type Params = IterativeDpoParams;
    const VERSION: u32 = ROUND_VERSION;
    // A round samples from its starting model, and the reference is a starting model.
    const READS_CONTINUED_MERGED: bool = true;

    fn run(
        stage: &Stage<'_, IterativeDpoParams>,
        device: &Device,
    ) -> Result<StageOutcome, TrainError> {
        let outcome = run_round(stage, stage.params.rounds, device)?;
        Ok(outcome)
    }
}

/// The rounds before the last (`STAGE/round-N`).
pub struct Round;

impl StageKind for Round {
    type Params = IterativeDpoParams;
    const PART: Option<&'static str> = Some(ROUND_PART);
    const VERSION: u32 = ROUND_VERSION;
    const READS_CONTINUED_MERGED: bool = true;

    fn run(
        stage: &Stage<'_, IterativeDpoParams>,
        device: &Device,
    ) -> Result<StageOutcome, TrainError> {
        let n = stage
            .params
            .round_of(stage.part())
            .ok_or_else(|| TrainError::Input(format!("{}: no round number", stage.name())))?;
        run_round(stage, n, device)
    }
}

/// Round `n`: sample, judge, pair, update.
fn run_round(
    stage: &Stage<'_, IterativeDpoParams>,
    n: u32,
    device: &Device,
) -> Result<StageOutcome, TrainError> {
    let params = stage.params;
    let round = params.round_settings(n);
    let initial_dir = stage.inputs.model_dir("model")?;
    let start = stage
        .inputs
        .model(if n > 1 { "previous" } else { "model" })?;
    let reference_dir = match params.reference {
        RoundReference::Initial => initial_dir,
        RoundReference::Previous => start.dir.clone(),
    };
    let tokenizer = &start.tokenizer;
    let rows = stage.inputs.rows("data")?;
    let prompts = rows.prompts()?;

    // Sample.
    let batch_size = params.train.batch_size.max(1);
    let opts = generate_options(
        &round.sampling,
        batch_size,
        seeds::mix(stage.seed(), 2 * u64::from(n)),
    );
    stage.progress().set_length(prompts.len() as u64);
    stage.progress().set_message(format!(
        "round {n}: sampling {} per prompt",
        round.num_samples
    ));
    let interrupted = || stage.is_interrupted();
    let generated = Sampler::load(&start, &device.clone().inner())?.samples(
        &prompts,
        round.num_samples as usize,
        &opts,
        stage.progress(),
        &interrupted,
        0,
    )?;

    // Judge.
    stage.progress().set_message(format!("round {n}: scoring"));
    let scorer = stage.inputs.judge(
        &params.judge,
        "judge",
        stage.recipe_dir(),
        batch_size as usize,
        &device.clone().inner(),
    )?;
    let scores = sampling::score(&scorer, &rows, &generated)?;
    drop(scorer);
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
            chosen: prompts[p.prompt].answer(&sample(p.prompt, p.chosen).completion.completion),
            rejected: prompts[p.prompt].answer(&sample(p.prompt, p.rejected).completion.completion),
            margin: None,
        })
        .collect();
    let tokenized = tokenize_pairs(tokenizer, &pairs, &params.tokens)?;
    if let Some(warning) = tokenized.warning(&params.tokens) {
        stage.progress().println(&warning);
    }

    write_samples(stage.out_dir(), &generated, &scores)?;
    write_pairs(stage.out_dir(), &built, &pairs, &by_prompt)?;

    // Update.
    let train_args = TrainArgs {
        epochs: round.epochs,
        ..params.train.clone()
    };
    let cfg = TrainConfig::new(
        round.learning_rate,
        &train_args,
        seeds::mix(stage.seed(), 2 * u64::from(n) + 1),
        Some(stage.work_dir()),
    );
    let objective = DpoObjective {
        pad: stage.pad(tokenizer.pad_id().unwrap_or(0)),
        loss: DpoLossConfig::new(&params.loss, round.beta),
        ld_alpha: params.loss.ld_alpha,
        use_weighting: params.loss.use_weighting,
    };
    // With `lora`, a round continues the adapter it starts from (the previous round's, or the
    // stage's model's) on the base that adapter was trained on, so the last round's adapter
    // applies to the stage's starting base; the first round over a plain model (or with
    // `merge_adapter`) attaches a fresh adapter drawn from the round's seed.
    let (config, model) = match (&train_args.lora, stage.continued()) {
        (Some(_), Some(_)) => stage.trainable_lm(&start.dir, &train_args, device)?,
        (lora, _) => {
            let (config, model) = load_causal_lm(&start.dir, device)?;
            let model = match lora {
                Some(lora) => crate::model::lora::attach(model, lora, cfg.seed)?,
                None => model,
            };
            (config, model)
        }
    };
    let report = if tokenized.pairs.is_empty() {
        // Nothing to learn from: the round keeps its starting model (with `lora`, its
        // adapter as it starts, which the next round continues).
        let metrics = stage.out_dir().join(METRICS_FILE);
        std::fs::File::create(&metrics).map_err(|e| TrainError::io(&metrics, e))?;
        save_trained_model(
            stage.out_dir(),
            &model,
            &config.saved_as(params.train.save_dtype),
            tokenizer,
            train_args.lora.as_ref(),
        )?;
        stage.progress().println(&format!(
            "round {n}: no preference pair (ties {}, below margin {}); the model is unchanged",
            built.ties, built.below_margin
        ));
        Default::default()
    } else {
        stage.progress().set_message("reference log-probs".into());
        let (_, reference_model) = load_causal_lm(&reference_dir, &device.clone().inner())?;
        let cache = reference::compute(
            &reference_model,
            &tokenized.pairs,
            objective.pad,
            device,
            &interrupted,
            &mut |_| {},
        )?;
        drop(reference_model);
        let examples: Vec<DpoExample> = tokenized
            .pairs
            .iter()
            .cloned()
            .zip(
                cache
                    .for_pairs(&tokenized.pairs)
                    .map_err(TrainError::Input)?,
            )
            .map(
                |(pair, (reference_chosen, reference_rejected))| DpoExample {
                    pair,
                    reference_chosen,
                    reference_rejected,
                },
            )
            .collect();
        stage.progress().set_message(String::new());
        let (trained, report) = stage.fit(&objective, model, &examples, &cfg, device)?;
        save_trained_model(
            stage.out_dir(),
            &trained,
            &config.saved_as(params.train.save_dtype),
            tokenizer,
            train_args.lora.as_ref(),
        )?;
        report
    };

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

    let mut rounds = if n > 1 {
        read_jsonl(&stage.inputs.artifact("previous")?.join(ROUNDS_FILE))?
    } else {
        Vec::new()
    };
    rounds.push(json!(summary));
    write_jsonl(&stage.out_dir().join(ROUNDS_FILE), &rounds)?;
    if stage.part().is_none() {
        for line in rounds_table(&rounds) {
            stage.progress().println(&line);
        }
    }
    Ok(StageOutcome { summary })
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
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
    out_dir: &Path,
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
    write_jsonl(&out_dir.join(SAMPLES_FILE), &lines)
}

fn write_pairs(
    out_dir: &Path,
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
                "prompt": pair.prompt.to_json(),
                "chosen": pair.chosen.to_json(),
                "rejected": pair.rejected.to_json(),
                "chosen_score": scores[p.prompt][p.chosen],
                "rejected_score": scores[p.prompt][p.rejected],
                "row": p.prompt,
            })
        })
        .collect();
    write_jsonl(&out_dir.join(PAIRS_FILE), &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

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
