//! Conversational data tokenised as TRL 1.16 tokenises it, against goldens written by TRL itself
//! (`data/chat/make_goldens.py`, on the reference fixture model with SmolLM2's ChatML template):
//! DPOTrainer's prompt/chosen/rejected ids and precomputed reference log-probs, with explicit and
//! implicit prompts, and SFTTrainer's assistant-only loss mask on multi-turn conversations. The
//! same pairs in ShareGPT's layout tokenise to the same ids.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rudder_schema::kinds::PreferenceTokens;
use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::logps::{PromptCompletion, sequence_logps};
use rudder_stages::model::load_causal_lm;
use rudder_stages::padding::Pad;
use rudder_stages::preference::{TokenizedPairs, tokenize_pairs};
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{Objective, SftObjective};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn chat_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(chat_data().join("golden.json")).unwrap())
        .unwrap()
}

/// A fixture model directory with the chat template `template` (a .jinja file beside the
/// goldens), as make_goldens.py builds it.
fn chat_model(weights: &str, template: &str, into: &Path) -> PathBuf {
    let dir = into.join(format!("{weights}-{template}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join(weights)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::copy(
        fixtures().join("tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["chat_template"] = Value::String(
        std::fs::read_to_string(chat_data().join(format!("{template}.jinja"))).unwrap(),
    );
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

fn pairs(tokenizer: &Tokenizer, file: &Path) -> TokenizedPairs {
    let rows = read_rows(file, Format::Jsonl, &BTreeMap::new()).unwrap();
    tokenize_pairs(
        tokenizer,
        &rows.preference_pairs().unwrap(),
        &PreferenceTokens::default(),
    )
    .unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn check_pairs_and_reference_logps(golden: &Value, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let policy = chat_model("policy", "chatml", tmp.path());
    let reference = chat_model("reference", "chatml", tmp.path());
    let tokenizer = Tokenizer::from_dir(&policy).unwrap();
    let tokenized = pairs(&tokenizer, &chat_data().join(file));
    let examples = golden["examples"].as_array().unwrap();
    assert_eq!(tokenized.pairs.len(), examples.len());
    for (pair, example) in tokenized.pairs.iter().zip(examples) {
        assert_eq!(pair.chosen.prompt, ids(&example["prompt_ids"]), "{file}");
        assert_eq!(pair.rejected.prompt, ids(&example["prompt_ids"]), "{file}");
        assert_eq!(
            pair.chosen.completion,
            ids(&example["chosen_ids"]),
            "{file}"
        );
        assert_eq!(
            pair.rejected.completion,
            ids(&example["rejected_ids"]),
            "{file}"
        );
    }
    // The reference log-probs, as the `dpo/ref_logps` part computes them.
    let device = rudder_stages::test_device();
    let (_, model) = load_causal_lm(&reference, &device).unwrap();
    let sides: Vec<&PromptCompletion> = tokenized
        .pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect();
    let logps = sequence_logps(&model, &sides, Pad::exact(0), 4);
    let mut err = 0f64;
    for (i, example) in examples.iter().enumerate() {
        for (side, key) in [
            (2 * i, "ref_chosen_logps"),
            (2 * i + 1, "ref_rejected_logps"),
        ] {
            let ours: f64 = logps[side].iter().map(|&x| f64::from(x)).sum();
            err = err.max((ours - example[key].as_f64().unwrap()).abs());
        }
    }
    println!("{file}: reference log-probs within {err:.2e} of TRL's");
    assert!(err < 1e-4, "{file}: reference log-probs differ by {err:e}");
}

#[test]
fn dpo_on_conversational_pairs_matches_trl() {
    let golden = golden();
    check_pairs_and_reference_logps(&golden["dpo"], "prefs.jsonl");
    check_pairs_and_reference_logps(&golden["dpo_implicit"], "prefs_implicit.jsonl");
}

#[test]
fn sharegpt_pairs_tokenise_as_their_trl_form() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = chat_model("policy", "chatml", tmp.path());
    let tokenizer = Tokenizer::from_dir(&policy).unwrap();
    // prefs.jsonl rewritten in LLaMA-Factory's dpo_en_demo layout: from/value, the system turn
    // in a `system` column, the answers as one message.
    let speaker = |role: &str| if role == "user" { "human" } else { "gpt" };
    let text = std::fs::read_to_string(chat_data().join("prefs.jsonl")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let mut prompt: Vec<Value> = row["prompt"].as_array().unwrap().clone();
        let system = (prompt[0]["role"] == "system").then(|| prompt.remove(0)["content"].clone());
        let convert = |m: &Value| json!({"from": speaker(m["role"].as_str().unwrap()), "value": m["content"]});
        let mut shared = json!({
            "conversations": prompt.iter().map(convert).collect::<Vec<_>>(),
            "chosen": convert(&row["chosen"][0]),
            "rejected": convert(&row["rejected"][0]),
        });
        if let Some(system) = system {
            shared["system"] = system;
        }
        out.push_str(&format!("{shared}\n"));
    }
    let sharegpt = tmp.path().join("sharegpt.jsonl");
    std::fs::write(&sharegpt, out).unwrap();
    let trl = pairs(&tokenizer, &chat_data().join("prefs.jsonl"));
    assert_eq!(pairs(&tokenizer, &sharegpt), trl);
}

#[test]
fn sft_assistant_mask_on_multi_turn_conversations_matches_trl() {
    let golden = &golden()["sft"];
    let tmp = tempfile::tempdir().unwrap();
    let rows = read_rows(
        &chat_data().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let examples = rows.sft_examples("text").unwrap();
    // The training template marks assistant output with {% generation %} (what TRL reads); the
    // plain template has no marks and the mask comes from rendering each turn's prefix. Both
    // give TRL's mask here.
    for template in ["chatml_training", "chatml"] {
        let policy = chat_model("policy", template, tmp.path());
        let tokenizer = Tokenizer::from_dir(&policy).unwrap();
        assert_eq!(
            tokenizer.has_generation_markers(),
            template == "chatml_training"
        );
        let seqs = sft::tokenize(&tokenizer, &examples, &SftTokenization::default()).unwrap();
        for (seq, expect) in seqs.iter().zip(golden["examples"].as_array().unwrap()) {
            let labels: Vec<i64> = serde_json::from_value(expect["labels"].clone()).unwrap();
            assert_eq!(seq.input_ids, ids(&expect["input_ids"]), "{template}");
            assert_eq!(seq.labels(), labels, "{template}");
        }
        // The policy's loss on the batch.
        let device = rudder_stages::test_device();
        let (_, model) = load_causal_lm(&policy, &device).unwrap();
        let objective = SftObjective { pad: Pad::exact(0) };
        let refs: Vec<_> = seqs.iter().collect();
        let out = Objective::forward(&objective, &model, &refs, &device).unwrap();
        let loss = out.loss_sum.into_scalar::<f64>() / Objective::weight(&objective, &refs);
        let expect = golden["loss"].as_f64().unwrap();
        assert!(
            (loss - expect).abs() < 1e-4,
            "{template}: loss {loss} vs {expect}"
        );
    }
}

#[test]
fn conversational_data_needs_a_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), dir.join(f)).unwrap();
    }
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let rows = read_rows(
        &chat_data().join("prefs.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let err = tokenize_pairs(
        &tokenizer,
        &rows.preference_pairs().unwrap(),
        &PreferenceTokens::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the data is conversational but the model in")
            && err.contains(&dir.display().to_string())
            && err.contains("has no chat template"),
        "{err}"
    );
}

#[test]
fn greedy_answers_to_conversational_prompts_match_transformers() {
    use rudder_schema::Backend;
    use rudder_stages::data::{Message, Turns};
    use rudder_stages::generate::{GenerateOptions, generate};

    let tmp = tempfile::tempdir().unwrap();
    let policy = chat_model("policy", "chatml", tmp.path());
    let golden = golden();
    let examples = golden["generation"]["examples"].as_array().unwrap();
    let prompts: Vec<Turns> = examples
        .iter()
        .map(|e| {
            Turns::Chat(serde_json::from_value::<Vec<Message>>(e["messages"].clone()).unwrap())
        })
        .collect();
    let tokenizer = Tokenizer::from_dir(&policy).unwrap();
    for (prompt, e) in prompts.iter().zip(examples) {
        assert_eq!(tokenizer.prompt_ids(prompt).unwrap(), ids(&e["prompt_ids"]));
    }
    let opts = GenerateOptions {
        max_new_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let out = generate(&policy, &prompts, &opts, Backend::Cpu).unwrap();
    for (completion, e) in out.iter().zip(examples) {
        assert_eq!(completion.completion_ids, ids(&e["new_ids"]));
        assert_eq!(completion.completion, e["text"].as_str().unwrap());
        assert!(
            completion.prompt.ends_with("<|bos|>assistant\n"),
            "{}",
            completion.prompt
        );
    }
}

mod kinds {
    //! The kinds as the engine runs them, on conversational data and the chat fixture model.

    use rudder_engine::Key;
    use rudder_engine::runner::{InputKind, StageInput, StageResult};
    use rudder_schema::DataFormat;
    use rudder_schema::kinds::{
        GenerateParams, LrSchedulerType, RewardParams, SaveDtype, SftParams, StageSpec, TrainArgs,
    };

    use super::*;

    fn input(role: &str, path: PathBuf, kind: InputKind) -> StageInput {
        StageInput {
            role: role.into(),
            node: role.into(),
            key: Key::from_hex(&"0".repeat(64)).unwrap(),
            path: Some(path),
            kind,
        }
    }

    fn data(path: PathBuf) -> StageInput {
        input(
            "data",
            path,
            InputKind::Dataset {
                format: DataFormat::Jsonl,
                columns: BTreeMap::new(),
            },
        )
    }

    fn run(kind: &str, spec: &dyn StageSpec, inputs: Vec<StageInput>, out: &Path) -> StageResult {
        crate::common::run_stage(kind, kind, spec, inputs, out, 42, false)
    }

    fn train(steps: u64) -> TrainArgs {
        TrainArgs {
            batch_size: 4,
            max_steps: Some(steps),
            lr_scheduler_type: LrSchedulerType::Constant,
            logging_steps: 1,
            ..TrainArgs::default()
        }
    }

    fn weights_dtypes(dir: &Path) -> Vec<String> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .iter()
            .map(|(_, v)| format!("{:?}", v.dtype()))
            .collect()
    }

    #[test]
    fn sft_reward_and_generate_take_conversational_data() {
        let tmp = tempfile::tempdir().unwrap();
        let model = chat_model("policy", "chatml", tmp.path());
        // SFT on multi-turn conversations, saved in bf16 on request.
        let sft_out = tmp.path().join("sft");
        std::fs::create_dir_all(&sft_out).unwrap();
        let params = SftParams {
            learning_rate: 1e-3,
            train: TrainArgs {
                save_dtype: SaveDtype::Bf16,
                ..train(2)
            },
            ..SftParams::default()
        };
        let outcome = run(
            "sft",
            &params,
            vec![
                input("model", model.clone(), InputKind::Model),
                data(chat_data().join("sft.jsonl")),
            ],
            &sft_out,
        )
        .unwrap();
        assert_eq!(outcome.summary["examples"], 4.0);
        assert!(weights_dtypes(&sft_out).iter().all(|d| d == "BF16"));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(sft_out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "bfloat16");
        // The trained bf16 model keeps its dtype through the next stage (`auto`).
        let reward_out = tmp.path().join("reward");
        std::fs::create_dir_all(&reward_out).unwrap();
        let params = RewardParams {
            learning_rate: 1e-3,
            train: train(2),
            ..RewardParams::default()
        };
        let outcome = run(
            "reward",
            &params,
            vec![
                input("model", sft_out.clone(), InputKind::Model),
                data(chat_data().join("prefs.jsonl")),
            ],
            &reward_out,
        )
        .unwrap();
        assert!(outcome.summary["loss"].is_finite());
        assert!(weights_dtypes(&reward_out).iter().all(|d| d == "BF16"));
        // Generation from conversational prompts keeps them conversations.
        let gen_out = tmp.path().join("generate");
        std::fs::create_dir_all(&gen_out).unwrap();
        let prompts = tmp.path().join("prompts.jsonl");
        std::fs::write(
            &prompts,
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}\n",
        )
        .unwrap();
        let params = GenerateParams {
            sampling: rudder_schema::kinds::Sampling {
                max_new_tokens: 4,
                temperature: 0.0,
                ..Default::default()
            },
            ..GenerateParams::default()
        };
        run(
            "generate",
            &params,
            vec![input("model", model, InputKind::Model), data(prompts)],
            &gen_out,
        )
        .unwrap();
        let line: Value = serde_json::from_str(
            std::fs::read_to_string(gen_out.join("completions.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            line["prompt"],
            json!([{"role": "user", "content": "Say hello."}])
        );
        assert_eq!(line["completion"][0]["role"], "assistant");
    }

    #[test]
    fn kto_rows_from_sharegpt_unpair_and_tokenise_like_pairs() {
        use rudder_stages::preference::tokenize_unpaired;
        let tmp = tempfile::tempdir().unwrap();
        let model = chat_model("policy", "chatml", tmp.path());
        let tokenizer = Tokenizer::from_dir(&model).unwrap();
        let file = tmp.path().join("kto.jsonl");
        std::fs::write(
            &file,
            concat!(
                r#"{"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}], "label": true}"#,
                "\n",
                r#"{"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}], "kto_tag": false}"#,
                "\n",
            ),
        )
        .unwrap();
        let rows = read_rows(&file, Format::Jsonl, &BTreeMap::new()).unwrap();
        let (unpaired, dropped) = tokenize_unpaired(
            &tokenizer,
            &rows.unpaired_examples().unwrap(),
            &PreferenceTokens::default(),
        )
        .unwrap();
        assert_eq!(dropped, 0);
        // The answer is the template's rendering after the prompt, end-of-turn included.
        let eos = tokenizer.eos_id().unwrap();
        let newline = tokenizer.encode("\n", false).unwrap();
        for row in &unpaired {
            let tail = &row.sequence.completion[row.sequence.completion.len() - 2..];
            assert_eq!(tail, [eos, newline[0]]);
            assert_eq!(row.sequence.prompt.first(), tokenizer.bos_id().as_ref());
        }
        assert!(unpaired[0].desirable && !unpaired[1].desirable);
        assert_eq!(unpaired[0].kl.completion, unpaired[1].sequence.completion);
    }
}
