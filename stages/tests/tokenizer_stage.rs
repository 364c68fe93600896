//! The `tokenizer` runner as the engine calls it: a BPE trained on a small text file (special
//! tokens first, known merges, any text round-trips) and on the quickstart corpus (byte-exact
//! reruns); then the chain a recipe builds from it, `tokenizer` -> fresh model -> `pretrain`:
//! the loss falls, the artifact loads and generates, and a rerun writes the same weights bit for
//! bit. Bad inputs come back as errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rudder_engine::Key;
use rudder_engine::runner::{InputKind, StageInput, StageResult};
use rudder_schema::kinds::{
    LrSchedulerType, PretrainParams, StageSpec, TokenizerParams, TrainArgs,
};
use rudder_schema::recipe::{Arch, ModelSpec};
use rudder_schema::{Backend, DataFormat};
use rudder_stages::GenerateOptions;
use rudder_stages::model::load_causal_lm;
use rudder_stages::tokenizer::Tokenizer;
use serde_json::Value;

fn corpus() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../recipes/data/corpus.txt"
    ))
    .to_path_buf()
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

fn text_data(path: &Path) -> StageInput {
    input(
        "data",
        Some(path.to_path_buf()),
        InputKind::Dataset {
            format: DataFormat::Txt,
            columns: BTreeMap::new(),
        },
    )
}

fn run(kind: &str, spec: &dyn StageSpec, inputs: Vec<StageInput>, out: &Path) -> StageResult {
    common::run_stage(kind, kind, spec, inputs, out, 7, false)
}

/// A text file of `lines` lines.
fn text_file(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn tokenizer_params(vocab_size: u32) -> TokenizerParams {
    TokenizerParams {
        data: "corpus".into(),
        vocab_size,
        chat_template: Some("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ..TokenizerParams::default()
    }
}

fn train_tokenizer(data: &Path, vocab_size: u32, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let outcome = run(
        "tokenizer",
        &tokenizer_params(vocab_size),
        vec![text_data(data)],
        out,
    )
    .unwrap();
    assert!(outcome.summary["vocab_size"] <= f64::from(vocab_size));
}

#[test]
fn tokenizer_stage_trains_a_byte_level_bpe() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(
        tmp.path(),
        "text.txt",
        &[
            "hello world",
            "hello world, hello there",
            "the world says hello",
        ],
    );
    let out = tmp.path().join("tok");
    train_tokenizer(&data, 300, &out);
    let tok = Tokenizer::from_dir(&out).unwrap();
    // Special tokens at 0.. in the order given, then the 256 byte symbols.
    for (id, name) in ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
        .iter()
        .enumerate()
    {
        assert_eq!(tok.token_id(name), Some(id as u32), "{name}");
    }
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), Some(0));
    assert!(tok.chat_template.is_some());
    // `hello` (5 times) and ` world` (3 times, `Ġworld` byte-level) are frequent enough to become
    // single tokens; the post-processor prepends BOS.
    let hello = tok.token_id("hello").expect("hello merged");
    let world = tok.token_id("Ġworld").expect("Ġworld merged");
    assert!(hello >= 5 + 256 && world >= 5 + 256);
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![1, hello, world]
    );
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        vec![hello, world]
    );
    // Anything encodes through the byte symbols and decodes back unchanged.
    let odd = "Zebra ☃ 東京\ttab";
    let ids = tok.encode(odd, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), odd);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["pre_tokenizer"]["add_prefix_space"], false);
    assert_eq!(json["decoder"]["type"], "ByteLevel");
    assert_eq!(json["post_processor"]["type"], "TemplateProcessing");
    assert_eq!(json["model"]["type"], "BPE");
}

#[test]
fn tokenizer_stage_is_byte_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    train_tokenizer(&corpus(), 512, &a);
    train_tokenizer(&corpus(), 512, &b);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let x = std::fs::read(a.join(file)).unwrap();
        let y = std::fs::read(b.join(file)).unwrap();
        assert!(x == y, "{file} differs between two runs");
    }
    assert_eq!(Tokenizer::from_dir(&a).unwrap().vocab_size(), 512);
}

#[test]
fn tokenizer_stage_refuses_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path(), "text.txt", &["some text"]);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut params = tokenizer_params(300);
    params.special_tokens = vec!["<|bos|>".into(), "<|bos|>".into()];
    let err = run("tokenizer", &params, vec![text_data(&data)], &out).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    let params = tokenizer_params(100);
    let err = run("tokenizer", &params, vec![text_data(&data)], &out).unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    let mut params = tokenizer_params(300);
    params.text_field = "body".into();
    let err = run("tokenizer", &params, vec![text_data(&data)], &out).unwrap_err();
    assert!(err.to_string().contains("body"), "{err}");
}

/// A fresh 2-layer Llama.
fn tiny_spec() -> ModelSpec {
    ModelSpec {
        hf: None,
        adapter: None,
        arch: Some(Arch::Llama),
        tokenizer: Some("tok".into()),
        vocab_size: None,
        hidden_size: Some(32),
        intermediate_size: Some(64),
        num_hidden_layers: Some(2),
        num_attention_heads: Some(4),
        num_key_value_heads: Some(2),
        head_dim: None,
        max_position_embeddings: None,
        rope_theta: None,
        rms_norm_eps: None,
        tie_word_embeddings: None,
        attention_bias: None,
        initializer_range: None,
        description: None,
    }
}

fn fresh_model(tokenizer: Option<PathBuf>) -> StageInput {
    input(
        "model",
        None,
        InputKind::FreshModel {
            spec: tiny_spec(),
            tokenizer,
        },
    )
}

fn pretrain_params(steps: u64) -> PretrainParams {
    PretrainParams {
        model: "tiny".into(),
        data: "corpus".into(),
        learning_rate: 3e-3,
        max_length: 64,
        train: TrainArgs {
            batch_size: 8,
            max_steps: Some(steps),
            lr_scheduler_type: LrSchedulerType::Constant,
            logging_steps: 1,
            ..TrainArgs::default()
        },
        ..PretrainParams::default()
    }
}

/// The first 400 lines of the quickstart corpus.
fn small_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(corpus()).unwrap();
    let lines: Vec<&str> = text.lines().take(400).collect();
    text_file(dir, "corpus.txt", &lines)
}

fn pretrain(tok: &Path, data: &Path, out: &Path, steps: u64) -> StageResult {
    std::fs::create_dir_all(out).unwrap();
    run(
        "pretrain",
        &pretrain_params(steps),
        vec![fresh_model(Some(tok.to_path_buf())), text_data(data)],
        out,
    )
}

#[test]
fn pretrain_trains_a_fresh_model_that_loads_generates_and_reproduces() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_corpus(tmp.path());
    let tok = tmp.path().join("tok");
    train_tokenizer(&data, 320, &tok);
    let out = tmp.path().join("a");
    let outcome = pretrain(&tok, &data, &out, 12).unwrap();
    assert_eq!(outcome.summary["steps"], 12.0);

    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    // A fresh model starts near ln(vocab) and learns the corpus's regularities quickly.
    let vocab = Tokenizer::from_dir(&tok).unwrap().vocab_size() as f64;
    assert!((loss(0) - vocab.ln()).abs() < 0.5, "first loss {}", loss(0));
    assert!(loss(11) < loss(0) - 1.0, "loss {} -> {}", loss(0), loss(11));

    // A Hugging Face directory: config with the tokenizer's vocabulary and special ids.
    let device = rudder_stages::test_device();
    let (cfg, _model) = load_causal_lm(&out, &device).unwrap();
    assert_eq!(cfg.vocab_size, vocab as usize);
    assert_eq!(cfg.hidden_size, 32);
    assert_eq!(cfg.num_key_value_heads, 2);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
    assert!(!cfg.tie_word_embeddings);
    let saved = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(saved.vocab_size(), vocab as usize);
    let completions = rudder_stages::generate(
        &out,
        &["Review: The film was".into()],
        &GenerateOptions {
            max_new_tokens: 8,
            temperature: 0.0,
            ..GenerateOptions::default()
        },
        Backend::Cpu,
    )
    .unwrap();
    assert!(!completions[0].completion_ids.is_empty());
    assert!(completions[0].completion_ids.len() <= 8);

    // Same inputs, same seed: the same weights, bit for bit.
    let again = tmp.path().join("b");
    pretrain(&tok, &data, &again, 12).unwrap();
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        let x = std::fs::read(out.join(file)).unwrap();
        let y = std::fs::read(again.join(file)).unwrap();
        assert!(x == y, "{file} differs between two runs");
    }
}

#[test]
fn pretrain_accepts_a_tokenizer_json_path() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_corpus(tmp.path());
    let tok = tmp.path().join("tok");
    train_tokenizer(&data, 300, &tok);
    let out = tmp.path().join("out");
    pretrain(&tok.join("tokenizer.json"), &data, &out, 1).unwrap();
    // tokenizer_config.json beside the file was read: EOS and BOS survive into the model.
    let saved = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(saved.eos_id(), Some(2));
    assert_eq!(saved.bos_id(), Some(1));
}

#[test]
fn pretrain_refuses_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_corpus(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let params = pretrain_params(1);
    // No tokenizer for the fresh model.
    let err = run(
        "pretrain",
        &params,
        vec![fresh_model(None), text_data(&data)],
        &out,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no tokenizer"), "{err}");
    // A vocab_size smaller than the tokenizer's.
    let tok = tmp.path().join("tok");
    train_tokenizer(&data, 300, &tok);
    let mut spec = tiny_spec();
    spec.vocab_size = Some(100);
    let model = input(
        "model",
        None,
        InputKind::FreshModel {
            spec,
            tokenizer: Some(tok),
        },
    );
    let err = run("pretrain", &params, vec![model, text_data(&data)], &out).unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
}
