//! Reward modelling (the `reward` stage kind): Bradley-Terry training of a scalar-head model on
//! preference pairs, as TRL's `RewardTrainer` does it. Each side of a pair is the sequence
//! `[BOS] + BPE(prompt + response) + [EOS]` (the prompt text is concatenated before tokenising);
//! a batch is `[chosen...; rejected...]`, right-padded; the reward is the score head at each
//! sequence's last non-pad token. Loss per pair: `-logsigmoid(r_c - r_r - margin)`, plus
//! `center_rewards_coefficient * (r_c + r_r)^2` when set; the loop averages it over pairs.
//! Metrics (TRL's names): `accuracy` (strict `r_c > r_r`), `margin` (mean `r_c - r_r`),
//! `mean_reward`, `min_reward`, `max_reward` over both sides.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::RewardParams;

use crate::backend::{AutodiffTask, dispatch_autodiff};
use crate::data::PreferencePair;
use crate::model::{RewardModel, reward_model_from_causal_lm, save_reward_model};
use crate::runner::{self, METRICS_FILE, StageHooks};
use crate::tokenizer::Tokenizer;
use crate::train::{
    Forward, MetricValue, MetricsWriter, Objective, Reduce, TrainConfig, TrainError, TrainReport,
    train,
};

/// A tokenised preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Required reward gap (0 when the data has none).
    pub margin: f64,
}

/// Tokenises pairs: `[BOS] + BPE(prompt + response) + [EOS]`, truncated to `max_length` tokens
/// (keeping the start).
pub fn tokenize(
    tokenizer: &Tokenizer,
    pairs: &[PreferencePair],
    max_length: usize,
) -> Result<Vec<RewardPair>, TrainError> {
    let eos = tokenizer.eos_id().ok_or_else(|| {
        TrainError::Config("the tokenizer has no eos_token, which reward sequences end with".into())
    })?;
    let side = |prompt: &str, response: &str| -> Result<Vec<u32>, TrainError> {
        let mut ids = tokenizer.encode(&format!("{prompt}{response}"), true)?;
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
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
    pub pad_id: u32,
    pub center_rewards_coefficient: Option<f64>,
}

/// Chosen and rejected rewards of a batch of pairs.
///
/// # Shapes
/// - outputs: `[pairs]` each
pub fn pair_rewards<B: burn::tensor::backend::Backend>(
    model: &RewardModel<B>,
    pairs: &[&RewardPair],
    pad_id: u32,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = pairs.len();
    let sides: Vec<&Vec<u32>> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let seq = sides.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(2 * n * seq);
    let mut padding = Vec::with_capacity(2 * n);
    for s in &sides {
        ids.extend(s.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - s.len()));
        padding.push((0..seq).map(|j| u8::from(j < s.len())).collect::<Vec<u8>>());
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2 * n, seq]), device);
    let rewards = model.forward(ids, Some(&padding));
    (rewards.clone().slice(0..n), rewards.slice(n..2 * n))
}

/// Per-pair Bradley-Terry losses `-logsigmoid(r_c - r_r - margin) + coef * (r_c + r_r)^2`.
pub fn bradley_terry<B: burn::tensor::backend::Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    center_coefficient: Option<f64>,
) -> Tensor<B, 1> {
    let mut diff = chosen.clone() - rejected.clone();
    if let Some(m) = margin {
        diff = diff - m;
    }
    let mut loss = log_sigmoid(diff).neg();
    if let Some(coef) = center_coefficient {
        loss = loss + (chosen + rejected).powi_scalar(2).mul_scalar(coef);
    }
    loss
}

impl<B: AutodiffBackend> Objective<B> for RewardObjective
where
    RewardModel<B>: AutodiffModule<B>,
{
    type Model = RewardModel<B>;
    type Example = RewardPair;

    fn length(&self, pair: &RewardPair) -> usize {
        pair.chosen.len().max(pair.rejected.len())
    }

    fn weight(&self, pairs: &[&RewardPair]) -> f64 {
        pairs.len() as f64
    }

    fn forward(
        &self,
        model: &RewardModel<B>,
        pairs: &[&RewardPair],
        device: &B::Device,
    ) -> Result<Forward<B>, TrainError> {
        let n = pairs.len();
        let (rc, rr) = pair_rewards(model, pairs, self.pad_id, device);
        let margin = pairs.iter().any(|p| p.margin != 0.0).then(|| {
            let m: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(m, [n]), device)
        });
        let loss = bradley_terry(
            rc.clone(),
            rr.clone(),
            margin,
            self.center_rewards_coefficient,
        );
        let c: Vec<f32> = rc.inner().into_data().to_vec().expect("rewards are f32");
        let r: Vec<f32> = rr.inner().into_data().to_vec().expect("rewards are f32");
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

/// Runs `reward` stages: builds the reward model (a causal LM's backbone gets a fresh score
/// head from the stage's seed), trains it on the preference pairs, evaluates the held-out
/// fraction (`eval_ratio`, the last pairs of the file), and writes the model directory with
/// `metrics.jsonl`.
pub struct RewardRunner;

impl Runner for RewardRunner {
    fn kind(&self) -> &'static str {
        "reward"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_stage(ctx)?)
    }
}

fn run_stage(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<RewardParams>(ctx)?;
    let (dir, tokenizer) = runner::model_with_tokenizer(ctx)?;
    let rows = runner::data_rows(ctx)?;
    let pairs = tokenize(
        &tokenizer,
        &rows.preference_pairs()?,
        params.max_length as usize,
    )?;
    // At least one pair always trains.
    let n_eval = ((params.eval_ratio * pairs.len() as f64).round() as usize)
        .min(pairs.len().saturating_sub(1));
    let (train_pairs, eval_pairs) = pairs.split_at(pairs.len() - n_eval);
    let task = RewardTask {
        ctx,
        dir: &dir,
        train_pairs,
        eval_pairs,
        objective: RewardObjective {
            pad_id: tokenizer.pad_id().unwrap_or(0),
            center_rewards_coefficient: params.center_rewards_coefficient,
        },
        cfg: runner::train_config(
            params.learning_rate,
            &params.train,
            ctx.seed,
            Some(ctx.work_dir),
        ),
    };
    let (report, eval) = dispatch_autodiff(runner::backend(ctx)?, task)??;
    tokenizer.save(ctx.out_dir)?;
    let mut summary = report.summary();
    summary.insert("pairs".into(), train_pairs.len() as f64);
    summary.extend(eval);
    Ok(StageOutcome { summary })
}

struct RewardTask<'a, 'b> {
    ctx: &'a StageContext<'b>,
    dir: &'a Path,
    train_pairs: &'a [RewardPair],
    eval_pairs: &'a [RewardPair],
    objective: RewardObjective,
    cfg: TrainConfig,
}

type Eval = BTreeMap<String, f64>;

impl AutodiffTask for RewardTask<'_, '_> {
    type Output = Result<(TrainReport, Eval), TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (model_cfg, model) =
            reward_model_from_causal_lm::<B>(self.dir, self.ctx.seed, &device)?;
        let mut writer =
            MetricsWriter::create(&self.ctx.out_dir.join(METRICS_FILE), self.cfg.logging_steps)?
                .report_to(&self.cfg.report_to)?;
        let (model, report) = train(
            &self.objective,
            model,
            self.train_pairs,
            &self.cfg,
            &device,
            Some(&mut writer),
            &mut StageHooks::new(self.ctx),
        )?;
        let mut eval = Eval::new();
        if !self.eval_pairs.is_empty() {
            let inner = model.valid();
            let refs: Vec<&RewardPair> = self.eval_pairs.iter().collect();
            let (c, r) = pair_rewards(&inner, &refs, self.objective.pad_id, &device);
            let margin: Vec<f32> = self.eval_pairs.iter().map(|p| p.margin as f32).collect();
            let margin = Tensor::from_data(TensorData::new(margin, [refs.len()]), &device);
            let loss = bradley_terry(
                c.clone(),
                r.clone(),
                Some(margin),
                self.objective.center_rewards_coefficient,
            );
            let n = refs.len() as f64;
            let loss: f64 = loss.sum().into_scalar().elem::<f64>() / n;
            let c: Vec<f32> = c.into_data().to_vec().expect("rewards are f32");
            let r: Vec<f32> = r.into_data().to_vec().expect("rewards are f32");
            let correct = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
            let gap: f64 = c.iter().zip(&r).map(|(a, b)| f64::from(a - b)).sum();
            eval.insert("eval_loss".into(), loss);
            eval.insert("eval_accuracy".into(), correct / n);
            eval.insert("eval_margin".into(), gap / n);
        }
        save_reward_model(&model, &model_cfg, self.ctx.out_dir)?;
        Ok((report, eval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;

    fn t(v: &[f32]) -> Tensor<TestBackend, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn values(x: Tensor<TestBackend, 1>) -> Vec<f32> {
        x.into_data().to_vec().unwrap()
    }

    #[test]
    fn bradley_terry_by_hand() {
        // r_c - r_r = 0 -> ln 2; = ln 3 -> -ln(3/4) = ln(4/3).
        let loss = values(bradley_terry(
            t(&[1.0, 3f32.ln()]),
            t(&[1.0, 0.0]),
            None,
            None,
        ));
        assert!((loss[0] - 2f32.ln()).abs() < 1e-6);
        assert!((loss[1] - (4f32 / 3.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn margin_and_centering_terms() {
        // diff 1, margin 1 -> ln 2; centring 0.5 * (1 + 0)^2 = 0.5.
        let loss = values(bradley_terry(
            t(&[1.0]),
            t(&[0.0]),
            Some(t(&[1.0])),
            Some(0.5),
        ));
        assert!((loss[0] - (2f32.ln() + 0.5)).abs() < 1e-6, "{loss:?}");
        let sum: f32 = bradley_terry(t(&[1.0]), t(&[0.0]), None, None)
            .sum()
            .into_scalar()
            .elem();
        assert!((sum - (1.0 + (-1f32).exp()).ln()).abs() < 1e-6);
    }
}
