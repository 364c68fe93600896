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

/// A fixture model with SmolLM2's ChatML template (on the fixture's `<|bos|>`/`<|eos|>`), and
/// `eos_token_id` in generation_config.json as given.
fn chat_model(s: &Scratch, eos_token_id: serde_json::Value) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let chat = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/data/chat");
    std::fs::create_dir_all(s.path("chat")).unwrap();
    for file in [
        "policy/config.json",
        "policy/model.safetensors",
        "tokenizer/tokenizer.json",
    ] {
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        std::fs::copy(fixtures.join(file), s.path(&format!("chat/{name}"))).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tokenizer/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["chat_template"] = std::fs::read_to_string(chat.join("chatml.jinja"))
        .unwrap()
        .into();
    s.write("chat/tokenizer_config.json", &config.to_string());
    s.write(
        "chat/generation_config.json",
        &serde_json::json!({"bos_token_id": 1, "eos_token_id": eos_token_id}).to_string(),
    );
    s.write("recipe.toml", "[models.chat]\nhf = \"chat\"\n");
}

fn chat_golden() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/data/chat/golden.json");
    serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(path).unwrap()).unwrap()
        ["generation"]["examples"]
        .clone()
}

#[test]
fn chat_prompts_use_the_chat_template() {
    let s = Scratch::new();
    chat_model(&s, serde_json::json!(2));
    let golden = chat_golden();
    let greedy = ["--temperature", "0", "--max-new-tokens", "16", "--json"];
    // `--chat --system`: one system and one user message.
    let mut args = vec!["generate", "recipe.toml", "chat", "--chat"];
    args.extend(["--system", "Be brief.", "--prompt", "Describe the fox."]);
    args.extend(greedy);
    let out: serde_json::Value = serde_json::from_str(&s.ok(&args)).unwrap();
    let completion = &out["completions"][0];
    assert_eq!(completion["completion_ids"], golden[1]["new_ids"]);
    assert_eq!(completion["completion"], golden[1]["text"]);
    assert!(
        completion["prompt"]
            .as_str()
            .unwrap()
            .ends_with("<|bos|>user\nDescribe the fox.<|eos|>\n<|bos|>assistant\n"),
        "{completion}"
    );
    // `--data` rows with conversational prompts use the template on their own.
    let rows: String = golden
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}\n", serde_json::json!({"prompt": e["messages"]})))
        .collect();
    s.write("prompts.jsonl", &rows);
    let mut args = vec!["generate", "recipe.toml", "chat", "--data", "prompts.jsonl"];
    args.extend(greedy);
    let out: serde_json::Value = serde_json::from_str(&s.ok(&args)).unwrap();
    for (completion, e) in out["completions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden.as_array().unwrap())
    {
        assert_eq!(completion["completion_ids"], e["new_ids"]);
    }
    // A bad row is located.
    s.write(
        "bad.jsonl",
        "{\"prompt\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n",
    );
    let out = s.rudder(&["generate", "recipe.toml", "chat", "--data", "bad.jsonl"]);
    assert_ne!(out.status.code(), Some(0));
    let err = common::stderr(&out);
    assert!(
        err.contains("bad.jsonl: row 1: field `prompt`: the prompt ends with a `assistant` turn"),
        "{err}"
    );
    // `--system` without `--chat` is a usage error.
    let out = s.rudder(&[
        "generate",
        "recipe.toml",
        "chat",
        "--system",
        "S",
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Generation stops at any of generation_config.json's `eos_token_id`s (a list in most chat
/// models), not only the tokenizer's EOS.
#[test]
fn generation_stops_at_every_eos_of_generation_config() {
    let s = Scratch::new();
    let golden = chat_golden();
    let first = golden[0]["new_ids"][0].clone();
    chat_model(&s, serde_json::json!([2, first]));
    let out: serde_json::Value = serde_json::from_str(&s.ok(&[
        "generate",
        "recipe.toml",
        "chat",
        "--chat",
        "--prompt",
        "What color is the sky?",
        "--temperature",
        "0",
        "--json",
    ]))
    .unwrap();
    let completion = &out["completions"][0];
    assert_eq!(completion["completion_ids"], serde_json::json!([first]));
    assert_eq!(completion["finish_reason"], "eos");
}
