//! LoRA through the binary: an SFT stage with a `lora` table commits the merged model and a
//! PEFT adapter directory, every other training kind trains fresh adapters on it, `export` writes the merged
//! model or the adapter alone, and a `[models]` node starts from an existing PEFT adapter,
//! whose files are part of its key.

mod common;

use std::path::Path;

use common::Scratch;

const RECIPE: &str = r#"
[recipe]
seed = 1

[models.base]
hf = "model"

[models.adapted]
hf = "model"
adapter = "peft_adapter"

[datasets.instructions]
path = "sft.jsonl"

[datasets.prefs]
path = "prefs.jsonl"

[stages.sft]
kind = "sft"
model = "base"
data = "instructions"
learning_rate = 1e-3
batch_size = 16
max_steps = 2
shuffle = false
gradient_checkpointing = true
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.dpo]
kind = "dpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 2
shuffle = false
lora = { r = 2, alpha = 4, use_rslora = true }

[stages.rm]
kind = "reward"
model = "base"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.grpo]
kind = "grpo"
model = "sft"
reward = { rule = "length", target = 20 }
data = "instructions"
learning_rate = 1e-4
beta = 0.04
num_generations = 2
num_iterations = 2
rollout_batch_size = 2
response_length = 8
batch_size = 2
lora = { r = 2, alpha = 4 }

[stages.kto]
kind = "kto"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.orpo]
kind = "orpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.simpo]
kind = "simpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.ppo]
kind = "ppo"
model = "sft"
reward = "rm"
data = "instructions"
learning_rate = 1e-4
num_iterations = 1
rollout_batch_size = 2
response_length = 8
ppo_epochs = 1
num_mini_batches = 1
batch_size = 2
lora = { r = 2, alpha = 4 }

[stages.rloo]
kind = "rloo"
model = "sft"
reward = { rule = "length", target = 20 }
data = "instructions"
learning_rate = 1e-4
num_generations = 2
num_iterations = 1
rollout_batch_size = 2
response_length = 8
batch_size = 2
lora = { r = 2, alpha = 4 }

[stages.online]
kind = "iterative_dpo"
model = "sft"
data = "instructions"
judge = { rule = "length", target = 24 }
rounds = 2
num_samples = 3
max_new_tokens = 8
temperature = 1.0
learning_rate = 1e-3
batch_size = 4
max_length = 64
lora = { r = 2, alpha = 4 }

[stages.from_adapter]
kind = "sft"
model = "adapted"
data = "instructions"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false

[stages.merged]
kind = "export"
model = "sft"
out = "exported/merged"

[stages.adapter_only]
kind = "export"
model = "sft"
out = "exported/adapter"
merge = false
"#;

fn scratch() -> Scratch {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("../shared/fixtures");
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("model")).unwrap();
    std::fs::create_dir_all(s.path("peft_adapter")).unwrap();
    for file in [
        "policy/config.json",
        "policy/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ] {
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        std::fs::copy(fixtures.join(file), s.path(&format!("model/{name}"))).unwrap();
    }
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            root.join("stages/tests/data/lora/dpo_init").join(file),
            s.path(&format!("peft_adapter/{file}")),
        )
        .unwrap();
    }
    std::fs::copy(fixtures.join("sft.jsonl"), s.path("sft.jsonl")).unwrap();
    std::fs::copy(fixtures.join("prefs.jsonl"), s.path("prefs.jsonl")).unwrap();
    s.write("recipe.toml", RECIPE);
    s
}

fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

#[test]
fn lora_stages_commit_peft_adapters_and_merged_models() {
    let s = scratch();
    s.ok(&["validate", "recipe.toml"]);
    // The plan estimates each training stage's peak memory.
    let plan = s.ok(&["plan", "recipe.toml"]);
    assert!(plan.contains("estimated peak memory"), "{plan}");
    for stage in ["sft", "dpo", "from_adapter"] {
        assert!(
            plan.lines()
                .any(|l| l.trim_start().starts_with(stage) && l.contains(" = ")),
            "{plan}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["plan", "recipe.toml", "--json"])).unwrap();
    let sft_bytes = &json["memory"]["sft"];
    assert!(sft_bytes["total"].as_u64().unwrap() > sft_bytes["weights"].as_u64().unwrap());
    s.ok(&["run", "recipe.toml"]);
    let path = |node: &str| {
        let out = s.ok(&["show", "recipe.toml", node, "--path"]);
        Path::new(out.trim()).to_path_buf()
    };
    let sft = path("sft");
    let adapter = sft.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"], "all-linear");
    let names = tensor_names(&adapter.join("adapter_model.safetensors"));
    // 2 layers x 7 linear layers x (A, B).
    assert_eq!(names.len(), 28);
    assert!(
        names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        )
    );
    assert!(adapter.join("tokenizer.json").is_file());
    // The merged model beside it is a whole model, unlike the base.
    assert_eq!(tensor_names(&sft.join("model.safetensors")).len(), 21);
    assert_ne!(
        std::fs::read(sft.join("model.safetensors")).unwrap(),
        std::fs::read(s.path("model/model.safetensors")).unwrap()
    );
    // DPO trains its own adapters (q_proj and v_proj by default) on the merged SFT model.
    let dpo_names = tensor_names(&path("dpo").join("adapter/adapter_model.safetensors"));
    assert_eq!(dpo_names.len(), 8);
    assert!(
        dpo_names
            .iter()
            .all(|n| n.contains("q_proj") || n.contains("v_proj"))
    );

    // A reward model's adapter trains its score head in full, as PEFT's SEQ_CLS task does.
    let rm = path("rm");
    let rm_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rm.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rm_config["task_type"], "SEQ_CLS");
    assert_eq!(rm_config["modules_to_save"], serde_json::json!(["score"]));
    let rm_names = tensor_names(&rm.join("adapter/adapter_model.safetensors"));
    assert!(
        rm_names.contains(&"base_model.model.score.weight".to_string()),
        "{rm_names:?}"
    );
    // Every other training kind commits its q/v adapters (2 layers x 2 layers x (A, B)); GRPO
    // and PPO train them against the policy with its adapters disabled.
    for stage in ["grpo", "kto", "orpo", "simpo", "ppo", "rloo", "online"] {
        let names = tensor_names(&path(stage).join("adapter/adapter_model.safetensors"));
        assert_eq!(names.len(), 8, "{stage}: {names:?}");
    }

    // Export: the merged model without the adapter, or the adapter alone.
    assert!(s.path("exported/merged/model.safetensors").is_file());
    assert!(!s.path("exported/merged/adapter").exists());
    assert!(
        s.path("exported/adapter/adapter_model.safetensors")
            .is_file()
    );
    assert!(!s.path("exported/adapter/model.safetensors").exists());

    // Everything is cached on a second run.
    assert!(
        s.to_run("recipe.toml").is_empty(),
        "{:?}",
        s.to_run("recipe.toml")
    );

    // The adapter of a model node is part of its key by content.
    let before = s.key("recipe.toml", "adapted");
    let mut bytes = std::fs::read(s.path("peft_adapter/adapter_model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(s.path("peft_adapter/adapter_model.safetensors"), bytes).unwrap();
    assert_ne!(s.key("recipe.toml", "adapted"), before);
    assert_eq!(s.to_run("recipe.toml"), ["from_adapter"]);
}

#[test]
fn generate_refuses_a_model_node_with_an_unmerged_adapter() {
    let s = scratch();
    let out = s.rudder(&["generate", "recipe.toml", "adapted", "--prompt", "Hello"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("applies a LoRA adapter"), "{err}");
}

#[test]
fn export_of_the_adapter_needs_a_lora_stage() {
    let s = scratch();
    let text = RECIPE.replace(
        "model = \"sft\"\nout = \"exported/adapter\"",
        "model = \"from_adapter\"\nout = \"exported/adapter\"",
    );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["run", "recipe.toml", "--until", "adapter_only"]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(err.contains("was not trained with `lora`"), "{err}");
}
