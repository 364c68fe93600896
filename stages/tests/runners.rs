//! The `sft` and `reward` runners as the engine calls them: a stage context with a model
//! directory and a dataset, a few steps of training, and the artifact they leave (a loadable
//! Hugging Face directory with its tokenizer and `metrics.jsonl`). The losses are compared with
//! the first steps of TRL's reference trajectories, so the runners wire the parameters through
//! faithfully. Bad inputs must come back as errors, not panics.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rudder_engine::Key;
use rudder_engine::runner::{InputKind, StageContext, StageInput, StageResult};
use rudder_schema::kinds::{LrSchedulerType, RewardParams, SftParams, StageSpec, TrainArgs};
use rudder_schema::{Backend, DataFormat, Precision};
use rudder_stages::model::{load_causal_lm, load_reward_model};
use rudder_stages::tokenizer::Tokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

/// A model directory with its tokenizer, as an earlier stage or `models.X.hf` provides it.
fn model_dir(weights: &str, into: &Path) -> PathBuf {
    let dir = into.join(weights);
    std::fs::create_dir_all(&dir).unwrap();
    for src in [fixtures().join(weights), fixtures().join("tokenizer")] {
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// The reference runs' settings, for `steps` steps.
fn train_args(steps: u64) -> TrainArgs {
    TrainArgs {
        batch_size: 16,
        max_steps: Some(steps),
        lr_scheduler_type: LrSchedulerType::Constant,
        max_grad_norm: 0.0,
        shuffle: false,
        logging_steps: 1,
        ..TrainArgs::default()
    }
}

fn input(role: &str, path: Option<PathBuf>, kind: InputKind) -> StageInput {
    StageInput {
        role: role.into(),
        node: role.into(),
        key: Key::from_hex(&"0".repeat(64)).unwrap(),
        path,
        kind,
    }
}

fn dataset(name: &str) -> StageInput {
    input(
        "data",
        Some(fixtures().join(name)),
        InputKind::Dataset {
            format: DataFormat::Jsonl,
            columns: BTreeMap::new(),
        },
    )
}

fn run(
    kind: &str,
    spec: &dyn StageSpec,
    inputs: Vec<StageInput>,
    out: &Path,
    interrupted: bool,
) -> StageResult {
    common::run_stage(kind, kind, spec, inputs, out, 42, interrupted)
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn reference_losses(file: &str) -> Vec<f64> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn sft_runner_trains_and_writes_a_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("policy", tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = SftParams {
        model: "policy".into(),
        data: "sft".into(),
        learning_rate: 1e-3,
        train: train_args(3),
        ..SftParams::default()
    };
    let outcome = run(
        "sft",
        &params,
        vec![
            input("model", Some(model), InputKind::Model),
            dataset("sft.jsonl"),
        ],
        &out,
        false,
    )
    .unwrap();
    let lines = metrics(&out);
    assert_eq!(lines.len(), 3);
    let reference = reference_losses("sft_trajectory.json");
    for (line, expect) in lines.iter().zip(&reference) {
        let loss = line["loss"].as_f64().unwrap();
        assert!((loss - expect).abs() / expect < 1e-4, "{loss} vs {expect}");
        assert_eq!(line["learning_rate"], 1e-3);
    }
    assert_eq!(outcome.summary["steps"], 3.0);
    assert!((outcome.summary["loss"] - reference[2]).abs() / reference[2] < 1e-4);
    assert!(outcome.summary.contains_key("mean_token_accuracy"));
    // The artifact is a loadable model directory with its tokenizer.
    let (cfg, _) = load_causal_lm(&out, &Default::default()).unwrap();
    assert_eq!(cfg.vocab_size, 512);
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.eos_id(), Some(2));
}

#[test]
fn packed_sft_trains_fewer_rows_with_the_same_first_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("policy", tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = SftParams {
        model: "policy".into(),
        data: "sft".into(),
        learning_rate: 1e-3,
        packing: true,
        max_length: 128,
        train: TrainArgs {
            batch_size: 16,
            ..train_args(1)
        },
        ..SftParams::default()
    };
    let inputs = vec![
        input("model", Some(model), InputKind::Model),
        dataset("sft.jsonl"),
    ];
    let outcome = run("sft", &params, inputs, &out, false).unwrap();
    assert!(outcome.summary["packed_rows"] < outcome.summary["examples"]);
    // One batch holding every example: the loss is TRL's first step, packed or not.
    let loss = metrics(&out)[0]["loss"].as_f64().unwrap();
    let expect = reference_losses("sft_trajectory.json")[0];
    assert!((loss - expect).abs() / expect < 1e-4, "{loss} vs {expect}");
}

#[test]
fn reward_runner_trains_and_evaluates_held_out_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("rm_init", tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = RewardParams {
        model: "rm".into(),
        data: "prefs".into(),
        learning_rate: 1e-3,
        train: train_args(2),
        ..RewardParams::default()
    };
    let outcome = run(
        "reward",
        &params,
        vec![
            input("model", Some(model.clone()), InputKind::Model),
            dataset("prefs.jsonl"),
        ],
        &out,
        false,
    )
    .unwrap();
    let reference = reference_losses("rm_trajectory.json");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 2);
    for (line, expect) in lines.iter().zip(&reference) {
        let loss = line["loss"].as_f64().unwrap();
        assert!((loss - expect).abs() / expect < 1e-4, "{loss} vs {expect}");
        assert!(line["accuracy"].is_number() && line["margin"].is_number());
    }
    assert!(!outcome.summary.contains_key("eval_accuracy"));
    load_reward_model(&out, &Default::default()).unwrap();

    // A quarter of the pairs held out: 12 train, 4 evaluated.
    let out2 = tmp.path().join("out2");
    std::fs::create_dir_all(&out2).unwrap();
    let params = RewardParams {
        eval_ratio: 0.25,
        ..params
    };
    let outcome = run(
        "reward",
        &params,
        vec![
            input("model", Some(model), InputKind::Model),
            dataset("prefs.jsonl"),
        ],
        &out2,
        false,
    )
    .unwrap();
    assert_eq!(outcome.summary["pairs"], 12.0);
    let acc = outcome.summary["eval_accuracy"];
    assert!(
        (0.0..=1.0).contains(&acc) && (acc * 4.0).fract() == 0.0,
        "{acc}"
    );
    assert!(outcome.summary["eval_loss"].is_finite());
}

#[test]
fn bad_inputs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = SftParams {
        train: train_args(1),
        ..SftParams::default()
    };
    // A model directory without a tokenizer.
    let err = run(
        "sft",
        &params,
        vec![
            input("model", Some(fixtures().join("policy")), InputKind::Model),
            dataset("sft.jsonl"),
        ],
        &out,
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no tokenizer.json"), "{err}");
    // Preference data given to SFT: no supervised format matches, and the error says which
    // fields would have.
    let model = model_dir("policy", tmp.path());
    let err = run(
        "sft",
        &params,
        vec![
            input("model", Some(model.clone()), InputKind::Model),
            dataset("prefs.jsonl"),
        ],
        &out,
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("prefs.jsonl: row 1: no supervised format matches this row"),
        "{err}"
    );
    // Interrupted before the first step.
    let err = run(
        "sft",
        &params,
        vec![
            input("model", Some(model), InputKind::Model),
            dataset("sft.jsonl"),
        ],
        &out,
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("interrupted at step 1"), "{err}");
}

/// Progress that raises the interrupt flag once a given step is reached, as Ctrl-C would.
struct InterruptAt<'a> {
    step: u64,
    flag: &'a AtomicBool,
}

impl rudder_engine::runner::Progress for InterruptAt<'_> {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, position: u64) {
        if position >= self.step {
            self.flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn set_message(&self, _: String) {}
    fn println(&self, _: &str) {}
}

/// Runs `sft` with a persistent work directory, interrupted at `interrupt_at` when given.
fn run_sft_in(
    params: &SftParams,
    model: &Path,
    out: &Path,
    work: &Path,
    interrupt_at: Option<u64>,
) -> StageResult {
    let flag = AtomicBool::new(false);
    let progress = InterruptAt {
        step: interrupt_at.unwrap_or(u64::MAX),
        flag: &flag,
    };
    let ctx = StageContext {
        name: "sft",
        kind: "sft",
        key: Key::from_hex(&"2".repeat(64)).unwrap(),
        spec: params,
        part: None,
        inputs: vec![
            input("model", Some(model.to_path_buf()), InputKind::Model),
            dataset("sft.jsonl"),
        ],
        out_dir: out,
        work_dir: work,
        recipe_dir: out,
        seed: 5,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        progress: &progress,
        interrupted: &flag,
    };
    use rudder_engine::runner::Runner;
    rudder_stages::kind::runner::<rudder_stages::kinds::sft::Sft>().run(&ctx)
}

#[test]
fn interrupted_sft_resumes_from_its_work_directory_to_the_same_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("policy", tmp.path());
    let params = SftParams {
        learning_rate: 1e-3,
        train: TrainArgs {
            batch_size: 4,
            epochs: 2,
            checkpoint_every: 0,
            logging_steps: 3,
            ..TrainArgs::default()
        },
        ..SftParams::default()
    };
    let dirs: Vec<PathBuf> = ["whole", "work", "first", "second"]
        .iter()
        .map(|d| {
            let p = tmp.path().join(d);
            std::fs::create_dir_all(&p).unwrap();
            p
        })
        .collect();
    let whole_work = tempfile::tempdir().unwrap();
    run_sft_in(&params, &model, &dirs[0], whole_work.path(), None).unwrap();
    let err = run_sft_in(&params, &model, &dirs[2], &dirs[1], Some(3)).unwrap_err();
    assert!(err.to_string().contains("interrupted at step 4"), "{err}");
    assert!(dirs[1].join("checkpoint").join("state.json").is_file());
    run_sft_in(&params, &model, &dirs[3], &dirs[1], None).unwrap();
    for file in ["model.safetensors", "metrics.jsonl", "config.json"] {
        let a = std::fs::read(dirs[0].join(file)).unwrap();
        let b = std::fs::read(dirs[3].join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs after resuming:\n{}\n{}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b)
        );
    }
}

#[test]
fn pretrain_runner_trains_a_fresh_model_from_its_tokenizer() {
    use rudder_schema::kinds::PretrainParams;
    let tmp = tempfile::tempdir().unwrap();
    // Text data: the SFT prompts and completions, one per line.
    let text: String = std::fs::read_to_string(fixtures().join("sft.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!(
                "{}{}\n",
                v["prompt"].as_str().unwrap(),
                v["completion"].as_str().unwrap()
            )
            .replace("\nAnswer:", " Answer:")
        })
        .collect();
    let data = tmp.path().join("text.txt");
    std::fs::write(&data, text).unwrap();
    let spec: rudder_schema::ModelSpec = serde_json::from_value(serde_json::json!({
        "arch": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    }))
    .unwrap();
    let params = PretrainParams {
        learning_rate: 1e-2,
        max_length: 16,
        train: TrainArgs {
            batch_size: 8,
            max_steps: Some(12),
            logging_steps: 4,
            ..TrainArgs::default()
        },
        ..PretrainParams::default()
    };
    let run_once = |name: &str| {
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let inputs = vec![
            input(
                "model",
                None,
                InputKind::FreshModel {
                    spec: spec.clone(),
                    tokenizer: Some(fixtures().join("tokenizer")),
                },
            ),
            input(
                "data",
                Some(data.clone()),
                InputKind::Dataset {
                    format: DataFormat::Txt,
                    columns: BTreeMap::new(),
                },
            ),
        ];
        let outcome = run("pretrain", &params, inputs, &out, false).unwrap();
        (out, outcome)
    };
    let (out, outcome) = run_once("a");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 3);
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[2]["loss"].as_f64().unwrap();
    // From about ln(512) = 6.24 downwards.
    assert!(first > 5.5 && last < first - 0.5, "{first} -> {last}");
    assert!(outcome.summary["sequences"] > 8.0);
    let (cfg, _) = load_causal_lm(&out, &Default::default()).unwrap();
    assert_eq!((cfg.vocab_size, cfg.hidden_size), (512, 32));
    Tokenizer::from_dir(&out).unwrap();
    // The same stage gives the same bytes.
    let (again, _) = run_once("b");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&out) == weights(&again));
}

/// Runs a TR-DPO `dpo` stage (no cached reference) with a persistent work directory.
fn run_synced_dpo_in(
    params: &rudder_schema::kinds::DpoParams,
    models: &Path,
    out: &Path,
    work: &Path,
    interrupt_at: Option<u64>,
) -> StageResult {
    let flag = AtomicBool::new(false);
    let progress = InterruptAt {
        step: interrupt_at.unwrap_or(u64::MAX),
        flag: &flag,
    };
    let ctx = StageContext {
        name: "dpo",
        kind: "dpo",
        key: Key::from_hex(&"3".repeat(64)).unwrap(),
        spec: params,
        part: None,
        inputs: vec![
            input("model", Some(models.join("policy")), InputKind::Model),
            input(
                "reference",
                Some(models.join("reference")),
                InputKind::Model,
            ),
            dataset("prefs.jsonl"),
        ],
        out_dir: out,
        work_dir: work,
        recipe_dir: out,
        seed: 5,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        progress: &progress,
        interrupted: &flag,
    };
    use rudder_engine::runner::Runner;
    rudder_stages::kind::runner::<rudder_stages::kinds::dpo::Dpo>().run(&ctx)
}

fn synced_dpo(alpha: f64, every: u64, steps: u64) -> rudder_schema::kinds::DpoParams {
    rudder_schema::kinds::DpoParams {
        learning_rate: 1e-3,
        sync_ref_model: true,
        ref_model_mixup_alpha: alpha,
        ref_model_sync_steps: every,
        train: TrainArgs {
            batch_size: 4,
            max_steps: Some(steps),
            checkpoint_every: 0,
            logging_steps: 1,
            ..TrainArgs::default()
        },
        ..Default::default()
    }
}

#[test]
fn tr_dpo_moves_its_reference_onto_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    model_dir("policy", tmp.path());
    model_dir("reference", tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let work = tempfile::tempdir().unwrap();
    // alpha 1 after every step: from step 2 on the reference is the policy, so every log-ratio
    // is zero and the sigmoid loss is ln 2.
    run_synced_dpo_in(&synced_dpo(1.0, 1, 3), tmp.path(), &out, work.path(), None).unwrap();
    let lines = metrics(&out);
    assert!((lines[0]["loss"].as_f64().unwrap() - 2f64.ln()).abs() > 1e-3);
    for line in &lines[1..] {
        let loss = line["loss"].as_f64().unwrap();
        assert!((loss - 2f64.ln()).abs() < 1e-6, "{loss}");
        assert!(line["rewards/margins"].as_f64().unwrap().abs() < 1e-6);
    }
}

#[test]
fn interrupted_tr_dpo_resumes_with_its_moving_reference() {
    let tmp = tempfile::tempdir().unwrap();
    model_dir("policy", tmp.path());
    model_dir("reference", tmp.path());
    let params = synced_dpo(0.5, 2, 6);
    let dirs: Vec<PathBuf> = ["whole", "work", "first", "second"]
        .iter()
        .map(|d| {
            let p = tmp.path().join(d);
            std::fs::create_dir_all(&p).unwrap();
            p
        })
        .collect();
    let whole_work = tempfile::tempdir().unwrap();
    run_synced_dpo_in(&params, tmp.path(), &dirs[0], whole_work.path(), None).unwrap();
    let err = run_synced_dpo_in(&params, tmp.path(), &dirs[2], &dirs[1], Some(3)).unwrap_err();
    assert!(err.to_string().contains("interrupted at step 4"), "{err}");
    assert!(dirs[1].join("checkpoint").join("reference.bpk").exists());
    run_synced_dpo_in(&params, tmp.path(), &dirs[3], &dirs[1], None).unwrap();
    for file in ["model.safetensors", "metrics.jsonl"] {
        let a = std::fs::read(dirs[0].join(file)).unwrap();
        let b = std::fs::read(dirs[3].join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs after resuming:\n{}\n{}",
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&b)
        );
    }
}
