//! `rudder bench`: times one kind's real training step on a user's model and machine. The step
//! is the one a stage runs (the kind's objective through [`crate::train::train`]: forward,
//! backward, global gradient norm, AdamW), on one synthetic batch repeated every step, so the
//! numbers depend on the model, the shapes and the hardware only. The preference kinds take
//! their reference log-probs from the cache as their stages do: they are computed once, before
//! the timed steps, by the frozen starting model.
//!
//! `ppo-rollout` times one PPO rollout as the stage makes it (sampling with the KV cache, the
//! reward model's score, the policy's and the reference's log-probs, the value model's values,
//! GAE), `ppo-update` one minibatch update of the policy and the value model over a prepared
//! rollout, and `generate` greedy decoding with the KV cache (every row generates exactly
//! `new_tokens`: no stop token).
//!
//! This module owns the benchmark's inputs and its report; the CLI parses and prints.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rudder_schema::kinds::{DpoParams, KtoParams, OrpoParams, PpoParams, SimpoParams};
use rudder_schema::{Backend, Precision};
use serde::Serialize;

use crate::StageError;
use crate::generate::{GenerateOptions, generate_ids};
use crate::kinds::kto::{KtoExample, KtoObjective};
use crate::kinds::ppo::{Ppo, PpoBatch};
use crate::kinds::reward::{RewardObjective, RewardPair};
use crate::logps::{CompletionBatch, PromptCompletion, sequence_logps};
use crate::losses::{CpoLossConfig, DpoLossConfig, KtoLossConfig};
use crate::model::{CausalLm, ModelConfig, RewardModel, load_causal_lm, random_causal_lm};
use crate::padding::Pad;
use crate::preference::{DpoExample, DpoObjective, TokenizedPair, UnpairedRow};
use crate::preference::{ReferenceFreeLoss, ReferenceFreeObjective};
use crate::rl::{LoopSettings, Samples, Trainees, update};
use crate::train::adamw::AdamWConfig;
use crate::train::{Hooks, Objective, StepRecord, TrainConfig, train};
use crate::train::{SftObjective, SftSequence};

/// The kinds whose step `rudder bench` times.
pub const KINDS: [&str; 9] = [
    "sft",
    "reward",
    "dpo",
    "kto",
    "orpo",
    "simpo",
    "ppo-rollout",
    "ppo-update",
    "generate",
];

/// The named fresh configurations `--model fresh:NAME` accepts.
pub const FRESH: [&str; 2] = ["bench4m", "smollm2-135m"];

/// Steps run before timing starts (the first steps allocate and warm caches).
pub const WARMUP_STEPS: usize = 2;

/// Where the benchmarked model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchModel {
    /// A Hugging Face model directory (config.json + safetensors).
    Dir(PathBuf),
    /// A named configuration with seeded random weights.
    Fresh(String),
}

impl BenchModel {
    /// `fresh:NAME` or a directory.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix("fresh:") {
            Some(name) if FRESH.contains(&name) => Ok(Self::Fresh(name.to_string())),
            Some(name) => Err(format!(
                "no fresh configuration `{name}`; known: {}",
                FRESH.map(|f| format!("fresh:{f}")).join(", ")
            )),
            None => Ok(Self::Dir(PathBuf::from(s))),
        }
    }

    fn config(&self) -> Result<ModelConfig, StageError> {
        match self {
            Self::Dir(dir) => crate::model::load_config(dir),
            Self::Fresh(name) => Ok(fresh_config(name)),
        }
    }
}

/// The configuration behind `fresh:NAME`.
pub fn fresh_config(name: &str) -> ModelConfig {
    match name {
        // SmolLM2-135M's config.json: 30 layers, hidden 576, 9 heads over 3 KV heads, tied
        // embeddings over a 49,152-token vocabulary.
        "smollm2-135m" => {
            let mut cfg = ModelConfig::llama(49152, 576, 1536, 30, 9, 3);
            cfg.tie_word_embeddings = true;
            cfg.rope_theta = 100000.0;
            cfg.rms_norm_eps = 1e-5;
            cfg.initializer_range = 0.041666666666666664;
            cfg.max_position_embeddings = 8192;
            cfg
        }
        // The reference 4M-parameter Llama of the `stages` benchmark.
        _ => ModelConfig::llama(2048, 256, 704, 4, 8, 4),
    }
}

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub kind: String,
    pub model: BenchModel,
    /// Sequences (sft, kto, ppo, generate) or pairs (reward, dpo, orpo, simpo) per step.
    pub batch: usize,
    /// Tokens per sequence: prompt and completion (half each for the preference and PPO
    /// kinds); the prompt alone for `generate`.
    pub seq: usize,
    /// Tokens `generate` adds to each prompt.
    pub new_tokens: usize,
    /// Timed steps (after [`WARMUP_STEPS`]).
    pub steps: usize,
    pub backend: Backend,
    pub precision: Precision,
}

/// The measurement; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub kind: String,
    pub backend: String,
    pub precision: String,
    /// Tokens through the trained model per second (every row of every step, padding none);
    /// for `generate`, generated tokens per second.
    pub tokens_per_second: f64,
    /// Mean seconds per timed step.
    pub step_seconds: f64,
    /// The first step's time beyond a timed step's: on GPU backends mostly kernel compilation
    /// and autotuning (CubeCL's, for each new shape); on `cpu` only the first step's
    /// allocations. Not part of `step_seconds`.
    pub warmup_seconds: f64,
    /// This process's peak resident memory (VmHWM), model loading included.
    pub peak_rss_mib: f64,
    /// Parameters of the trained model.
    pub params: usize,
}

/// Why a benchmark did not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The request itself is wrong (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("the benchmarked step failed: {0}")]
    Train(#[from] crate::train::TrainError),
}

/// Records when each step ends (its values have been read back, so its work is done).
struct Clock(Vec<Instant>);

impl Hooks for Clock {
    fn on_step(&mut self, _: &StepRecord, _: u64) {
        self.0.push(Instant::now());
    }
}

/// Trains `examples` as one batch, the same every step, for `warmup` + `steps` steps at
/// `learning_rate`; returns the durations of the `steps` timed ones (`cargo bench` times the
/// same way).
pub fn step_durations<O: Objective>(
    objective: &O,
    model: O::Model,
    examples: &[O::Example],
    learning_rate: f64,
    (warmup, steps): (usize, usize),
    device: &Device,
) -> Result<Vec<f64>, crate::train::TrainError> {
    let cfg = TrainConfig {
        learning_rate,
        batch_size: examples.len(),
        max_steps: Some((warmup + steps) as u64),
        ..TrainConfig::default()
    };
    let mut clock = Clock(vec![Instant::now()]);
    train(objective, model, examples, &cfg, device, None, &mut clock)?;
    Ok(clock
        .0
        .windows(2)
        .skip(warmup)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect())
}

/// A benchmark's steady step time and its first step's extra time.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The mean of the steps after [`WARMUP_STEPS`].
    step_seconds: f64,
    /// The first step's duration less `step_seconds`, at least 0.
    warmup_seconds: f64,
}

impl Timing {
    /// From the durations of every step, warm-up ones included.
    fn of(durations: &[f64]) -> Self {
        let timed = &durations[WARMUP_STEPS.min(durations.len())..];
        let step_seconds = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
        Self {
            step_seconds,
            // A first step faster than the mean (noise on `cpu`) has no extra time.
            warmup_seconds: durations
                .first()
                .map_or(0.0, |first| (first - step_seconds).max(0.0)),
        }
    }
}

/// [`Timing`] of [`step_durations`]: [`WARMUP_STEPS`] steps, then `steps` timed ones.
fn time_steps<O: Objective>(
    objective: &O,
    model: O::Model,
    examples: &[O::Example],
    steps: usize,
    device: &Device,
) -> Result<Timing, BenchError> {
    let durations = step_durations(
        objective,
        model,
        examples,
        1e-5,
        (0, WARMUP_STEPS + steps),
        device,
    )?;
    Ok(Timing::of(&durations))
}

fn ids(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    // Token 0 is the padding id of the benchmark; real tokens avoid it.
    (0..n)
        .map(|_| 1 + rng.next_u32() % (vocab as u32 - 1).max(1))
        .collect()
}

/// Pairs of one shared prompt (half the sequence) and two completions.
fn pairs(rng: &mut ChaCha8Rng, n: usize, seq: usize, vocab: usize) -> Vec<TokenizedPair> {
    let prompt_len = seq / 2;
    (0..n)
        .map(|row| {
            let prompt = ids(rng, prompt_len, vocab);
            let mut side = || PromptCompletion {
                prompt: prompt.clone(),
                completion: ids(rng, seq - prompt_len, vocab),
            };
            let chosen = side();
            let rejected = side();
            TokenizedPair {
                row,
                chosen,
                rejected,
            }
        })
        .collect()
}

fn load_lm(model: &BenchModel, cfg: &ModelConfig, device: &Device) -> Result<CausalLm, StageError> {
    match model {
        BenchModel::Dir(dir) => Ok(load_causal_lm(dir, device)?.1),
        BenchModel::Fresh(_) => Ok(random_causal_lm(cfg, 0, device)),
    }
}

/// The reference's summed completion log-prob of each row, by the frozen starting model.
fn reference_sums(
    model: &BenchModel,
    cfg: &ModelConfig,
    rows: &[&PromptCompletion],
    device: &Device,
) -> Result<Vec<f32>, StageError> {
    let reference = load_lm(model, cfg, &device.clone().inner())?;
    Ok(sequence_logps(&reference, rows, Pad::exact(0), rows.len())
        .into_iter()
        .map(|row| row.iter().sum())
        .collect())
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    if !KINDS.contains(&opts.kind.as_str()) {
        return Err(BenchError::Usage(format!(
            "`rudder bench` times {}; not `{}`",
            KINDS.join(", "),
            opts.kind
        )));
    }
    if opts.batch == 0 || opts.seq < 2 || opts.steps == 0 || opts.new_tokens == 0 {
        return Err(BenchError::Usage(
            "--batch, --steps and --new-tokens must be at least 1 and --seq at least 2".into(),
        ));
    }
    let device = crate::backend::training_device(opts.backend)?;
    crate::precision::check_supported(opts.precision, opts.backend, &device)?;
    // Every model below computes in the precision asked for.
    crate::precision::scoped(opts.precision, || time_kind(opts, &device))
}

/// [`run`] on `device`, its options checked.
fn time_kind(opts: &BenchOptions, device: &Device) -> Result<BenchReport, BenchError> {
    let device = device.clone();
    let cfg = opts.model.config()?;
    let vocab = cfg.vocab_size;
    let (batch, seq) = (opts.batch, opts.seq);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (timing, tokens, params) = match opts.kind.as_str() {
        "sft" => {
            let examples: Vec<SftSequence> = (0..batch)
                .map(|_| SftSequence {
                    input_ids: ids(&mut rng, seq, vocab),
                    target: vec![true; seq],
                    segments: None,
                })
                .collect();
            let model = load_lm(&opts.model, &cfg, &device)?;
            let params = model.num_params();
            let objective = SftObjective { pad: Pad::exact(0) };
            let secs = time_steps(&objective, model, &examples, opts.steps, &device)?;
            (secs, batch * seq, params)
        }
        "reward" => {
            let examples: Vec<RewardPair> = (0..batch)
                .map(|_| RewardPair {
                    chosen: ids(&mut rng, seq, vocab),
                    rejected: ids(&mut rng, seq, vocab),
                    margin: 0.0,
                })
                .collect();
            let model = match &opts.model {
                BenchModel::Dir(dir) => {
                    crate::model::reward_model_from_causal_lm(dir, 0, &device)?.1
                }
                BenchModel::Fresh(_) => crate::model::random_reward_model(&cfg, 0, &device),
            };
            let params = model.num_params();
            let objective = RewardObjective {
                pad: Pad::exact(0),
                center_rewards_coefficient: None,
            };
            let secs = time_steps(&objective, model, &examples, opts.steps, &device)?;
            (secs, 2 * batch * seq, params)
        }
        "dpo" => {
            let pairs = pairs(&mut rng, batch, seq, vocab);
            let rows: Vec<&PromptCompletion> = pairs
                .iter()
                .map(|p| &p.chosen)
                .chain(pairs.iter().map(|p| &p.rejected))
                .collect();
            let reference = load_lm(&opts.model, &cfg, &device.clone().inner())?;
            let mut chosen = sequence_logps(&reference, &rows, Pad::exact(0), rows.len());
            drop(reference);
            let rejected = chosen.split_off(batch);
            let examples: Vec<DpoExample> = pairs
                .into_iter()
                .zip(chosen.into_iter().zip(rejected))
                .map(|(pair, (c, r))| DpoExample {
                    pair,
                    reference_chosen: c,
                    reference_rejected: r,
                })
                .collect();
            let p = DpoParams::default();
            let objective = DpoObjective {
                pad: Pad::exact(0),
                loss: DpoLossConfig::new(&p.loss, p.loss.beta),
                ld_alpha: p.loss.ld_alpha,
                use_weighting: p.loss.use_weighting,
            };
            let model = load_lm(&opts.model, &cfg, &device)?;
            let params = model.num_params();
            let secs = time_steps(&objective, model, &examples, opts.steps, &device)?;
            (secs, 2 * batch * seq, params)
        }
        "kto" => {
            let pairs = pairs(&mut rng, batch, seq, vocab);
            // The KL row of each example is its prompt with the next example's completion, as
            // the stage pairs them.
            let rows: Vec<UnpairedRow> = (0..batch)
                .map(|i| UnpairedRow {
                    row: i,
                    sequence: pairs[i].chosen.clone(),
                    kl: PromptCompletion {
                        prompt: pairs[i].chosen.prompt.clone(),
                        completion: pairs[(i + 1) % batch].chosen.completion.clone(),
                    },
                    desirable: i % 2 == 0,
                })
                .collect();
            let sequences: Vec<&PromptCompletion> = rows
                .iter()
                .map(|r| &r.sequence)
                .chain(rows.iter().map(|r| &r.kl))
                .collect();
            let mut reference = reference_sums(&opts.model, &cfg, &sequences, &device)?;
            let reference_kl = reference.split_off(batch);
            let examples: Vec<KtoExample> = rows
                .into_iter()
                .zip(reference.into_iter().zip(reference_kl))
                .map(|(row, (reference, reference_kl))| KtoExample {
                    row,
                    reference,
                    reference_kl,
                })
                .collect();
            let objective = KtoObjective {
                pad: Pad::exact(0),
                loss: KtoLossConfig::from(&KtoParams::default()),
            };
            let model = load_lm(&opts.model, &cfg, &device)?;
            let params = model.num_params();
            let secs = time_steps(&objective, model, &examples, opts.steps, &device)?;
            // The trained forward covers the rows; the KL rows run without a graph.
            (secs, 2 * batch * seq, params)
        }
        "ppo-rollout" | "ppo-update" => ppo(opts, &cfg, &mut rng, &device)?,
        "generate" => {
            let model = load_lm(&opts.model, &cfg, &device.clone().inner())?;
            let prompts: Vec<Vec<u32>> = (0..batch).map(|_| ids(&mut rng, seq, vocab)).collect();
            let gen_opts = GenerateOptions {
                max_new_tokens: opts.new_tokens,
                temperature: 0.0,
                batch_size: batch,
                use_cache: true,
                ..GenerateOptions::default()
            };
            let secs = time_each(opts.steps, || {
                generate_ids(&model, &prompts, &[], 0, &gen_opts).map(drop)
            })?;
            (secs, batch * opts.new_tokens, model.num_params())
        }
        _ => {
            let loss = if opts.kind == "orpo" {
                ReferenceFreeLoss::Orpo {
                    beta: OrpoParams::default().beta,
                }
            } else {
                ReferenceFreeLoss::Cpo(CpoLossConfig::from(&SimpoParams::default()))
            };
            let examples = pairs(&mut rng, batch, seq, vocab);
            let objective = ReferenceFreeObjective {
                pad: Pad::exact(0),
                loss,
            };
            let model = load_lm(&opts.model, &cfg, &device)?;
            let params = model.num_params();
            let secs = time_steps(&objective, model, &examples, opts.steps, &device)?;
            (secs, 2 * batch * seq, params)
        }
    };
    Ok(BenchReport {
        kind: opts.kind.clone(),
        backend: opts.backend.as_str().to_string(),
        precision: opts.precision.as_str().to_string(),
        tokens_per_second: tokens as f64 / timing.step_seconds,
        step_seconds: timing.step_seconds,
        warmup_seconds: timing.warmup_seconds,
        peak_rss_mib: peak_rss_mib(),
        params,
    })
}

/// Runs `f` for warm-up + `steps` times; returns the [`Timing`] of the runs.
fn time_each<E>(steps: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Timing, E> {
    let mut durations = Vec::with_capacity(WARMUP_STEPS + steps);
    for _ in 0..WARMUP_STEPS + steps {
        let start = Instant::now();
        f()?;
        durations.push(start.elapsed().as_secs_f64());
    }
    Ok(Timing::of(&durations))
}

/// The PPO stage's algorithm with its default settings, over one minibatch of `rows`.
fn ppo_algorithm(rows: usize) -> Ppo {
    let p = PpoParams::default();
    let settings = LoopSettings {
        ppo_epochs: 1,
        num_mini_batches: 1,
        micro_batch: rows,
        temperature: p.rollout.temperature,
        max_grad_norm: p.train.max_grad_norm,
        pad: Pad::exact(0),
        seed: 1,
    };
    Ppo::new(&p, settings)
}

/// The models of a PPO stage: the policy, its frozen reference, the value model (the policy's
/// backbone with a fresh score head) and the reward model that scores (a second such model).
struct PpoModels {
    policy: CausalLm,
    reference: CausalLm,
    value: RewardModel,
    judge: RewardModel,
}

impl PpoModels {
    fn load(model: &BenchModel, cfg: &ModelConfig, device: &Device) -> Result<Self, StageError> {
        let inference = device.clone().inner();
        let reward = |seed: u64, device: &Device| match model {
            BenchModel::Dir(dir) => {
                Ok(crate::model::reward_model_from_causal_lm(dir, seed, device)?.1)
            }
            BenchModel::Fresh(_) => {
                Ok::<_, StageError>(crate::model::random_reward_model(cfg, seed, device))
            }
        };
        Ok(Self {
            policy: load_lm(model, cfg, device)?,
            reference: load_lm(model, cfg, &inference)?,
            value: reward(0, device)?,
            judge: reward(1, &inference)?,
        })
    }

    /// One rollout of `prompts` with responses of `response` tokens, prepared for the update.
    fn rollout(
        &self,
        algorithm: &Ppo,
        prompts: &[Vec<u32>],
        response: usize,
        iteration: u64,
    ) -> Result<PpoBatch, StageError> {
        let policy = self.policy.valid();
        let opts = GenerateOptions {
            max_new_tokens: response,
            temperature: algorithm.settings.temperature,
            seed: iteration,
            batch_size: prompts.len(),
            use_cache: true,
            ..GenerateOptions::default()
        };
        let generated = generate_ids(&policy, prompts, &[], 0, &opts)?;
        let rows: Vec<PromptCompletion> = prompts
            .iter()
            .zip(generated)
            .map(|(prompt, g)| PromptCompletion {
                prompt: prompt.clone(),
                completion: g.ids,
            })
            .collect();
        let refs: Vec<&PromptCompletion> = rows.iter().collect();
        let batch = CompletionBatch::new(&refs, Pad::exact(0), &self.judge.device());
        let scores: Vec<f64> = self
            .judge
            .forward(batch.ids, Some(&batch.padding))
            .into_data()
            .iter::<f64>()
            .collect();
        let samples = Samples {
            prompt_index: (0..rows.len()).collect(),
            responses: vec![String::new(); rows.len()],
            eos: vec![false; rows.len()],
            scores,
            rows,
        };
        let value = self.value.valid();
        let kl_coef = PpoParams::default().kl_coef;
        Ok(crate::kinds::ppo::prepare(
            &policy,
            &self.reference,
            &value,
            samples,
            algorithm,
            kl_coef,
            iteration,
        ))
    }
}

/// `ppo-rollout` or `ppo-update`: `batch` prompts of half the sequence, responses of the rest.
fn ppo(
    opts: &BenchOptions,
    cfg: &ModelConfig,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<(Timing, usize, usize), BenchError> {
    let (batch, seq) = (opts.batch, opts.seq);
    let prompt_len = seq / 2;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| ids(rng, prompt_len, cfg.vocab_size))
        .collect();
    let algorithm = ppo_algorithm(batch);
    let models = PpoModels::load(&opts.model, cfg, device)?;
    let policy_params = models.policy.num_params();
    if opts.kind == "ppo-rollout" {
        let mut iteration = 0;
        let secs = time_each(opts.steps, || {
            iteration += 1;
            models
                .rollout(&algorithm, &prompts, seq - prompt_len, iteration)
                .map(drop)
        })?;
        return Ok((secs, batch * seq, policy_params));
    }
    let rollout = models.rollout(&algorithm, &prompts, seq - prompt_len, 1)?;
    let params = policy_params + models.value.num_params();
    let PpoModels { policy, value, .. } = models;
    let lr = PpoParams::default().policy.learning_rate;
    let mut trainees = Some(Trainees::with_value(policy, value, AdamWConfig::default()));
    let settings = &algorithm.settings;
    let secs = time_each(opts.steps, || {
        let t = trainees
            .take()
            .expect("the previous update returned the trainees");
        let (trained, _) = update(&algorithm, t, &rollout, settings, 1, lr, device)?;
        trainees = Some(trained);
        Ok::<_, BenchError>(())
    })?;
    Ok((secs, batch * seq, params))
}

/// This process's peak resident memory in MiB (NaN where /proc is absent).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
