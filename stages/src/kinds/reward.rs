//! Reward modelling (the `reward` stage kind): Bradley-Terry training of a scalar-head model on
//! preference pairs, as TRL's `RewardTrainer` does it. Each side of a pair is the sequence
//! `[BOS] + BPE(prompt + response) + [EOS]` (the prompt text is concatenated before tokenising);
//! a batch is `[chosen...; rejected...]`, right-padded; the reward is the score head at each
//! sequence's last non-pad token. Loss per pair: `-logsigmoid(r_c - r_r - margin)`, plus
//! `center_rewards_coefficient * (r_c + r_r)^2` when set; the loop averages it over pairs.
//! Metrics (TRL's names): `accuracy` (strict `r_c > r_r`), `margin` (mean `r_c - r_r`),
//! `mean_reward`, `min_reward`, `max_reward` over both sides.
//!
//! With `lora`, the stage continues an incoming adapter (a LoRA reward model's, with its
//! `score`, or a LoRA language model's, under a fresh `score`) on the base it was trained on;
//! `score` is always trained in full, as PEFT's `SEQ_CLS` task does.

use burn::module::Module;
use std::collections::BTreeMap;

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{LoraArgs, RewardParams};

use crate::artifacts::save_trained_scorer;
use crate::data::{PreferencePair, Turns};
use crate::kind::{Stage, StageKind};
use crate::losses::bradley_terry;
use crate::model::{RewardModel, lora, reward_model_from_causal_lm};
use crate::padding::Pad;
use crate::tokenizer::Tokenizer;
use crate::train::{Forward, MetricValue, Objective, Reduce, TrainError};

pub struct Reward;

impl StageKind for Reward {
    type Params = RewardParams;
    const VERSION: u32 = 5;

    /// Builds the reward model (a causal LM's backbone gets a fresh score head from the
    /// stage's seed), trains it on the preference pairs, evaluates the held-out fraction
    /// (`eval_ratio`, the last pairs of the file), and writes the model directory.
    fn run(stage: &Stage<'_, RewardParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let model = stage.inputs.model("model")?;
        let rows = stage.inputs.rows("data")?;
        let pairs = tokenize(
            &model.tokenizer,
            &rows.preference_pairs()?,
            p.max_length as usize,
        )?;
        // At least one pair always trains.
        let n_eval = ((p.eval_ratio * pairs.len() as f64).round() as usize)
            .min(pairs.len().saturating_sub(1));
        let (train_pairs, eval_pairs) = pairs.split_at(pairs.len() - n_eval);
        let objective = RewardObjective {
            pad: stage.pad(model.tokenizer.pad_id().unwrap_or(0)),
            center_rewards_coefficient: p.center_rewards_coefficient,
        };
        let cfg = stage.train_config(p.learning_rate, &p.train);
        // PEFT trains the head of a sequence classifier in full (`task_type = "SEQ_CLS"` adds
        // `score` to `modules_to_save`): a fresh head left frozen would score at random.
        let lora = p.train.lora.as_ref().map(LoraArgs::for_reward_model);
        let (config, weights) = match (&lora, stage.continued()) {
            (Some(wanted), Some(continued)) => {
                // The incoming adapter on the base it was trained on, as a sequence classifier:
                // a reward model's adapter brings its trained `score`; a language model's
                // leaves the head fresh from the stage's seed, as for any language model.
                let (config, base) =
                    reward_model_from_causal_lm(&continued.base, stage.seed(), device)?;
                let (model, incoming) = lora::load_adapter(base, &continued.adapter)?;
                if let Some((setting, ours, theirs)) =
                    wanted.differs_from(&incoming.for_reward_model())
                {
                    return Err(TrainError::Input(format!(
                        "the stage continues the LoRA adapter in {}, whose `{setting}` is {theirs}, but its `lora` has {ours}; make them agree, or set `merge_adapter = true` to train a fresh adapter on the merged model",
                        continued.adapter.display()
                    )));
                }
                let model = lora::with_dropout(model, wanted.dropout);
                (
                    config,
                    lora::unfreeze_modules(model, &wanted.modules_to_save)?,
                )
            }
            _ => {
                let (config, weights) =
                    reward_model_from_causal_lm(&model.dir, stage.seed(), device)?;
                let weights = match &lora {
                    Some(lora) => lora::attach(weights, lora, stage.seed())?,
                    None => weights,
                };
                (config, weights)
            }
        };
        let (trained, report) = stage.fit(&objective, weights, train_pairs, &cfg, device)?;
        let eval = evaluate(&trained.valid(), &objective, eval_pairs, device);
        save_trained_scorer(
            stage.out_dir(),
            &trained,
            &config.saved_as(p.train.save_dtype),
            &model.tokenizer,
            lora.as_ref(),
        )?;
        let mut summary = report.summary();
        summary.insert("pairs".into(), train_pairs.len() as f64);
        summary.extend(eval);
        Ok(StageOutcome { summary })
    }
}

/// A tokenised preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Required reward gap (0 when the data has none).
    pub margin: f64,
}

/// Tokenises pairs: `[BOS] + BPE(prompt + response) + [EOS]`, or the whole rendered
/// conversation, truncated to `max_length` tokens (keeping the start).
pub fn tokenize(
    tokenizer: &Tokenizer,
    pairs: &[PreferencePair],
    max_length: usize,
) -> Result<Vec<RewardPair>, TrainError> {
    let side = |prompt: &Turns, response: &Turns| -> Result<Vec<u32>, TrainError> {
        let mut ids = tokenizer.whole_ids(prompt, response)?;
        ids.truncate(max_length);
        Ok(ids)
    };
    pairs
        .iter()
        .map(|p| {
            Ok(RewardPair {
                chosen: side(&p.prompt, &p.chosen)?,
                rejected: side(&p.prompt, &p.rejected)?,
                margin: p.margin.unwrap_or(0.0),
            })
        })
        .collect()
}

/// The Bradley-Terry objective.
pub struct RewardObjective {
    pub pad: Pad,
    pub center_rewards_coefficient: Option<f64>,
}

/// Chosen and rejected rewards of a batch of pairs.
///
/// # Shapes
/// - outputs: `[pairs]` each
pub fn pair_rewards(
    model: &RewardModel,
    pairs: &[&RewardPair],
    pad: Pad,
) -> (Tensor<1>, Tensor<1>) {
    let device = &model.device();
    let n = pairs.len();
    let sides: Vec<&Vec<u32>> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let seq = pad.length(sides.iter().map(|s| s.len()).max().unwrap_or(1), 1);
    let pad_id = pad.id;
    let mut ids = Vec::with_capacity(2 * n * seq);
    let mut padding = Vec::with_capacity(2 * n);
    for s in &sides {
        ids.extend(s.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - s.len()));
        padding.push((0..seq).map(|j| u8::from(j < s.len())).collect::<Vec<u8>>());
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2 * n, seq]), device);
    let rewards = model.forward(ids, Some(&padding));
    (rewards.clone().slice(0..n), rewards.slice(n..2 * n))
}

impl Objective for RewardObjective {
    type Model = RewardModel;
    type Example = RewardPair;

    fn length(&self, pair: &RewardPair) -> usize {
        pair.chosen.len().max(pair.rejected.len())
    }

    fn weight(&self, pairs: &[&RewardPair]) -> f64 {
        pairs.len() as f64
    }

    fn forward(
        &self,
        model: &RewardModel,
        pairs: &[&RewardPair],
        device: &Device,
    ) -> Result<Forward, TrainError> {
        let n = pairs.len();
        let (rc, rr) = pair_rewards(model, pairs, self.pad);
        let margin = pairs.iter().any(|p| p.margin != 0.0).then(|| {
            let m: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
            Tensor::<1>::from_data(TensorData::new(m, [n]), device)
        });
        let loss = bradley_terry(
            rc.clone(),
            rr.clone(),
            margin,
            self.center_rewards_coefficient,
        );
        let c: Vec<f32> = rc
            .inner()
            .into_data()
            .try_to_vec::<f32>()
            .expect("rewards are f32");
        let r: Vec<f32> = rr
            .inner()
            .into_data()
            .try_to_vec::<f32>()
            .expect("rewards are f32");
        let correct = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
        let gap: f64 = c.iter().zip(&r).map(|(a, b)| f64::from(a - b)).sum();
        let all = c.iter().chain(&r).map(|&x| f64::from(x));
        let total: f64 = all.clone().sum();
        let min = all.clone().fold(f64::INFINITY, f64::min);
        let max = all.fold(f64::NEG_INFINITY, f64::max);
        Ok(Forward {
            loss_sum: loss.sum(),
            metrics: vec![
                MetricValue::mean("accuracy", correct, n as f64),
                MetricValue::mean("margin", gap, n as f64),
                MetricValue::mean("mean_reward", total, 2.0 * n as f64),
                MetricValue::extreme("min_reward", min, Reduce::Min),
                MetricValue::extreme("max_reward", max, Reduce::Max),
            ],
        })
    }
}

/// The held-out pairs' loss, accuracy and margin (`eval_*`); empty without held-out pairs.
fn evaluate(
    model: &RewardModel,
    objective: &RewardObjective,
    eval_pairs: &[RewardPair],
    device: &Device,
) -> BTreeMap<String, f64> {
    let mut eval = BTreeMap::new();
    if eval_pairs.is_empty() {
        return eval;
    }
    let refs: Vec<&RewardPair> = eval_pairs.iter().collect();
    let (c, r) = pair_rewards(model, &refs, objective.pad);
    let margin: Vec<f32> = eval_pairs.iter().map(|p| p.margin as f32).collect();
    let margin = Tensor::from_data(TensorData::new(margin, [refs.len()]), device);
    let loss = bradley_terry(
        c.clone(),
        r.clone(),
        Some(margin),
        objective.center_rewards_coefficient,
    );
    let n = refs.len() as f64;
    let loss: f64 = loss.sum().into_scalar::<f64>() / n;
    let c: Vec<f32> = c.into_data().try_to_vec::<f32>().expect("rewards are f32");
    let r: Vec<f32> = r.into_data().try_to_vec::<f32>().expect("rewards are f32");
    let correct = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
    let gap: f64 = c.iter().zip(&r).map(|(a, b)| f64::from(a - b)).sum();
    eval.insert("eval_loss".into(), loss);
    eval.insert("eval_accuracy".into(), correct / n);
    eval.insert("eval_margin".into(), gap / n);
    eval
}
