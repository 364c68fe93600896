//! Training metrics: what one step measured, and the `metrics.jsonl` writer that logs every
//! `logging_steps` steps one JSON object with `step`, `loss`, `learning_rate`, `grad_norm`,
//! `epoch` and the stage's own metrics under TRL's names. As the Hugging Face Trainer does, the
//! logged `loss` and stage means are averages over the steps since the previous log line, while
//! `grad_norm` and `learning_rate` are those of the logged step. With `report_to =
//! ["tensorboard"]` each line also goes to a TensorBoard event file beside it, as `train/NAME`
//! scalars at the line's step (the Hugging Face Trainer's tags).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rudder_engine::tfevents::EventWriter;
use rudder_schema::kinds::ReportTo;
use serde_json::{Map, Value};

use super::TrainError;

/// How a metric combines across micro-batches and steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// `sum / count` within a step; averaged over the steps of a logging interval.
    Mean,
    /// A running total since the start of training (TRL's `num_tokens`).
    Cumulative,
    /// The smallest value of the step's micro-batches; averaged over a logging interval.
    Min,
    /// The largest value of the step's micro-batches; averaged over a logging interval.
    Max,
}

/// One metric of one micro-batch: a sum and what it is divided by.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    pub name: &'static str,
    pub sum: f64,
    pub count: f64,
    pub reduce: Reduce,
}

impl MetricValue {
    pub fn mean(name: &'static str, sum: f64, count: f64) -> Self {
        Self {
            name,
            sum,
            count,
            reduce: Reduce::Mean,
        }
    }

    pub fn extreme(name: &'static str, value: f64, reduce: Reduce) -> Self {
        Self {
            name,
            sum: value,
            count: 1.0,
            reduce,
        }
    }

    pub fn cumulative(name: &'static str, amount: f64) -> Self {
        Self {
            name,
            sum: amount,
            count: 1.0,
            reduce: Reduce::Cumulative,
        }
    }
}

/// Everything measured at one optimiser step, with the parameters before its update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// 1-based.
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    /// The rate this step's update used.
    pub learning_rate: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// Stage metrics: means for this step, running totals for cumulative ones.
    pub metrics: BTreeMap<String, f64>,
    /// Which of `metrics` are running totals.
    pub cumulative: Vec<String>,
}

/// Appends logged steps to `metrics.jsonl`.
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    every: u64,
    pending: Vec<StepRecord>,
    tensorboard: Option<EventWriter>,
}

impl MetricsWriter {
    /// Creates (truncates) `path`; a line is written every `every` steps and at the last step.
    pub fn create(path: &Path, every: u64) -> Result<Self, TrainError> {
        let file = File::create(path).map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            every: every.max(1),
            pending: Vec::new(),
            tensorboard: None,
        })
    }

    /// Also writes every line to the integrations of `report_to`, beside `metrics.jsonl`.
    pub fn report_to(mut self, targets: &[ReportTo]) -> Result<Self, TrainError> {
        if targets.contains(&ReportTo::Tensorboard) {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            self.tensorboard = Some(EventWriter::create(dir).map_err(|e| TrainError::io(dir, e))?);
        }
        Ok(self)
    }

    /// Rewrites the lines of steps already taken (when resuming), exactly as they were.
    pub fn replay(&mut self, steps: &[StepRecord]) -> Result<(), TrainError> {
        for step in steps {
            self.record(step, false)?;
        }
        Ok(())
    }

    /// Records a step; writes a line when the step is due (or `last`).
    pub fn record(&mut self, step: &StepRecord, last: bool) -> Result<(), TrainError> {
        self.pending.push(step.clone());
        if step.step.is_multiple_of(self.every) || last {
            let line = Self::line(&self.pending);
            self.pending.clear();
            writeln!(self.out, "{line}")
                .and_then(|_| self.out.flush())
                .map_err(|e| TrainError::io(&self.path, e))?;
            if let Some(events) = &mut self.tensorboard {
                let tags: Vec<(String, f64)> = line
                    .as_object()
                    .expect("a log line is an object")
                    .iter()
                    .filter(|(name, _)| *name != "step")
                    .filter_map(|(name, v)| Some((format!("train/{name}"), v.as_f64()?)))
                    .collect();
                events
                    .scalars(step.step, tags.iter().map(|(t, v)| (t.as_str(), *v)))
                    .map_err(|e| TrainError::io(events.path(), e))?;
            }
        }
        Ok(())
    }

    /// The JSON object for the steps since the previous line (non-empty).
    pub fn line(steps: &[StepRecord]) -> Value {
        let last = steps.last().expect("a log line covers at least one step");
        let n = steps.len() as f64;
        let mut obj = Map::new();
        obj.insert("step".into(), last.step.into());
        obj.insert("epoch".into(), number(last.epoch));
        obj.insert(
            "loss".into(),
            number(steps.iter().map(|s| s.loss).sum::<f64>() / n),
        );
        obj.insert("learning_rate".into(), number(last.learning_rate));
        obj.insert("grad_norm".into(), number(last.grad_norm));
        for (name, value) in &last.metrics {
            let value = if last.cumulative.contains(name) {
                *value
            } else {
                steps
                    .iter()
                    .filter_map(|s| s.metrics.get(name))
                    .sum::<f64>()
                    / n
            };
            obj.insert(name.clone(), number(value));
        }
        Value::Object(obj)
    }
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(k: u64, loss: f64, acc: f64, tokens: f64) -> StepRecord {
        StepRecord {
            step: k,
            epoch: k as f64 / 4.0,
            loss,
            learning_rate: 0.1 * k as f64,
            grad_norm: 10.0 * k as f64,
            metrics: BTreeMap::from([
                ("mean_token_accuracy".to_string(), acc),
                ("num_tokens".to_string(), tokens),
            ]),
            cumulative: vec!["num_tokens".to_string()],
        }
    }

    #[test]
    fn lines_average_the_interval_and_keep_totals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path, 2).unwrap();
        w.record(&step(1, 1.0, 0.2, 10.0), false).unwrap();
        w.record(&step(2, 3.0, 0.4, 20.0), false).unwrap();
        w.record(&step(3, 5.0, 0.6, 30.0), true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 2);
        assert_eq!(lines[0]["loss"], 2.0);
        assert!((lines[0]["mean_token_accuracy"].as_f64().unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(lines[0]["num_tokens"], 20.0);
        assert!((lines[0]["grad_norm"].as_f64().unwrap() - 20.0).abs() < 1e-12);
        assert_eq!(lines[1]["step"], 3);
        assert_eq!(lines[1]["loss"], 5.0);
        assert_eq!(lines[1]["num_tokens"], 30.0);
    }

    #[test]
    fn tensorboard_gets_every_logged_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path, 2)
            .unwrap()
            .report_to(&[ReportTo::Tensorboard])
            .unwrap();
        w.record(&step(1, 1.0, 0.2, 10.0), false).unwrap();
        w.record(&step(2, 3.0, 0.4, 20.0), false).unwrap();
        w.record(&step(3, 5.0, 0.6, 30.0), true).unwrap();
        let events_file = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("tfevents"))
            .expect("an event file beside metrics.jsonl");
        let events = rudder_engine::tfevents::read(&events_file).unwrap();
        // The file-version record, then one event per metrics.jsonl line.
        assert_eq!(events.len(), 3);
        let scalars = |i: usize| match &events[i].what {
            Some(rudder_engine::tfevents::What::Summary(s)) => s
                .value
                .iter()
                .map(|v| (v.tag.clone(), v.simple_value().expect("a scalar")))
                .collect::<BTreeMap<_, _>>(),
            other => panic!("a summary, not {other:?}"),
        };
        assert_eq!(events[1].step, 2);
        assert_eq!(scalars(1)["train/loss"], 2.0);
        assert_eq!(scalars(1)["train/num_tokens"], 20.0);
        assert!(!scalars(1).contains_key("train/step"));
        assert_eq!(events[2].step, 3);
        assert_eq!(scalars(2)["train/grad_norm"], 30.0);
    }
}
