//! `pad_to_multiple_of`: batches padded to a multiple of 64 (the GPU backends' default) train
//! as unpadded ones do, since the extra positions are neither attended to nor trained on. On the
//! fixture models, SFT, DPO (with its reference log-probs) and a reward model give the same
//! step-1 gradients and the same few-step runs, to float rounding, padded and unpadded.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use rudder_schema::kinds::{DpoLossType, PreferenceTokens};
use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::reward::{self, RewardObjective, pair_rewards};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::logps::{PromptCompletion, sequence_logps};
use rudder_stages::losses::DpoLossConfig;
use rudder_stages::model::{load_causal_lm, load_reward_model};
use rudder_stages::padding::Pad;
use rudder_stages::preference::{DpoExample, DpoObjective, tokenize_pairs};
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{
    NoHooks, Objective, ScheduleKind, SftObjective, SftSequence, TrainConfig, train,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-6;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap()
}

fn rows(file: &str) -> rudder_stages::data::Rows {
    read_rows(&fixtures().join(file), Format::Jsonl, &BTreeMap::new()).unwrap()
}

/// The padded multiple under test, and the exact lengths it is compared with.
fn pads() -> (Pad, Pad) {
    (Pad::exact(0), Pad::new(0, 64))
}

/// Every gradient of `loss`, flattened in module order.
fn gradients<M: Module>(model: &M, loss: Tensor<1>) -> Vec<f32> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.extend(g.into_data().try_to_vec::<f32>().unwrap());
            }
        }
    }
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut visitor = Collect {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

/// Every parameter, flattened in module order.
fn parameters<M: Module>(model: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .extend(param.val().into_data().try_to_vec::<f32>().unwrap());
        }
    }
    let mut visitor = Collect(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

/// The largest difference of `a` and `b`, relative to the largest magnitude in `a` (at least 1).
fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "same number of values");
    let scale = a.iter().map(|x| f64::from(x.abs())).fold(1.0, f64::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
        / scale
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1.0)
}

fn config() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-3,
        batch_size: 8,
        max_steps: Some(3),
        schedule: ScheduleKind::Constant,
        shuffle: false,
        ..TrainConfig::default()
    }
}

/// Trains `objective` from `model` for [`config`]'s steps: per-step (loss, grad_norm) and the
/// final parameters.
fn run<O: Objective>(
    objective: &O,
    model: O::Model,
    examples: &[O::Example],
    device: &Device,
) -> (Vec<(f64, f64)>, Vec<f32>)
where
    O::Model: Module,
{
    let (model, report) = train(
        objective,
        model,
        examples,
        &config(),
        device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let steps = report.steps.iter().map(|s| (s.loss, s.grad_norm)).collect();
    (steps, parameters(&model))
}

fn assert_same_run(
    what: &str,
    exact: (Vec<(f64, f64)>, Vec<f32>),
    padded: (Vec<(f64, f64)>, Vec<f32>),
) {
    assert_eq!(exact.0.len(), 3, "{what}: three steps");
    for (step, ((l0, n0), (l1, n1))) in exact.0.iter().zip(&padded.0).enumerate() {
        assert!(
            rel(*l1, *l0) < TOLERANCE && rel(*n1, *n0) < TOLERANCE,
            "{what} step {}: loss {l0} vs {l1}, grad norm {n0} vs {n1}",
            step + 1
        );
    }
    // AdamW divides each update by the gradient's running RMS, so a parameter whose gradient is
    // almost zero moves by up to the learning rate (1e-3) on rounding alone: the parameters after
    // three steps are compared within a tenth of one step's largest move.
    let params = max_diff(&exact.1, &padded.1);
    println!("{what}: final parameters differ by {params:.1e}");
    assert!(
        params < 1e-4,
        "{what}: final parameters differ by {params:e}"
    );
}

fn sft_sequences() -> Vec<SftSequence> {
    let examples = rows("sft.jsonl").sft_examples("text").unwrap();
    sft::tokenize(&tokenizer(), &examples, &SftTokenization::default()).unwrap()
}

#[test]
fn a_padded_batch_is_as_long_as_the_multiple_and_masks_the_padding() {
    let device = rudder_stages::test_device();
    let seqs = sft_sequences();
    let refs: Vec<&SftSequence> = seqs.iter().collect();
    let longest = seqs.iter().map(|s| s.input_ids.len()).max().unwrap();
    assert!(longest < 64, "the fixture rows are shorter than one bucket");
    let (exact, padded) = pads();
    let a = rudder_stages::train::Batch::new(&refs, exact, &device);
    let b = rudder_stages::train::Batch::new(&refs, padded, &device);
    assert_eq!(a.seq, longest);
    assert_eq!(b.seq, 64);
    assert_eq!(b.ids.dims(), [seqs.len(), 64]);
    for (row, seq) in b.padding.iter().zip(&seqs) {
        assert!(row[seq.input_ids.len()..].iter().all(|&m| m == 0));
    }
    let sum = |t: &Tensor<2>| t.clone().sum().into_scalar::<f64>();
    assert_eq!(sum(&a.target_mask), sum(&b.target_mask));
}

#[test]
fn sft_padded_to_64_trains_as_unpadded() {
    let device = rudder_stages::test_device().autodiff();
    let seqs = sft_sequences();
    let refs: Vec<&SftSequence> = seqs.iter().collect();
    let (_, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let (exact, padded) = pads();
    let step1 = |pad| {
        let out = SftObjective { pad }
            .forward(&model, &refs, &device)
            .unwrap();
        gradients(&model, out.loss_sum)
    };
    let (g0, g1) = (step1(exact), step1(padded));
    let diff = max_diff(&g0, &g1);
    println!("sft step-1 gradients differ by {diff:.1e}");
    assert!(diff < TOLERANCE, "sft step-1 gradients differ by {diff:e}");
    assert_same_run(
        "sft",
        run(&SftObjective { pad: exact }, model.clone(), &seqs, &device),
        run(&SftObjective { pad: padded }, model, &seqs, &device),
    );
}

#[test]
fn dpo_padded_to_64_trains_as_unpadded() {
    let tokenized = tokenize_pairs(
        &tokenizer(),
        &rows("prefs.jsonl").preference_pairs().unwrap(),
        &PreferenceTokens::default(),
    )
    .unwrap();
    let (exact, padded) = pads();
    // The reference's cached log-probs (the `ref_logps` part) are the same padded.
    let device = rudder_stages::test_device();
    let (_, reference) = load_causal_lm(&fixtures().join("reference"), &device).unwrap();
    let sides: Vec<&PromptCompletion> = tokenized
        .pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(tokenized.pairs.iter().map(|p| &p.rejected))
        .collect();
    let logps0 = sequence_logps(&reference, &sides, exact, 16);
    let logps1 = sequence_logps(&reference, &sides, padded, 16);
    let diff = max_diff(&logps0.concat(), &logps1.concat());
    println!("dpo reference log-probs differ by {diff:.1e}");
    assert!(diff < TOLERANCE, "reference log-probs differ by {diff:e}");

    let n = tokenized.pairs.len();
    let (chosen, rejected) = logps0.split_at(n);
    let examples: Vec<DpoExample> = tokenized
        .pairs
        .iter()
        .cloned()
        .zip(chosen.iter().zip(rejected))
        .map(|(pair, (c, r))| DpoExample {
            pair,
            reference_chosen: c.clone(),
            reference_rejected: r.clone(),
        })
        .collect();
    let objective = |pad| DpoObjective {
        pad,
        loss: DpoLossConfig::single(DpoLossType::Sigmoid, 0.1),
        ld_alpha: None,
        use_weighting: false,
    };
    let device = device.autodiff();
    let (_, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let refs: Vec<&DpoExample> = examples.iter().collect();
    let step1 = |pad| {
        let out = objective(pad).forward(&model, &refs, &device).unwrap();
        gradients(&model, out.loss_sum)
    };
    let (g0, g1) = (step1(exact), step1(padded));
    let diff = max_diff(&g0, &g1);
    println!("dpo step-1 gradients differ by {diff:.1e}");
    assert!(diff < TOLERANCE, "dpo step-1 gradients differ by {diff:e}");
    assert_same_run(
        "dpo",
        run(&objective(exact), model.clone(), &examples, &device),
        run(&objective(padded), model, &examples, &device),
    );
}

#[test]
fn reward_padded_to_64_scores_and_trains_as_unpadded() {
    let pairs = reward::tokenize(
        &tokenizer(),
        &rows("prefs.jsonl").preference_pairs().unwrap(),
        1024,
    )
    .unwrap();
    let (exact, padded) = pads();
    let device = rudder_stages::test_device().autodiff();
    let (_, model) = load_reward_model(&fixtures().join("rm_init"), &device).unwrap();
    let refs: Vec<&_> = pairs.iter().collect();
    let host = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
    let (c0, r0) = pair_rewards(&model, &refs, exact);
    let (c1, r1) = pair_rewards(&model, &refs, padded);
    let diff = max_diff(
        &[host(c0), host(r0)].concat(),
        &[host(c1), host(r1)].concat(),
    );
    assert!(diff < TOLERANCE, "rewards differ by {diff:e}");
    let objective = |pad| RewardObjective {
        pad,
        center_rewards_coefficient: None,
    };
    let step1 = |pad| {
        let out = Objective::forward(&objective(pad), &model, &refs, &device).unwrap();
        gradients(&model, out.loss_sum)
    };
    let (g0, g1) = (step1(exact), step1(padded));
    let diff = max_diff(&g0, &g1);
    println!("reward step-1 gradients differ by {diff:.1e}");
    assert!(
        diff < TOLERANCE,
        "reward step-1 gradients differ by {diff:e}"
    );
    assert_same_run(
        "reward",
        run(&objective(exact), model.clone(), &pairs, &device),
        run(&objective(padded), model, &pairs, &device),
    );
}
