//! The `tokenizer` runner as the engine calls it: a BPE trained on a small text file (special
//! tokens first, known merges, any text round-trips) and on the quickstart corpus (byte-exact
//! reruns). Bad settings come back as errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rudder_engine::executor::{InputKind, NoProgress, StageContext, StageInput, StageResult};
use rudder_engine::{Key, Registry};
use rudder_schema::kinds::{StageSpec, TokenizerParams};
use rudder_schema::{Backend, DataFormat, Precision};
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
    let mut registry = Registry::new();
    rudder_stages::register(&mut registry);
    let runner = registry.get(kind).expect("registered").clone();
    let work = tempfile::tempdir().unwrap();
    let flag = AtomicBool::new(false);
    let ctx = StageContext {
        name: kind,
        kind,
        key: Key::from_hex(&"1".repeat(64)).unwrap(),
        spec,
        part: None,
        inputs,
        out_dir: out,
        work_dir: work.path(),
        recipe_dir: out,
        seed: 7,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        progress: &NoProgress,
        interrupted: &flag,
    };
    runner.run(&ctx)
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
