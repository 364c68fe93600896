//! `rudder generate` end to end on the tiny fixture model: greedy decoding reproduces the
//! token ids that transformers generated (greedy.json).

mod common;

use std::path::Path;

use common::Scratch;

#[test]
fn greedy_generation_matches_transformers() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let s = Scratch::new();
    // A Hugging Face directory as a user has it: weights, config and tokenizer together.
    for file in [
        "policy/config.json",
        "policy/model.safetensors",
        "policy/generation_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ] {
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        std::fs::create_dir_all(s.path("model")).unwrap();
        std::fs::copy(fixtures.join(file), s.path(&format!("model/{name}"))).unwrap();
    }
    s.write("recipe.toml", "[models.base]\nhf = \"model\"\n");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("greedy.json")).unwrap())
            .unwrap();
    let cases = golden["models"]["policy"].as_array().unwrap();
    let mut args = vec![
        "generate",
        "recipe.toml",
        "base",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--json",
    ];
    for case in cases {
        args.push("--prompt");
        args.push(case["prompt"].as_str().unwrap());
    }
    let out: serde_json::Value = serde_json::from_str(&s.ok(&args)).unwrap();
    let completions = out["completions"].as_array().unwrap();
    assert_eq!(completions.len(), cases.len());
    for (completion, case) in completions.iter().zip(cases) {
        assert_eq!(completion["prompt"], case["prompt"]);
        let ids = &completion["completion_ids"];
        assert_eq!(ids, &case["new_ids"], "prompt {}", case["prompt"]);
        let expected_reason =
            if case["new_ids"].as_array().unwrap().last() == Some(&serde_json::json!(2)) {
                "eos"
            } else {
                "length"
            };
        assert_eq!(completion["finish_reason"], expected_reason);
    }
}

#[test]
fn generate_names_what_is_wrong() {
    let s = Scratch::new();
    s.write(
        "recipe.toml",
        "[models.base]\nhf = \"missing\"\n[datasets.d]\npath = \"d.jsonl\"\n",
    );
    let out = s.rudder(&["generate", "recipe.toml", "d", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("`d` is not a model"),
        "{}",
        common::stderr(&out)
    );
}
