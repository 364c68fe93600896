//! The training loop shared by every training stage: ordering the examples into micro-batches
//! (shuffled per epoch from the seed, or in file order), gradient accumulation, the global-norm
//! gradient clipping of `clip_grad_norm_`, the Hugging Face learning-rate schedules, PyTorch's
//! AdamW, NaN/inf detection, and `metrics.jsonl`. A stage supplies an [`Objective`]: how to turn
//! examples into a summed loss and its metrics. The loop owns nothing stage-specific.
//!
//! Step `k` is measured with the parameters before its update, as TRL logs it:
//!
//! ```text
//! for each update k:  micro-batches -> sum of losses / total weight -> backward (accumulate)
//!                     -> grad_norm (pre-clip) -> clip -> lr(k-1) -> AdamW -> log step k
//! ```

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod hooks;
pub mod lm;
pub mod metrics;
pub mod schedule;

use burn::module::Module;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use burn::tensor::Tensor;

pub use adamw::{AdamW, AdamWConfig};
pub use checkpoint::Checkpointing;
pub use hooks::StageHooks;
pub use lm::{Batch, SftObjective, SftSequence, TokenStats, token_stats};
pub use metrics::{MetricValue, MetricsWriter, Reduce, StepRecord};
pub use schedule::{Schedule, ScheduleKind};

use crate::StageError;
use crate::data::DataError;

/// What can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "step {step}: {quantity} is {value} (not finite); lower the learning rate or clip gradients"
    )]
    NonFinite {
        step: u64,
        quantity: &'static str,
        value: f64,
    },
    #[error("no training examples{0}")]
    NoData(String),
    #[error("{0}")]
    Input(String),
    #[error("invalid training setting: {0}")]
    Config(String),
    #[error("training was interrupted at step {step}")]
    Interrupted { step: u64 },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Data(#[from] DataError),
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The loop's settings (the Hugging Face `TrainingArguments` that matter here).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub batch_size: usize,
    pub epochs: u64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub gradient_accumulation_steps: usize,
    pub adamw: AdamWConfig,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub warmup_ratio: f64,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub shuffle: bool,
    /// Batch examples of similar length together when shuffling.
    pub group_by_length: bool,
    pub seed: u64,
    pub logging_steps: u64,
    /// Integrations that get the logged lines besides `metrics.jsonl`.
    pub report_to: Vec<rudder_schema::kinds::ReportTo>,
    /// Where and how often to save resumable state; `None` trains without checkpoints.
    pub checkpoint: Option<Checkpointing>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            batch_size: 8,
            epochs: 1,
            max_steps: None,
            gradient_accumulation_steps: 1,
            adamw: AdamWConfig::default(),
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 0.0,
            shuffle: false,
            group_by_length: false,
            seed: 0,
            logging_steps: 1,
            report_to: Vec::new(),
            checkpoint: None,
        }
    }
}

/// One micro-batch's contribution: the sum of its per-item losses (divided by the window's total
/// weight by the loop) and its metric sums.
pub struct Forward {
    /// A one-element tensor.
    pub loss_sum: Tensor<1>,
    pub metrics: Vec<MetricValue>,
}

/// A training objective: how a stage turns examples into a loss.
pub trait Objective {
    type Model: Module;
    type Example;

    /// What the loss sum of these examples is divided by (completion tokens for SFT, pairs for
    /// a reward model), known before the forward pass so that accumulated micro-batches give
    /// exactly the loss of one large batch.
    fn weight(&self, examples: &[&Self::Example]) -> f64;

    /// The padded length an example occupies in a batch, for length-grouped batching.
    fn length(&self, _example: &Self::Example) -> usize {
        0
    }

    /// Runs the model over a micro-batch.
    fn forward(
        &self,
        model: &Self::Model,
        examples: &[&Self::Example],
        device: &Device,
    ) -> Result<Forward, TrainError>;

    /// Called after update `step` with the updated model: an objective whose own state follows
    /// the model (TR-DPO's reference) moves it here.
    fn after_update(&self, _model: &Self::Model, _step: u64) {}

    /// Writes the objective's own state into a checkpoint directory.
    fn save_state(&self, _dir: &Path) -> Result<(), TrainError> {
        Ok(())
    }

    /// Restores the state [`Objective::save_state`] wrote, when resuming from `dir`.
    fn load_state(&self, _dir: &Path, _device: &Device) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Observes the loop: progress display and interruption.
pub trait Hooks {
    /// Called once before the first update this run takes (after resuming, if it resumes).
    fn on_start(&mut self) {}
    /// Called after every update with that step's record.
    fn on_step(&mut self, _record: &StepRecord, _total_steps: u64) {}
    /// Checked before every update; `true` stops training with [`TrainError::Interrupted`].
    fn interrupted(&self) -> bool {
        false
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// What training did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    pub steps: Vec<StepRecord>,
}

impl TrainReport {
    /// Summary metrics for a manifest: the last step's loss, grad_norm and stage metrics, and the
    /// number of steps.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if let Some(last) = self.steps.last() {
            out.insert("loss".into(), last.loss);
            out.insert("grad_norm".into(), last.grad_norm);
            out.insert("steps".into(), last.step as f64);
            out.insert("epoch".into(), last.epoch);
            for (k, v) in &last.metrics {
                out.insert(k.clone(), *v);
            }
        }
        out
    }
}

/// The micro-batch plan: which examples each update uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Per update: its micro-batches (example indices) and the epoch position after it.
    pub updates: Vec<(Vec<Vec<usize>>, f64)>,
}

impl Plan {
    /// Orders `n` examples into updates. Each epoch is a permutation (from `seed` and the epoch
    /// number when shuffling), cut into micro-batches of `batch_size` (the last may be smaller)
    /// and windows of `gradient_accumulation_steps` micro-batches (the last window of an epoch
    /// may be shorter), as the Hugging Face Trainer does.
    pub fn new(n: usize, cfg: &TrainConfig) -> Result<Self, TrainError> {
        Self::with_lengths(&vec![0; n], cfg)
    }

    /// Like [`Plan::new`]; with `group_by_length` (and shuffling), each epoch's permutation is cut
    /// into groups of [`LENGTH_GROUP`] micro-batches and every group is ordered longest first, so
    /// a micro-batch holds examples of similar length (the Hugging Face `LengthGroupedSampler`).
    pub fn with_lengths(lengths: &[usize], cfg: &TrainConfig) -> Result<Self, TrainError> {
        let n = lengths.len();
        if n == 0 {
            return Err(TrainError::NoData(String::new()));
        }
        if cfg.batch_size == 0 || cfg.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config(
                "batch_size and gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        let micro = n.div_ceil(cfg.batch_size);
        let per_epoch = micro.div_ceil(cfg.gradient_accumulation_steps) as u64;
        let total = match cfg.max_steps {
            Some(steps) => steps,
            None => cfg.epochs.max(1) * per_epoch,
        };
        let mut updates = Vec::with_capacity(total as usize);
        let mut epoch = 0u64;
        while (updates.len() as u64) < total {
            let mut order = epoch_order(n, cfg.shuffle, cfg.seed, epoch);
            if cfg.shuffle && cfg.group_by_length {
                for group in order.chunks_mut(cfg.batch_size * LENGTH_GROUP) {
                    group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                }
            }
            let batches: Vec<Vec<usize>> = order
                .chunks(cfg.batch_size)
                .map(<[usize]>::to_vec)
                .collect();
            for (i, window) in batches.chunks(cfg.gradient_accumulation_steps).enumerate() {
                if updates.len() as u64 == total {
                    break;
                }
                let position = epoch as f64 + (i + 1) as f64 / per_epoch as f64;
                updates.push((window.to_vec(), position));
            }
            epoch += 1;
        }
        Ok(Self { updates })
    }
}

/// Micro-batches per length-sorted group: the Hugging Face Trainer's mega-batch factor.
pub const LENGTH_GROUP: usize = 50;

/// The example order of one epoch: file order, or a seeded Fisher-Yates permutation.
fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    if shuffle {
        crate::seeds::permutation(n, crate::seeds::stream(seed, epoch))
    } else {
        (0..n).collect()
    }
}

/// Trains `model` on `examples` and returns it with the per-step records. `metrics` receives the
/// logged lines when given.
pub fn train<O>(
    objective: &O,
    mut model: O::Model,
    examples: &[O::Example],
    cfg: &TrainConfig,
    device: &Device,
    mut metrics: Option<&mut MetricsWriter>,
    hooks: &mut dyn Hooks,
) -> Result<(O::Model, TrainReport), TrainError>
where
    O: Objective,
{
    let lengths: Vec<usize> = examples.iter().map(|e| objective.length(e)).collect();
    let plan = Plan::with_lengths(&lengths, cfg)?;
    let total = plan.updates.len() as u64;
    let schedule = Schedule::new(
        cfg.schedule,
        cfg.learning_rate,
        cfg.warmup_steps,
        cfg.warmup_ratio,
        total,
    );
    let mut optim = AdamW::new(cfg.adamw);
    let mut report = TrainReport::default();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    if let Some(ck) = &cfg.checkpoint {
        let (loaded, resumed) = ck.load::<O::Model>(model, examples.len(), total, device)?;
        model = loaded;
        if let Some(resumed) = resumed {
            objective.load_state(&ck.dir, device)?;
            // Resume: the optimiser and the records of the steps already taken.
            optim = AdamW {
                config: cfg.adamw,
                step: resumed.optimizer_step,
                moments: resumed.moments,
            };
            if let Some(last) = resumed.steps.last() {
                for name in &last.cumulative {
                    let total = last.metrics.get(name).copied().unwrap_or(0.0);
                    totals.insert(name.clone(), total);
                }
            }
            if let Some(w) = metrics.as_deref_mut() {
                w.replay(&resumed.steps)?;
            }
            report.steps = resumed.steps;
        }
    }
    let done = report.steps.len();
    hooks.on_start();
    for (k, (window, epoch)) in plan.updates.iter().enumerate().skip(done) {
        let step = k as u64 + 1;
        if hooks.interrupted() {
            if let Some(ck) = &cfg.checkpoint
                && k > 0
            {
                ck.save_with::<O::Model>(
                    &model,
                    &optim,
                    &report.steps,
                    examples.len(),
                    total,
                    |dir| objective.save_state(dir),
                )?;
            }
            return Err(TrainError::Interrupted { step });
        }
        let batches: Vec<Vec<&O::Example>> = window
            .iter()
            .map(|idx| idx.iter().map(|&i| &examples[i]).collect())
            .collect();
        let total_weight: f64 = batches.iter().map(|b| objective.weight(b)).sum();
        if total_weight <= 0.0 {
            return Err(TrainError::NoData(format!(
                " to compute a loss on at step {step} (every sequence was masked out)"
            )));
        }
        let mut accumulator = GradientsAccumulator::<O::Model>::new();
        let mut loss = 0.0;
        let mut sums: BTreeMap<String, (f64, f64, Reduce)> = BTreeMap::new();
        for batch in &batches {
            let out = objective.forward(&model, batch, device)?;
            let scaled = out.loss_sum.div_scalar(total_weight);
            loss += scaled.clone().into_scalar::<f64>();
            let grads = GradientsParams::from_grads(scaled.backward(), &model);
            accumulator.accumulate(&model, grads);
            for m in out.metrics {
                match sums.get_mut(m.name) {
                    None => {
                        sums.insert(m.name.to_string(), (m.sum, m.count, m.reduce));
                    }
                    Some(e) => match m.reduce {
                        Reduce::Min => e.0 = e.0.min(m.sum),
                        Reduce::Max => e.0 = e.0.max(m.sum),
                        Reduce::Mean | Reduce::Cumulative => {
                            e.0 += m.sum;
                            e.1 += m.count;
                        }
                    },
                }
            }
        }
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                quantity: "loss",
                value: loss,
            });
        }
        let grads = accumulator.grads();
        let grad_norm = adamw::global_grad_norm(&model, &grads);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                quantity: "grad_norm",
                value: grad_norm,
            });
        }
        let lr = schedule.lr(k as u64);
        let coef = adamw::clip_coefficient(grad_norm, cfg.max_grad_norm);
        model = optim.step(model, grads, lr, coef);
        objective.after_update(&model, step);

        let mut record = StepRecord {
            step,
            epoch: *epoch,
            loss,
            learning_rate: lr,
            grad_norm,
            metrics: BTreeMap::new(),
            cumulative: Vec::new(),
        };
        for (name, (sum, count, reduce)) in sums {
            let value = match reduce {
                Reduce::Mean if count > 0.0 => sum / count,
                Reduce::Mean => f64::NAN,
                Reduce::Min | Reduce::Max => sum,
                Reduce::Cumulative => {
                    let t = totals.entry(name.clone()).or_insert(0.0);
                    *t += sum;
                    record.cumulative.push(name.clone());
                    *t
                }
            };
            record.metrics.insert(name, value);
        }
        if let Some(w) = metrics.as_deref_mut() {
            w.record(&record, step == total)?;
        }
        hooks.on_step(&record, total);
        report.steps.push(record);
        if let Some(ck) = &cfg.checkpoint
            && ck.every > 0
            && step.is_multiple_of(ck.every)
            && step < total
        {
            ck.save_with::<O::Model>(
                &model,
                &optim,
                &report.steps,
                examples.len(),
                total,
                |dir| objective.save_state(dir),
            )?;
        }
    }
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bs: usize, accum: usize, epochs: u64, max_steps: Option<u64>) -> TrainConfig {
        TrainConfig {
            batch_size: bs,
            gradient_accumulation_steps: accum,
            epochs,
            max_steps,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn plan_cuts_epochs_into_windows() {
        let plan = Plan::new(5, &cfg(2, 2, 2, None)).unwrap();
        // 3 micro-batches per epoch -> windows [[0,1],[2,3]] and [[4]]; two epochs.
        assert_eq!(plan.updates.len(), 4);
        assert_eq!(plan.updates[0].0, vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(plan.updates[1].0, vec![vec![4]]);
        assert_eq!(plan.updates[1].1, 1.0);
        assert_eq!(plan.updates[3].1, 2.0);
    }

    #[test]
    fn length_grouping_sorts_each_group_and_keeps_every_example() {
        let lengths: Vec<usize> = (0..300).map(|i| (i * 37) % 101).collect();
        let grouped = TrainConfig {
            batch_size: 2,
            shuffle: true,
            group_by_length: true,
            seed: 3,
            ..TrainConfig::default()
        };
        let plan = Plan::with_lengths(&lengths, &grouped).unwrap();
        let order: Vec<usize> = plan
            .updates
            .iter()
            .flat_map(|(w, _)| w.iter().flatten().copied())
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..300).collect::<Vec<_>>());
        // 100 examples per group of 50 micro-batches, longest first.
        for group in order.chunks(2 * LENGTH_GROUP) {
            assert!(group.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        // Padding: sum over micro-batches of (longest * size - total), far below the ungrouped.
        let waste = |plan: &Plan| -> usize {
            plan.updates
                .iter()
                .flat_map(|(w, _)| w.iter())
                .map(|b| {
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let ungrouped = Plan::with_lengths(
            &lengths,
            &TrainConfig {
                group_by_length: false,
                ..grouped.clone()
            },
        )
        .unwrap();
        assert!(waste(&plan) * 10 < waste(&ungrouped));
        // Without shuffling the file order is kept.
        let kept = Plan::with_lengths(
            &lengths,
            &TrainConfig {
                shuffle: false,
                ..grouped
            },
        )
        .unwrap();
        assert_eq!(kept.updates[0].0, vec![vec![0, 1]]);
    }

    #[test]
    fn max_steps_overrides_epochs() {
        let plan = Plan::new(4, &cfg(4, 1, 3, Some(5))).unwrap();
        assert_eq!(plan.updates.len(), 5);
        assert!(
            plan.updates
                .iter()
                .all(|(w, _)| w == &vec![vec![0, 1, 2, 3]])
        );
    }

    #[test]
    fn shuffling_is_seeded_and_changes_per_epoch() {
        let mut c = cfg(10, 1, 2, None);
        c.shuffle = true;
        c.seed = 7;
        let a = Plan::new(10, &c).unwrap();
        let b = Plan::new(10, &c).unwrap();
        assert_eq!(a, b);
        let (e0, e1) = (&a.updates[0].0[0], &a.updates[1].0[0]);
        assert_ne!(e0, e1);
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, &sorted);
    }

    #[test]
    fn empty_data_and_zero_batch_are_errors() {
        assert!(matches!(
            Plan::new(0, &cfg(1, 1, 1, None)),
            Err(TrainError::NoData(_))
        ));
        assert!(matches!(
            Plan::new(3, &cfg(0, 1, 1, None)),
            Err(TrainError::Config(_))
        ));
    }
}
