//! The `evaluate` runner with a reward-model judge (the fixture `LlamaForSequenceClassification`
//! directory): each answer's score must be the reward model's value on
//! `[BOS] + BPE(prompt + completion) + [EOS]`, whatever the batching and padding.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use rudder_engine::Key;
use rudder_engine::runner::{InputKind, StageInput, StageResult};
use rudder_schema::DataFormat;
use rudder_schema::kinds::{EvaluateParams, Judge, Sampling, StageSpec};
use rudder_stages::model::load_reward_model;
use rudder_stages::tokenizer::Tokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

/// A model directory with its tokenizer.
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

fn input(role: &str, key: char, path: PathBuf, kind: InputKind) -> StageInput {
    StageInput {
        role: role.into(),
        node: role.into(),
        key: Key::from_hex(&key.to_string().repeat(64)).unwrap(),
        path: Some(path),
        kind,
    }
}

fn run(spec: &dyn StageSpec, inputs: Vec<StageInput>, out: &Path) -> StageResult {
    common::run_stage("eval", "evaluate", spec, inputs, out, 7, false)
}

#[test]
fn a_reward_model_judge_scores_each_answer_as_the_reward_stage_would() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = model_dir("policy", tmp.path());
    let rm = model_dir("rm_init", tmp.path());
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Question: What is ice made of?\\nAnswer:\"}\n{\"prompt\": \"Hi\"}\n{\"prompt\": \"The dog ran to the\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = EvaluateParams {
        models: vec!["policy".into()],
        data: "prompts".into(),
        judge: Judge::Node("rm".into()),
        num_samples: 2,
        // Rows of different lengths share a batch, so padding is exercised.
        batch_size: 4,
        sampling: Sampling {
            max_new_tokens: 5,
            temperature: 1.0,
            ..Sampling::default()
        },
        ..EvaluateParams::default()
    };
    let outcome = run(
        &params,
        vec![
            input("models[0]", 'a', policy, InputKind::Model),
            input(
                "data",
                'b',
                prompts,
                InputKind::Dataset {
                    format: DataFormat::Jsonl,
                    columns: BTreeMap::new(),
                },
            ),
            input("judge", 'c', rm.clone(), InputKind::Model),
        ],
        &out,
    )
    .unwrap();

    let samples: Vec<Value> = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 6);
    let device = rudder_stages::test_device();
    let (_, model) = load_reward_model(&rm, &device).unwrap();
    let tokenizer = Tokenizer::from_dir(&rm).unwrap();
    let eos = tokenizer.eos_id().unwrap();
    let mut total = 0.0;
    for sample in &samples {
        let text = format!(
            "{}{}",
            sample["prompt"].as_str().unwrap(),
            sample["completion"].as_str().unwrap()
        );
        let mut ids = tokenizer.encode(&text, true).unwrap();
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let expected: f32 = model.forward(ids, None).into_scalar();
        let got = sample["score"].as_f64().unwrap();
        assert!(
            (got - f64::from(expected)).abs() < 1e-4,
            "{got} vs {expected} for {text:?}"
        );
        total += got;
    }
    let mean = outcome.summary["models[0]/score"];
    assert!((mean - total / 6.0).abs() < 1e-9, "{:?}", outcome.summary);
    assert!(!outcome.summary.contains_key("models[0]/win_rate"));
    assert!(!outcome.summary.contains_key("models[0]/kl"));
}

#[test]
fn a_causal_lm_is_not_a_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = model_dir("policy", tmp.path());
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Hi\"}\n").unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = EvaluateParams {
        models: vec!["policy".into()],
        data: "prompts".into(),
        judge: Judge::Node("policy".into()),
        sampling: Sampling {
            max_new_tokens: 2,
            temperature: 0.0,
            ..Sampling::default()
        },
        ..EvaluateParams::default()
    };
    let err = run(
        &params,
        vec![
            input("models[0]", 'a', policy.clone(), InputKind::Model),
            input(
                "data",
                'b',
                prompts,
                InputKind::Dataset {
                    format: DataFormat::Jsonl,
                    columns: BTreeMap::new(),
                },
            ),
            input("judge", 'c', policy, InputKind::Model),
        ],
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("score"), "{err}");
}
