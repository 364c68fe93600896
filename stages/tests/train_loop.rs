//! The training loop's settings on a real model (the fixture policy and SFT data): gradient
//! accumulation gives the step of one large batch, clipping changes the update but not the
//! reported (pre-clip) norm, a diverging run stops with the step and the quantity, and chat data
//! is trained on the assistant turns only.

use rudder_stages::data::{Format, Message, SftExample, read_rows};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::model::load_causal_lm;
use rudder_stages::padding::Pad;
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{NoHooks, TrainConfig, TrainError, TrainReport, train};
use rudder_stages::train::{SftObjective, SftSequence};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn sequences() -> Vec<SftSequence> {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let examples = rows.sft_examples("text").unwrap();
    sft::tokenize(&tokenizer, &examples, &SftTokenization::default()).unwrap()
}

fn run(cfg: &TrainConfig) -> Result<TrainReport, TrainError> {
    let device = rudder_stages::test_device().autodiff();
    let (_, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let seqs = sequences();
    let (_, report) = train(
        &SftObjective { pad: Pad::exact(0) },
        model,
        &seqs,
        cfg,
        &device,
        None,
        &mut NoHooks,
    )?;
    Ok(report)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    let whole = TrainConfig {
        batch_size: 16,
        max_steps: Some(2),
        ..TrainConfig::default()
    };
    let split = TrainConfig {
        batch_size: 4,
        gradient_accumulation_steps: 4,
        ..whole.clone()
    };
    let (a, b) = (run(&whole).unwrap(), run(&split).unwrap());
    assert_eq!(b.steps.len(), 2);
    for (x, y) in a.steps.iter().zip(&b.steps) {
        assert!(rel(x.loss, y.loss) < 1e-5, "{} vs {}", x.loss, y.loss);
        assert!(rel(x.grad_norm, y.grad_norm) < 1e-4);
        let (ax, ay) = (
            x.metrics["mean_token_accuracy"],
            y.metrics["mean_token_accuracy"],
        );
        assert!((ax - ay).abs() < 1e-9, "{ax} vs {ay}");
    }
}

#[test]
fn clipping_changes_the_update_not_the_reported_norm() {
    let free = TrainConfig {
        batch_size: 16,
        max_steps: Some(3),
        ..TrainConfig::default()
    };
    let clipped = TrainConfig {
        max_grad_norm: 0.5,
        ..free.clone()
    };
    let (a, b) = (run(&free).unwrap(), run(&clipped).unwrap());
    assert!(rel(a.steps[0].grad_norm, b.steps[0].grad_norm) < 1e-6);
    assert!(a.steps[0].grad_norm > 0.5);
    assert!(
        rel(a.steps[2].loss, b.steps[2].loss) > 1e-4,
        "{} vs {}",
        a.steps[2].loss,
        b.steps[2].loss
    );
}

#[test]
fn divergence_names_the_step_and_quantity() {
    let cfg = TrainConfig {
        learning_rate: 1e30,
        batch_size: 16,
        max_steps: Some(5),
        ..TrainConfig::default()
    };
    match run(&cfg) {
        Err(TrainError::NonFinite { step, quantity, .. }) => {
            assert!(step >= 2, "step {step}");
            assert!(quantity == "loss" || quantity == "grad_norm");
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
}

#[test]
fn conversations_train_on_assistant_turns_only() {
    let mut tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    tokenizer.chat_template = Some(
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
            .into(),
    );
    let msg = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let chat = SftExample::Conversation(vec![
        msg("user", "What color is grass?"),
        msg("assistant", " Grass is green."),
        msg("user", "And the sky?"),
        msg("assistant", " The sky is blue."),
    ]);
    let opts = SftTokenization::default();
    let seq = &sft::tokenize(&tokenizer, std::slice::from_ref(&chat), &opts).unwrap()[0];
    assert_eq!(seq.input_ids[0], 1, "the template's BOS");
    let trained: Vec<u32> = seq
        .input_ids
        .iter()
        .zip(&seq.target)
        .filter(|(_, t)| **t)
        .map(|(id, _)| *id)
        .collect();
    let text = tokenizer.decode(&trained, false).unwrap();
    assert_eq!(text, " Grass is green.<|eos|> The sky is blue.<|eos|>");

    let all = SftTokenization {
        assistant_only_loss: false,
        ..opts
    };
    let seq = &sft::tokenize(&tokenizer, &[chat], &all).unwrap()[0];
    assert_eq!(seq.num_targets(), seq.input_ids.len() - 1);
}

/// Stops the run once `after` steps are done.
struct StopAfter {
    after: u64,
    done: u64,
}

impl rudder_stages::train::Hooks for StopAfter {
    fn on_step(&mut self, record: &rudder_stages::train::StepRecord, _: u64) {
        self.done = record.step;
    }
    fn interrupted(&self) -> bool {
        self.done >= self.after
    }
}

/// Trains with checkpoints in `dir`; returns the saved model's bytes and metrics.jsonl.
fn run_to_files(
    cfg: &TrainConfig,
    dir: &Path,
    hooks: &mut dyn rudder_stages::train::Hooks,
) -> Result<(Vec<u8>, String), TrainError> {
    let device = rudder_stages::test_device().autodiff();
    let (model_cfg, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let seqs = sequences();
    let metrics_path = dir.join("metrics.jsonl");
    let mut writer = rudder_stages::train::MetricsWriter::create(&metrics_path, 2).unwrap();
    let (model, _) = train(
        &SftObjective { pad: Pad::exact(0) },
        model,
        &seqs,
        cfg,
        &device,
        Some(&mut writer),
        hooks,
    )?;
    let out = dir.join("model");
    rudder_stages::model::save_causal_lm(&model, &model_cfg, &out).unwrap();
    Ok((
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read_to_string(metrics_path).unwrap(),
    ))
}

#[test]
fn resuming_from_a_checkpoint_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |name: &str| TrainConfig {
        batch_size: 4,
        epochs: 2,
        shuffle: true,
        seed: 3,
        max_grad_norm: 1.0,
        adamw: rudder_stages::train::AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
        schedule: rudder_stages::train::ScheduleKind::Linear,
        warmup_steps: 2,
        checkpoint: Some(rudder_stages::train::Checkpointing {
            dir: tmp.path().join(name).join("checkpoint"),
            every: 3,
        }),
        ..TrainConfig::default()
    };
    let whole_dir = tmp.path().join("whole");
    let parts_dir = tmp.path().join("parts");
    std::fs::create_dir_all(&whole_dir).unwrap();
    std::fs::create_dir_all(&parts_dir).unwrap();
    let (whole_model, whole_metrics) =
        run_to_files(&cfg("whole"), &whole_dir, &mut NoHooks).unwrap();

    let mut stop = StopAfter { after: 5, done: 0 };
    match run_to_files(&cfg("parts"), &parts_dir, &mut stop) {
        Err(TrainError::Interrupted { step }) => assert_eq!(step, 6),
        other => panic!("expected an interruption, got {:?}", other.map(|_| ())),
    }
    let (parts_model, parts_metrics) =
        run_to_files(&cfg("parts"), &parts_dir, &mut NoHooks).unwrap();
    assert_eq!(whole_metrics.lines().count(), 4);
    assert_eq!(parts_metrics, whole_metrics);
    assert!(parts_model == whole_model, "resumed parameters differ");

    // A checkpoint of another run is refused.
    let other = TrainConfig {
        epochs: 3,
        ..cfg("parts")
    };
    match run_to_files(&other, &parts_dir, &mut NoHooks) {
        Err(TrainError::Checkpoint { message, .. }) => {
            assert!(message.contains("another run"), "{message}")
        }
        other => panic!("expected a checkpoint error, got {:?}", other.map(|_| ())),
    }
}
