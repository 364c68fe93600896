//! Evaluation (`evaluate`): every model of `models` answers the prompts (`num_samples` each,
//! greedy by default, seeded with the stage's seed), a judge scores the answers, and the stage
//! reports per model:
//! - `score`: the mean judge score;
//! - `win_rate` (with a `baseline`): over prompts and sample indices, 1 when the model's answer
//!   scores above the baseline's answer to the same prompt with the same sample index, 0.5 on a
//!   tie, 0 below; a model against itself gets exactly 0.5;
//! - `kl` (with a `reference`): the mean over the model's own samples of
//!   `sum_t (log p_model(y_t) - log p_ref(y_t))` over the completion tokens (EOS included), the
//!   sequence-level k1 estimator of KL(model || reference). It is unbiased only for samples drawn
//!   from the model at temperature 1; at other temperatures (greedy included) it is the log-ratio
//!   on the answers the model actually gives, which is what a user comparing models sees. The
//!   model and the reference must share a tokenizer;
//! - `length`: mean completion length in tokens (EOS included); `eos_fraction`: the fraction of
//!   completions that ended with EOS rather than `max_new_tokens`.
//!
//! The artifact holds `eval.json` (the table) and `samples.jsonl` (every answer with its score and
//! log-ratio). Both, and the summary metrics (`NODE/score`, ...), name models by their node
//! names, which are not part of the key: an artifact built under other names keeps them, so
//! `eval.json` also gives each model's role (`models[i]`). Models that are the same artifact
//! (same key), such as the baseline listed among the models, are generated from and scored once.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use rudder_engine::Key;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::EvaluateParams;
use serde_json::{Value, json};

use crate::artifacts::write_jsonl;
use crate::data::Rows;
use crate::inputs::ModelInput;
use crate::kind::{Stage, StageKind};
use crate::logps::{PromptCompletion, sequence_logps};
use crate::model::load_causal_lm;
use crate::sampling::{self, Generated, Sampler, generate_options, length_stats};
use crate::train::TrainError;

/// The per-model metrics.
pub const EVAL_FILE: &str = "eval.json";
/// Every scored answer.
pub const SAMPLES_FILE: &str = "samples.jsonl";

pub struct Evaluate;

impl StageKind for Evaluate {
    type Params = EvaluateParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, EvaluateParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        run_stage(stage, &device.clone().inner())
    }
}

/// One model to generate from: a distinct artifact.
struct Generator {
    model: ModelInput,
    /// Whether some listed model is this one, so its KL to the reference is wanted.
    listed: bool,
}

/// One model's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetrics {
    pub model: String,
    pub score: f64,
    pub win_rate: Option<f64>,
    pub kl: Option<f64>,
    pub length: f64,
    pub eos_fraction: f64,
    pub samples: usize,
}

impl ModelMetrics {
    /// `(name, value)` of every metric this model has, in the table's order.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        let mut values = vec![("score", self.score)];
        values.extend(self.win_rate.map(|w| ("win_rate", w)));
        values.extend(self.kl.map(|k| ("kl", k)));
        values.push(("length", self.length));
        values.push(("eos_fraction", self.eos_fraction));
        values
    }
}

/// Win 1, tie 0.5, loss 0, averaged over aligned pairs of scores.
pub fn win_rate(scores: &[f64], baseline: &[f64]) -> f64 {
    let n = scores.len().min(baseline.len());
    if n == 0 {
        return 0.0;
    }
    let total: f64 = scores
        .iter()
        .zip(baseline)
        .map(|(a, b)| match a.partial_cmp(b) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Less) => 0.0,
            _ => 0.5,
        })
        .sum();
    total / n as f64
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

fn run_stage(
    stage: &Stage<'_, EvaluateParams>,
    device: &Device,
) -> Result<StageOutcome, TrainError> {
    let params = stage.params;
    let rows = stage.inputs.rows("data")?;
    let prompts = rows.prompts()?;

    let inputs = &stage.inputs;
    let mut generators: Vec<Generator> = Vec::new();
    let mut add = |role: &str, listed: bool| -> Result<usize, TrainError> {
        let key: Key = inputs.key(role)?;
        if let Some(i) = generators.iter().position(|g| g.model.key == key) {
            generators[i].listed |= listed;
            return Ok(i);
        }
        generators.push(Generator {
            model: inputs.model(role)?,
            listed,
        });
        Ok(generators.len() - 1)
    };
    let models: Vec<(String, usize)> = (0..params.models.len())
        .map(|i| {
            let role = format!("models[{i}]");
            let node = inputs.node(&role)?.to_owned();
            Ok((node, add(&role, true)?))
        })
        .collect::<Result<_, TrainError>>()?;
    let baseline = match inputs.has("baseline") {
        true => Some((inputs.node("baseline")?.to_owned(), add("baseline", false)?)),
        false => None,
    };
    let reference = match inputs.has("reference") {
        true => {
            let reference = inputs.model("reference")?;
            for g in generators.iter().filter(|g| g.listed) {
                // A model may sample any id of its embedding table; the reference must embed it.
                let vocab = g.model.config.vocab_size;
                let reference_vocab = reference.config.vocab_size;
                if vocab > reference_vocab {
                    return Err(TrainError::Input(format!(
                        "KL to reference `{}`: `{}` has a vocabulary of {vocab} ids, the reference only {reference_vocab}",
                        reference.node, g.model.node
                    )));
                }
                if g.model.tokenizer.vocab_size() != reference.tokenizer.vocab_size() {
                    return Err(TrainError::Input(format!(
                        "KL to reference `{}` needs the same tokenizer, but `{}` has {} tokens and the reference {}",
                        reference.node,
                        g.model.node,
                        g.model.tokenizer.vocab_size(),
                        reference.tokenizer.vocab_size()
                    )));
                }
            }
            Some((reference.node.clone(), reference.dir))
        }
        false => None,
    };

    let opts = generate_options(&params.sampling, params.batch_size, stage.seed());
    stage
        .progress()
        .set_length((prompts.len() * generators.len()) as u64);
    let interrupted = || stage.is_interrupted();
    let mut generations = Vec::with_capacity(generators.len());
    for (i, g) in generators.iter().enumerate() {
        stage
            .progress()
            .set_message(format!("generating with {}", g.model.node));
        let sampler = Sampler::load(&g.model, device)?;
        generations.push(sampler.samples(
            &prompts,
            params.num_samples as usize,
            &opts,
            stage.progress(),
            &interrupted,
            (i * prompts.len()) as u64,
        )?);
    }

    let judged = judge(
        stage,
        &rows,
        &generators,
        &generations,
        reference.as_ref().map(|(_, dir)| dir.as_path()),
        device,
    )?;

    let metrics: Vec<ModelMetrics> = models
        .iter()
        .map(|(node, i)| {
            let (length, eos_fraction) = length_stats(&generations[*i]);
            ModelMetrics {
                model: node.clone(),
                score: mean(&judged.scores[*i]),
                win_rate: baseline
                    .as_ref()
                    .map(|(_, b)| win_rate(&judged.scores[*i], &judged.scores[*b])),
                kl: judged.kls[*i].as_deref().map(mean),
                length,
                eos_fraction,
                samples: generations[*i].len(),
            }
        })
        .collect();

    write_samples(
        &stage.out_dir().join(SAMPLES_FILE),
        &models,
        &generations,
        &judged,
    )?;
    let eval = json!({
        "judge": judged.judge,
        "baseline": baseline.as_ref().map(|(node, _)| node),
        "reference": reference.as_ref().map(|(node, _)| node),
        "num_samples": params.num_samples,
        "models": metrics.iter().enumerate().map(|(i, m)| {
            let mut object = serde_json::Map::new();
            object.insert("model".into(), Value::from(m.model.clone()));
            // Node names are not in the stage's key; the position in `models` is.
            object.insert("role".into(), Value::from(format!("models[{i}]")));
            for (name, value) in m.values() {
                object.insert(name.into(), Value::from(value));
            }
            object.insert("samples".into(), Value::from(m.samples));
            Value::Object(object)
        }).collect::<Vec<_>>(),
    });
    let path = stage.out_dir().join(EVAL_FILE);
    let text = serde_json::to_string_pretty(&eval).expect("metrics serialise") + "\n";
    std::fs::write(&path, text).map_err(|e| TrainError::Io { path, source: e })?;

    for line in table(&metrics) {
        stage.progress().println(&line);
    }
    let mut summary = BTreeMap::new();
    for m in &metrics {
        for (name, value) in m.values() {
            summary.insert(format!("{}/{name}", m.model), value);
        }
    }
    Ok(StageOutcome { summary })
}

fn write_samples(
    path: &Path,
    models: &[(String, usize)],
    generations: &[Vec<Generated>],
    judged: &Judged,
) -> Result<(), TrainError> {
    let mut lines = Vec::new();
    for (node, i) in models {
        for (k, g) in generations[*i].iter().enumerate() {
            let mut line = json!({
                "model": node,
                "prompt": g.completion.prompt,
                "completion": g.completion.completion,
                "sample": g.sample,
                "row": g.row,
                "finish_reason": g.completion.finish_reason,
                "score": judged.scores[*i][k],
            });
            if let Some(kls) = &judged.kls[*i] {
                line["kl"] = Value::from(kls[k]);
            }
            lines.push(line);
        }
    }
    write_jsonl(path, &lines)
}

/// The metrics as an aligned table, one model per row; `-` where a metric does not apply.
pub fn table(metrics: &[ModelMetrics]) -> Vec<String> {
    let columns = ["score", "win_rate", "kl", "length", "eos_fraction"];
    let present: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| {
            metrics
                .iter()
                .any(|m| m.values().iter().any(|(n, _)| n == c))
        })
        .collect();
    let mut rows: Vec<Vec<String>> = vec![
        std::iter::once("model".to_string())
            .chain(present.iter().map(|c| c.to_string()))
            .collect(),
    ];
    for m in metrics {
        let values = m.values();
        let mut row = vec![m.model.clone()];
        for c in &present {
            row.push(
                values
                    .iter()
                    .find(|(n, _)| n == c)
                    .map_or_else(|| "-".to_string(), |(_, v)| format!("{v:.4}")),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(j, cell)| {
                    if j == 0 {
                        format!("{cell:<w$}", w = widths[j])
                    } else {
                        format!("{cell:>w$}", w = widths[j])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect()
}

/// Scores and log-ratios per generator, aligned with its generations.
struct Judged {
    judge: String,
    scores: Vec<Vec<f64>>,
    kls: Vec<Option<Vec<f64>>>,
}

/// Scores every generation with the stage's judge, and each listed model's log-ratio to the
/// reference on its own samples.
fn judge(
    stage: &Stage<'_, EvaluateParams>,
    rows: &Rows,
    generators: &[Generator],
    generations: &[Vec<Generated>],
    reference: Option<&Path>,
    device: &Device,
) -> Result<Judged, TrainError> {
    let batch_size = stage.params.batch_size.max(1) as usize;
    stage.progress().set_message("scoring".into());
    let scorer = stage.inputs.judge(
        &stage.params.judge,
        "judge",
        stage.recipe_dir(),
        batch_size,
        device,
    )?;
    let scores = generations
        .iter()
        .map(|generated| sampling::score(&scorer, rows, generated))
        .collect::<Result<Vec<_>, _>>()?;
    let judge = scorer.describe();
    drop(scorer);

    let mut kls = vec![None; generations.len()];
    if let Some(reference_dir) = reference {
        let prompts = rows.prompts()?;
        stage.progress().set_message("KL to the reference".into());
        let (_, reference) = load_causal_lm(reference_dir, device)?;
        for (i, (g, generated)) in generators.iter().zip(generations).enumerate() {
            if !g.listed {
                continue;
            }
            if stage.is_interrupted() {
                return Err(TrainError::Input("interrupted".into()));
            }
            let rows = generated
                .iter()
                .map(|s| {
                    Ok(PromptCompletion {
                        prompt: g.model.tokenizer.prompt_ids(&prompts[s.row])?,
                        completion: s.completion.completion_ids.clone(),
                    })
                })
                .collect::<Result<Vec<_>, TrainError>>()?;
            let refs: Vec<&PromptCompletion> = rows.iter().collect();
            let pad = stage.pad(g.model.tokenizer.pad_id().unwrap_or(0));
            let (_, model) = load_causal_lm(&g.model.dir, device)?;
            let policy = sequence_logps(&model, &refs, pad, batch_size);
            drop(model);
            let base = sequence_logps(&reference, &refs, pad, batch_size);
            let sum = |v: &Vec<f32>| v.iter().map(|&x| f64::from(x)).sum::<f64>();
            kls[i] = Some(
                policy
                    .iter()
                    .zip(&base)
                    .map(|(p, r)| sum(p) - sum(r))
                    .collect(),
            );
        }
    }
    Ok(Judged { judge, scores, kls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_rate_counts_ties_as_half() {
        assert_eq!(
            win_rate(&[1.0, 0.0, 2.0, 5.0], &[0.0, 0.0, 3.0, 1.0]),
            0.625
        );
        assert_eq!(win_rate(&[1.0, 2.0], &[1.0, 2.0]), 0.5);
    }

    #[test]
    fn the_table_aligns_columns_and_marks_missing_metrics() {
        let m = |model: &str, kl: Option<f64>| ModelMetrics {
            model: model.into(),
            score: 1.5,
            win_rate: None,
            kl,
            length: 12.0,
            eos_fraction: 1.0,
            samples: 4,
        };
        let lines = table(&[m("policy", Some(0.25)), m("a-long-name", None)]);
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("model ") && lines[0].contains(" score"),
            "{lines:?}"
        );
        assert!(!lines[0].contains("win_rate"));
        assert!(lines[2].contains(" -  "), "{lines:?}");
        // Numbers are right-aligned, so every line ends in the same column.
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{lines:?}");
    }
}
