//! Supervised fine-tuning (the `sft` stage kind): tokenising TRL's dataset formats into
//! sequences with a per-token training mask, and the objective that the training loop minimises,
//! the token-mean negative log-likelihood over the masked tokens of the whole batch.
//!
//! - prompt/completion: `[BOS] prompt completion [EOS]`, with the completion tokens (EOS
//!   included) trained on when `completion_only_loss`, every token after BOS otherwise;
//! - plain text: `[BOS] text [EOS]`, every token after BOS;
//! - conversations: the chat template's rendering, with only the assistant turns trained on when
//!   `assistant_only_loss`.
//!
//! Token `j` is predicted from position `j - 1` (labels are unshifted, as in transformers).
//! Metrics use TRL's names: `mean_token_accuracy`, `entropy` and the running `num_tokens`.

use std::path::PathBuf;

use burn::module::AutodiffModule;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rudder_engine::runner::{Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::kinds::SftParams;

use crate::backend::{AutodiffTask, dispatch_autodiff};
use crate::data::{Message as DataMessage, SftExample};
use crate::model::{CausalLm, ModelConfig, load_causal_lm, random_causal_lm};
use crate::runner::{self};
use crate::tokenizer::{Message, Tokenizer};
use crate::train::{Forward, MetricValue, Objective, TrainConfig, TrainError, TrainReport};

/// A tokenised training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftSequence {
    pub input_ids: Vec<u32>,
    /// `true` where the token is a training target (label != -100 in transformers' terms).
    pub target: Vec<bool>,
    /// For a packed row, the segment (1, 2, ...) each token belongs to; `None` for one example.
    pub segments: Option<Vec<u8>>,
}

impl SftSequence {
    /// The number of trained tokens (position 0 is never predicted).
    pub fn num_targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }

    /// transformers' `labels`: the token where it is trained on, -100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids
            .iter()
            .zip(&self.target)
            .map(|(&id, &t)| if t { i64::from(id) } else { -100 })
            .collect()
    }
}

/// Most examples in one packed row: segment ids are bytes, 0 meaning padding.
pub const MAX_SEGMENTS: usize = 255;

/// Packs sequences into rows of at most `max_length` tokens, best fit decreasing (TRL's `bfd`
/// strategy): longest first, each into the fullest row it still fits. Each example keeps its own
/// segment, so it attends only to itself, with positions from 0: the loss equals the unpacked
/// one while far less compute goes to padding.
pub fn pack(sequences: &[SftSequence], max_length: usize) -> Vec<SftSequence> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].input_ids.len()));
    let mut rows: Vec<SftSequence> = Vec::new();
    // (room left, row): the smallest room that fits is the best fit.
    let mut open: std::collections::BTreeSet<(usize, usize)> = Default::default();
    for i in order {
        let seq = &sequences[i];
        let len = seq.input_ids.len();
        let fit = open.range((len, 0)..).next().copied();
        let row = match fit {
            Some(entry) => {
                open.remove(&entry);
                entry.1
            }
            None => {
                rows.push(SftSequence {
                    input_ids: Vec::with_capacity(max_length),
                    target: Vec::with_capacity(max_length),
                    segments: Some(Vec::with_capacity(max_length)),
                });
                rows.len() - 1
            }
        };
        let packed = &mut rows[row];
        let segments = packed.segments.get_or_insert_with(Vec::new);
        let segment = segments.last().copied().unwrap_or(0) + 1;
        packed.input_ids.extend_from_slice(&seq.input_ids);
        packed.target.extend_from_slice(&seq.target);
        segments.extend(std::iter::repeat_n(segment, len));
        let room = max_length.saturating_sub(packed.input_ids.len());
        if room > 0 && usize::from(segment) < MAX_SEGMENTS {
            open.insert((room, row));
        }
    }
    rows
}

/// How examples are turned into sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftTokenization {
    pub max_length: usize,
    pub completion_only_loss: bool,
    pub assistant_only_loss: bool,
}

impl Default for SftTokenization {
    fn default() -> Self {
        Self {
            max_length: 1024,
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

/// Tokenises every example; sequences longer than `max_length` keep their start.
pub fn tokenize(
    tokenizer: &Tokenizer,
    examples: &[SftExample],
    opts: &SftTokenization,
) -> Result<Vec<SftSequence>, TrainError> {
    examples
        .iter()
        .map(|ex| {
            let mut seq = tokenize_one(tokenizer, ex, opts)?;
            seq.input_ids.truncate(opts.max_length);
            seq.target.truncate(opts.max_length);
            Ok(seq)
        })
        .collect()
}

fn tokenize_one(
    tokenizer: &Tokenizer,
    example: &SftExample,
    opts: &SftTokenization,
) -> Result<SftSequence, TrainError> {
    match example {
        SftExample::PromptCompletion { prompt, completion } => {
            // TRL tokenises `prompt` and `prompt + completion` and splits at the prompt's length.
            let split = tokenizer.split_prompt_completion(prompt, completion)?;
            let n_prompt = split.prompt_ids.len();
            let mut input_ids = split.prompt_ids;
            input_ids.extend(split.completion_ids);
            let target = (0..input_ids.len())
                .map(|i| i > 0 && (!opts.completion_only_loss || i >= n_prompt))
                .collect();
            Ok(SftSequence {
                input_ids,
                target,
                segments: None,
            })
        }
        SftExample::Text(text) => {
            let mut input_ids = tokenizer.encode(text, true)?;
            if let Some(eos) = tokenizer.eos_id()
                && input_ids.last() != Some(&eos)
            {
                input_ids.push(eos);
            }
            let target = (0..input_ids.len()).map(|i| i > 0).collect();
            Ok(SftSequence {
                input_ids,
                target,
                segments: None,
            })
        }
        SftExample::Conversation(messages) => conversation(tokenizer, messages, opts),
    }
}

/// Renders a conversation with the chat template and marks the assistant turns. A turn's tokens
/// are found by rendering the conversation up to the turn (with the generation prompt) and
/// through it, and tokenising both prefixes.
fn conversation(
    tokenizer: &Tokenizer,
    messages: &[DataMessage],
    opts: &SftTokenization,
) -> Result<SftSequence, TrainError> {
    let msgs: Vec<Message> = messages
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let full = tokenizer.apply_chat_template(&msgs, false)?;
    // The template writes its own special tokens (BOS included, when it has one).
    let input_ids = tokenizer.encode(&full, false)?;
    let mut target = vec![!opts.assistant_only_loss; input_ids.len()];
    if opts.assistant_only_loss {
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = tokenizer.apply_chat_template(&msgs[..i], true)?;
            let through = tokenizer.apply_chat_template(&msgs[..=i], false)?;
            let start = tokenizer.encode(&before, false)?.len();
            let end = tokenizer
                .encode(&through, false)?
                .len()
                .min(input_ids.len());
            for t in target.iter_mut().take(end).skip(start) {
                *t = true;
            }
        }
    }
    if let Some(first) = target.first_mut() {
        *first = false;
    }
    Ok(SftSequence {
        input_ids,
        target,
        segments: None,
    })
}

/// The SFT objective over a causal LM.
pub struct SftObjective {
    /// Right-padding id (never trained on, never attended to).
    pub pad_id: u32,
}

impl<B: AutodiffBackend> Objective<B> for SftObjective
where
    CausalLm<B>: AutodiffModule<B>,
{
    type Model = CausalLm<B>;
    type Example = SftSequence;

    fn length(&self, example: &SftSequence) -> usize {
        example.input_ids.len()
    }

    fn weight(&self, examples: &[&SftSequence]) -> f64 {
        examples.iter().map(|s| s.num_targets()).sum::<usize>() as f64
    }

    fn forward(
        &self,
        model: &CausalLm<B>,
        examples: &[&SftSequence],
        device: &B::Device,
    ) -> Result<Forward<B>, TrainError> {
        let batch = Batch::new(examples, self.pad_id, device);
        let logits = model.forward(batch.ids.clone(), Some(&batch.padding), None);
        let stats = token_stats(logits, &batch);
        let real: usize = examples.iter().map(|s| s.input_ids.len()).sum();
        Ok(Forward {
            loss_sum: stats.nll_sum,
            metrics: vec![
                MetricValue::mean("mean_token_accuracy", stats.correct, stats.targets),
                MetricValue::mean("entropy", stats.entropy_sum, stats.targets),
                MetricValue::cumulative("num_tokens", real as f64),
            ],
        })
    }
}

/// A right-padded batch of sequences.
pub struct Batch<B: AutodiffBackend> {
    pub ids: Tensor<B, 2, Int>,
    /// 1 on real tokens, 0 on padding.
    pub padding: Vec<Vec<u8>>,
    /// `[batch, seq - 1]`: 1.0 where token `j + 1` is trained on.
    pub target_mask: Tensor<B::InnerBackend, 2>,
    /// `[batch, seq - 1]`: token `j + 1`.
    pub targets: Tensor<B::InnerBackend, 2, Int>,
    pub seq: usize,
}

impl<B: AutodiffBackend> Batch<B> {
    pub fn new(examples: &[&SftSequence], pad_id: u32, device: &B::Device) -> Self {
        let n = examples.len();
        let seq = examples
            .iter()
            .map(|s| s.input_ids.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let mut ids = Vec::with_capacity(n * seq);
        let mut padding = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n * (seq - 1));
        let mut targets = Vec::with_capacity(n * (seq - 1));
        for s in examples {
            let len = s.input_ids.len();
            ids.extend(s.input_ids.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(i64::from(pad_id), seq - len));
            padding.push(match &s.segments {
                Some(segments) => segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, seq - len))
                    .collect(),
                None => (0..seq).map(|j| u8::from(j < len)).collect(),
            });
            for j in 1..seq {
                let trained = j < len && s.target[j];
                mask.push(if trained { 1.0f32 } else { 0.0 });
                targets.push(if j < len {
                    i64::from(s.input_ids[j])
                } else {
                    0
                });
            }
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [n, seq]), device),
            padding,
            target_mask: Tensor::from_data(TensorData::new(mask, [n, seq - 1]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, seq - 1]), device),
            seq,
        }
    }
}

/// Per-batch token statistics of next-token prediction.
pub struct TokenStats<B: AutodiffBackend> {
    /// Sum of the NLL over trained tokens (differentiable).
    pub nll_sum: Tensor<B, 1>,
    pub correct: f64,
    pub targets: f64,
    /// Sum over the positions that predict a trained token of the predictive entropy.
    pub entropy_sum: f64,
}

/// NLL, accuracy and entropy of `logits` (`[batch, seq, vocab]`) against the batch's targets.
pub fn token_stats<B: AutodiffBackend>(logits: Tensor<B, 3>, batch: &Batch<B>) -> TokenStats<B> {
    let [n, seq, vocab] = logits.dims();
    let logp = log_softmax(logits.clone(), 2);
    let shifted = logp.slice([0..n, 0..seq - 1, 0..vocab]);
    let targets = Tensor::<B, 2, Int>::from_inner(batch.targets.clone());
    let mask = Tensor::<B, 2>::from_inner(batch.target_mask.clone());
    let picked = shifted
        .clone()
        .gather(2, targets.clone().unsqueeze_dim(2))
        .reshape([n, seq - 1]);
    let nll_sum = (picked.neg() * mask).sum();

    // Metrics need no gradient.
    let logits_inner = logits.inner();
    let argmax = logits_inner
        .clone()
        .slice([0..n, 0..seq - 1, 0..vocab])
        .argmax(2)
        .reshape([n, seq - 1]);
    let correct: f64 = (argmax.equal(batch.targets.clone()).float() * batch.target_mask.clone())
        .sum()
        .into_scalar()
        .elem();
    let targets_count: f64 = batch.target_mask.clone().sum().into_scalar().elem();
    // TRL 1.16 averages the predictive entropy over the trained positions.
    let logp_inner = log_softmax(logits_inner.slice([0..n, 0..seq - 1, 0..vocab]), 2);
    let entropy = (logp_inner.clone().exp() * logp_inner)
        .sum_dim(2)
        .reshape([n, seq - 1])
        .neg();
    let entropy_sum: f64 = (entropy * batch.target_mask.clone())
        .sum()
        .into_scalar()
        .elem();
    TokenStats {
        nll_sum,
        correct,
        targets: targets_count,
        entropy_sum,
    }
}

/// Runs `sft` stages: loads the model and its tokenizer, tokenises the data, trains, and writes
/// the fine-tuned model directory with `metrics.jsonl` into the artifact.
pub struct SftRunner;

impl Runner for SftRunner {
    fn kind(&self) -> &'static str {
        "sft"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        Ok(run_stage(ctx)?)
    }
}

fn run_stage(ctx: &StageContext<'_>) -> Result<StageOutcome, TrainError> {
    let params = runner::params::<SftParams>(ctx)?;
    let (dir, tokenizer) = runner::model_with_tokenizer(ctx)?;
    let rows = runner::data_rows(ctx)?;
    let examples = rows.sft_examples(&params.dataset_text_field)?;
    let opts = SftTokenization {
        max_length: params.max_length as usize,
        completion_only_loss: params.completion_only_loss,
        assistant_only_loss: params.assistant_only_loss,
    };
    let examples_count = examples.len();
    let mut sequences = tokenize(&tokenizer, &examples, &opts)?;
    if params.packing {
        sequences = pack(&sequences, opts.max_length);
    }
    let task = CausalLmTask {
        ctx,
        start: &Start::Directory(dir.clone()),
        sequences: &sequences,
        pad_id: tokenizer.pad_id().unwrap_or(0),
        cfg: runner::train_config(
            params.learning_rate,
            &params.train,
            ctx.seed,
            Some(ctx.work_dir),
        ),
    };
    let report = dispatch_autodiff(runner::backend(ctx)?, task)??;
    tokenizer.save(ctx.out_dir)?;
    let mut summary = report.summary();
    summary.insert("examples".into(), examples_count as f64);
    if params.packing {
        summary.insert("packed_rows".into(), sequences.len() as f64);
    }
    Ok(StageOutcome { summary })
}

/// Where a causal-LM training run starts.
pub(crate) enum Start {
    /// A fresh, seeded model of this configuration (pretraining).
    Fresh(ModelConfig),
    /// The weights of a Hugging Face directory.
    Directory(PathBuf),
}

/// Trains a causal LM on tokenised sequences with the SFT objective and saves it into the
/// stage's output: SFT and pretraining differ only in where they start and what they feed.
pub(crate) struct CausalLmTask<'a, 'b> {
    pub ctx: &'a StageContext<'b>,
    pub start: &'a Start,
    pub sequences: &'a [SftSequence],
    pub pad_id: u32,
    pub cfg: TrainConfig,
}

impl AutodiffTask for CausalLmTask<'_, '_> {
    type Output = Result<TrainReport, TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let (model_cfg, model) = match self.start {
            Start::Fresh(cfg) => (
                cfg.clone(),
                random_causal_lm::<B>(cfg, self.ctx.seed, &device),
            ),
            Start::Directory(dir) => load_causal_lm::<B>(dir, &device)?,
        };
        let objective = SftObjective {
            pad_id: self.pad_id,
        };
        runner::train_causal_lm(
            self.ctx,
            model,
            &model_cfg,
            &objective,
            self.sequences,
            &self.cfg,
            &device,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::backend::Autodiff;

    type AB = Autodiff<TestBackend>;

    fn example(len: usize, first_target: usize, salt: u32) -> SftSequence {
        SftSequence {
            input_ids: (0..len as u32).map(|i| (i * 7 + salt) % 61 + 1).collect(),
            target: (0..len).map(|i| i >= first_target).collect(),
            segments: None,
        }
    }

    #[test]
    fn packing_fits_rows_best_first_and_keeps_every_token() {
        let seqs: Vec<SftSequence> = [9, 3, 7, 5, 2, 6]
            .iter()
            .enumerate()
            .map(|(i, &len)| example(len, 1, i as u32))
            .collect();
        let rows = pack(&seqs, 10);
        // Longest first, each into the fullest row it fits: [9], [7, 3], [6, 2], [5].
        let lengths: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
        assert_eq!(lengths, vec![9, 10, 8, 5]);
        assert_eq!(
            rows[1].segments.as_deref(),
            Some(&[1, 1, 1, 1, 1, 1, 1, 2, 2, 2][..])
        );
        let total: usize = rows.iter().map(|r| r.num_targets()).sum();
        let expect: usize = seqs.iter().map(|s| s.num_targets()).sum();
        assert_eq!(total, expect);
    }

    #[test]
    fn a_packed_batch_has_the_loss_of_its_examples_unpacked() {
        let device = Default::default();
        let cfg = ModelConfig::llama(64, 32, 64, 2, 4, 2);
        let model = random_causal_lm::<AB>(&cfg, 3, &device);
        let seqs: Vec<SftSequence> = [12, 5, 9, 7, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| example(len, 2, i as u32))
            .collect();
        let packed = pack(&seqs, 16);
        assert!(packed.len() < seqs.len());
        let objective = SftObjective { pad_id: 0 };
        let loss = |rows: &[SftSequence]| -> f64 {
            let refs: Vec<&SftSequence> = rows.iter().collect();
            let out = Objective::<AB>::forward(&objective, &model, &refs, &device).unwrap();
            out.loss_sum.into_scalar().elem::<f64>() / Objective::<AB>::weight(&objective, &refs)
        };
        let (unpacked, packed) = (loss(&seqs), loss(&packed));
        assert!(
            (unpacked - packed).abs() / unpacked < 1e-5,
            "{unpacked} vs {packed}"
        );
    }

    #[test]
    fn nll_accuracy_and_entropy_on_hand_computed_logits() {
        let device = Default::default();
        // Sequence [1, 0, 1] over a vocabulary of 2: tokens 0 and 1 at positions 1 and 2 are
        // trained.
        let seq = SftSequence {
            input_ids: vec![1, 0, 1],
            target: vec![false, true, true],
            segments: None,
        };
        let batch = Batch::<AB>::new(&[&seq], 0, &device);
        // Position 0 predicts token 0 with logits [ln 3, 0] -> p = [0.75, 0.25];
        // position 1 predicts token 1 with logits [0, 0] -> p = [0.5, 0.5].
        let logits = Tensor::<AB, 3>::from_data(
            TensorData::new(vec![3f32.ln(), 0.0, 0.0, 0.0, 5.0, 5.0], [1, 3, 2]),
            &device,
        );
        let stats = token_stats(logits, &batch);
        let nll: f64 = stats.nll_sum.into_scalar().elem();
        let expect = -(0.75f64.ln()) - 0.5f64.ln();
        assert!((nll - expect).abs() < 1e-6, "{nll} vs {expect}");
        // argmax at position 0 is 0 (correct); at position 1 a tie resolves to 0 (wrong).
        assert_eq!(stats.correct, 1.0);
        assert_eq!(stats.targets, 2.0);
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let expect_h = h(0.75) + h(0.5);
        assert!((stats.entropy_sum - expect_h).abs() < 1e-5);
    }

    #[test]
    fn padding_and_untrained_tokens_do_not_count() {
        let device = Default::default();
        let a = SftSequence {
            input_ids: vec![1, 1],
            target: vec![false, false],
            segments: None,
        };
        let b = SftSequence {
            input_ids: vec![1, 0, 1],
            target: vec![false, false, true],
            segments: None,
        };
        assert_eq!(a.num_targets() + b.num_targets(), 1);
        assert_eq!(b.labels(), vec![-100, -100, 1]);
        let batch = Batch::<AB>::new(&[&a, &b], 0, &device);
        assert_eq!(batch.padding, vec![vec![1, 1, 0], vec![1, 1, 1]]);
        let mask: Vec<f32> = batch.target_mask.clone().into_data().to_vec().unwrap();
        assert_eq!(mask, vec![0.0, 0.0, 0.0, 1.0]);
        let logits = Tensor::<AB, 3>::zeros([2, 3, 2], &device);
        let stats = token_stats(logits, &batch);
        let nll: f64 = stats.nll_sum.into_scalar().elem();
        assert!((nll - 2f64.ln()).abs() < 1e-6);
    }
}
