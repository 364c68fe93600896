//! LoRA through the binary: an SFT stage with a `lora` table commits the merged model and a
//! PEFT adapter directory, every other training kind trains fresh adapters on it
//! (`merge_adapter = true`) or continues its adapter on the same base (a reward model's
//! adapter too, and each `iterative_dpo` round the previous round's), `export` writes the
//! merged model or the adapter alone, and a `[models]` node starts from an existing PEFT
//! adapter, whose files are part of its key.

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
merge_adapter = true
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
merge_adapter = true
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
merge_adapter = true
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.orpo]
kind = "orpo"
model = "sft"
merge_adapter = true
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.simpo]
kind = "simpo"
model = "sft"
merge_adapter = true
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.ppo]
kind = "ppo"
model = "sft"
merge_adapter = true
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
merge_adapter = true
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
merge_adapter = true
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
    let fixtures = common::fixtures();
    let s = Scratch::new();
    s.fixture_model("model");
    std::fs::create_dir_all(s.path("peft_adapter")).unwrap();
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
    // With `merge_adapter`, DPO trains its own adapters (q_proj and v_proj by default) on the
    // merged SFT model.
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

    // PPO's value model trains adapters of the stage's settings on its frozen base (the
    // reward model `rm`) and its score head in full, as PEFT's SEQ_CLS task does.
    let value = path("ppo").join("value");
    let value_config = adapter_config(&value);
    assert_eq!(value_config["task_type"], "SEQ_CLS");
    assert_eq!(
        value_config["modules_to_save"],
        serde_json::json!(["score"])
    );
    let value_names = tensor_names(&value.join("adapter/adapter_model.safetensors"));
    assert_eq!(value_names.len(), 9, "{value_names:?}");
    assert!(value_names.contains(&"base_model.model.score.weight".to_string()));
    // Untargeted weights are the base's, bit for bit; the score head moved.
    let embed = "model.embed_tokens.weight";
    assert_eq!(
        tensor(&value.join("model.safetensors"), embed),
        tensor(&rm.join("model.safetensors"), embed)
    );
    assert_ne!(
        tensor(&value.join("model.safetensors"), "score.weight"),
        tensor(&rm.join("model.safetensors"), "score.weight")
    );

    // Each stage's manifest records its measured peak memory, which `show` prints beside the
    // plan's estimate.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sft.join("manifest.json")).unwrap()).unwrap();
    let peak = &manifest["peak_memory"];
    assert_eq!(peak["format"], 1, "{manifest}");
    assert!(peak["bytes"].as_u64().unwrap() > 1 << 20, "{peak}");
    assert!(
        matches!(peak["scope"].as_str(), Some("stage" | "process")),
        "{peak}"
    );
    let shown = s.ok(&["show", "recipe.toml", "sft"]);
    assert!(
        shown.lines().any(|l| l.contains("memory    peak")
            && l.contains("measured")
            && l.contains("estimated")),
        "{shown}"
    );

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

    // A stage without `lora` over a model node's adapter continues it with its settings.
    let config = adapter_config(&path("from_adapter"));
    assert_eq!(config["r"], 4);
    assert_eq!(config["use_rslora"], true);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
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
    // `from_adapter` merges the model node's adapter and trains the merged model in full.
    let text = RECIPE
        .replace(
            "model = \"sft\"\nout = \"exported/adapter\"",
            "model = \"from_adapter\"\nout = \"exported/adapter\"",
        )
        .replace(
            "model = \"adapted\"\ndata",
            "model = \"adapted\"\nmerge_adapter = true\ndata",
        );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["run", "recipe.toml", "--until", "adapter_only"]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(err.contains("was not trained with `lora`"), "{err}");
}

fn adapter_config(artifact: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(artifact.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap()
}

fn tensor(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The first logged step's metrics of a stage.
fn first_step(artifact: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(artifact.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

const CONTINUED: &str = r#"
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
learning_rate = 1e-2
batch_size = 16
max_steps = 3
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.dpo]
kind = "dpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 2
shuffle = false
logging_steps = 1
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.dpo_fresh]
kind = "dpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 2
shuffle = false
logging_steps = 1
merge_adapter = true
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.sft_more]
kind = "sft"
model = "dpo"
data = "instructions"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.from_adapter]
kind = "sft"
model = "adapted"
data = "instructions"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
logging_steps = 1
lora = { r = 4, alpha = 16, use_rslora = true }
"#;

#[test]
fn a_lora_stage_continues_the_incoming_adapter_on_the_same_base() {
    let s = scratch();
    s.write("recipe.toml", CONTINUED);
    s.ok(&["run", "recipe.toml"]);
    // The continuing stages read the base the adapter was trained on (the lockfile lists it
    // among their inputs); the one that merges first does not.
    let lock = s.read("recipe.lock");
    let entry = |node: &str| -> String {
        let start = lock.find(&format!("name = \"{node}\"\n")).unwrap();
        let end = lock[start..]
            .find("[[node]]")
            .map_or(lock.len(), |e| start + e);
        lock[start..end].to_owned()
    };
    let base_input = |node: &str| format!("adapter_base = \"{}\"", s.key("recipe.toml", node));
    for node in ["dpo", "sft_more"] {
        assert!(entry(node).contains(&base_input("base")), "{}", entry(node));
    }
    assert!(entry("from_adapter").contains(&base_input("adapted")));
    assert!(!entry("dpo_fresh").contains("adapter_base"));
    assert!(!entry("sft").contains("adapter_base"));
    let path = |node: &str| {
        let out = s.ok(&["show", "recipe.toml", node, "--path"]);
        Path::new(out.trim()).to_path_buf()
    };
    let (sft, dpo, fresh, more) = (
        path("sft"),
        path("dpo"),
        path("dpo_fresh"),
        path("sft_more"),
    );

    // One adapter over one base, named in every adapter_config along the chain.
    let base = s.key("recipe.toml", "base");
    for artifact in [&sft, &dpo, &more] {
        assert_eq!(
            adapter_config(artifact)["base_model_name_or_path"],
            base.as_str()
        );
    }
    assert_eq!(
        adapter_config(&fresh)["base_model_name_or_path"],
        s.key("recipe.toml", "sft").as_str()
    );
    let weights = |artifact: &Path| artifact.join("adapter/adapter_model.safetensors");
    assert_eq!(tensor_names(&weights(&dpo)), tensor_names(&weights(&sft)));

    // The DPO policy starts as the SFT artifact (base + SFT adapter), which is also its
    // reference: at the first step the implicit rewards vanish and the loss is ln 2. A policy
    // started from the bare base would differ from the reference there.
    for artifact in [&dpo, &fresh] {
        let step = first_step(artifact);
        let margin = step["rewards/margins"].as_f64().unwrap();
        let chosen = step["rewards/chosen"].as_f64().unwrap();
        assert!(margin.abs() < 1e-5 && chosen.abs() < 1e-5, "{step}");
        assert!(
            (step["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5,
            "{step}"
        );
    }

    // Continued: DPO's A is SFT's trained A moved by two small steps. Fresh: a new draw from
    // the stage's seed (the same seed as SFT's, so SFT's initial A), which SFT's three larger
    // steps moved away from.
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let sft_a = tensor(&weights(&sft), a);
    let continued = max_abs_diff(&tensor(&weights(&dpo), a), &sft_a);
    let drawn = max_abs_diff(&tensor(&weights(&fresh), a), &sft_a);
    assert!(
        continued < 3e-3 && continued < 0.5 * drawn,
        "continued {continued}, fresh {drawn}"
    );
    // SFT's B is trained away from zero and DPO keeps it; the fresh adapter's B starts at
    // zero, so after two steps of lr 1e-3 it is near it.
    let sft_b = tensor(&weights(&sft), b);
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(max_abs_diff(&tensor(&weights(&dpo), b), &sft_b) < 0.5 * norm(&sft_b));
    assert!(norm(&tensor(&weights(&fresh), b)) < 0.5 * norm(&sft_b));

    // A model node's adapter is continued too: the SFT step starts from base + that adapter,
    // with its settings (the file's r 4, alpha 16, rsLoRA on q/v).
    let from_adapter = path("from_adapter");
    let names = tensor_names(&weights(&from_adapter));
    assert_eq!(
        names,
        tensor_names(&s.path("peft_adapter/adapter_model.safetensors"))
    );
    // The file's B is zero, so its A receives no gradient in the one step: it stays the file's
    // A exactly (a fresh adapter would be a new draw), while B moves.
    let init = s.path("peft_adapter/adapter_model.safetensors");
    assert_eq!(tensor(&weights(&from_adapter), a), tensor(&init, a));
    assert!(tensor(&weights(&from_adapter), b).iter().any(|x| *x != 0.0));

    // Cached on a second run; `merge_adapter` is in the key.
    assert!(s.to_run("recipe.toml").is_empty());
    let before = s.key("recipe.toml", "dpo");
    s.write(
        "recipe.toml",
        &CONTINUED.replace(
            "logging_steps = 1\nlora",
            "logging_steps = 1\nmerge_adapter = true\nlora",
        ),
    );
    assert_ne!(s.key("recipe.toml", "dpo"), before);
}

#[test]
fn a_continued_adapter_must_keep_its_settings() {
    let s = scratch();
    let text = CONTINUED.replacen(
        "logging_steps = 1\nlora = { r = 4, alpha = 8,",
        "logging_steps = 1\nlora = { r = 2, alpha = 8,",
        1,
    );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains("continues the LoRA adapter that `sft` trained"),
        "{err}"
    );
    assert!(err.contains("`r` is 2 here and 4 there"), "{err}");
    assert!(err.contains("merge_adapter = true"), "{err}");
    // Located at the stage's `lora.r`.
    let line = text.lines().position(|l| l.contains("r = 2")).unwrap() + 1;
    assert!(err.contains(&format!("recipe.toml:{line}:")), "{err}");
}

const CONTINUED_KINDS: &str = r#"
[recipe]
seed = 1

[models.base]
hf = "model"

[datasets.instructions]
path = "sft.jsonl"

[datasets.prefs]
path = "prefs.jsonl"

[stages.sft]
kind = "sft"
model = "base"
data = "instructions"
learning_rate = 1e-2
batch_size = 16
max_steps = 3
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.rm]
kind = "reward"
model = "base"
data = "prefs"
learning_rate = 1e-2
batch_size = 16
max_steps = 3
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.rm_more]
kind = "reward"
model = "rm"
data = "prefs"
learning_rate = 1e-4
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.rm_fresh]
kind = "reward"
model = "rm"
merge_adapter = true
data = "prefs"
learning_rate = 1e-4
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 2, alpha = 4 }

[stages.rm_from_sft]
kind = "reward"
model = "sft"
data = "prefs"
learning_rate = 1e-4
batch_size = 16
max_steps = 1
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.online]
kind = "iterative_dpo"
model = "sft"
data = "instructions"
judge = { rule = "length", target = 24 }
reference = "previous"
rounds = 2
num_samples = 3
max_new_tokens = 8
temperature = 1.0
learning_rate = 1e-3
batch_size = 4
max_length = 64
logging_steps = 1
lora = { r = 4, alpha = 8, target_modules = "all-linear" }
"#;

#[test]
fn reward_stages_and_iterative_dpo_rounds_continue_their_incoming_adapter() {
    let s = scratch();
    s.write("recipe.toml", CONTINUED_KINDS);
    s.ok(&["run", "recipe.toml"]);
    let path = |node: &str| {
        let out = s.ok(&["show", "recipe.toml", node, "--path"]);
        Path::new(out.trim()).to_path_buf()
    };
    let weights = |artifact: &Path| artifact.join("adapter/adapter_model.safetensors");
    let base = s.key("recipe.toml", "base");
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let score = "base_model.model.score.weight";

    // A reward model trained further on more data: the same adapter over the same base, its
    // A and its score moved by one small step from the incoming ones, where a fresh adapter
    // (`merge_adapter`) draws both anew.
    let (rm, more, fresh) = (path("rm"), path("rm_more"), path("rm_fresh"));
    for artifact in [&rm, &more] {
        assert_eq!(
            adapter_config(artifact)["base_model_name_or_path"],
            base.as_str()
        );
    }
    assert_eq!(
        adapter_config(&fresh)["base_model_name_or_path"],
        s.key("recipe.toml", "rm").as_str()
    );
    assert_eq!(tensor_names(&weights(&more)), tensor_names(&weights(&rm)));
    let incoming = tensor(&weights(&rm), a);
    let continued = max_abs_diff(&tensor(&weights(&more), a), &incoming);
    let drawn = max_abs_diff(&tensor(&weights(&fresh), a), &incoming);
    assert!(
        continued < 1e-3 && continued < 0.1 * drawn,
        "continued {continued}, fresh {drawn}"
    );
    // The score continues too (the merged model's score is also `rm`'s, so only the
    // continued stage is compared).
    let moved = max_abs_diff(
        &tensor(&weights(&more), score),
        &tensor(&weights(&rm), score),
    );
    assert!(moved < 1e-3, "{moved}");

    // A reward model over a LoRA language model continues its adapter on the same base, under
    // a fresh score head trained in full (a SEQ_CLS adapter over the base).
    let from_sft = path("rm_from_sft");
    let config = adapter_config(&from_sft);
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    assert_eq!(config["base_model_name_or_path"], base.as_str());
    let sft = path("sft");
    let moved = max_abs_diff(&tensor(&weights(&from_sft), a), &tensor(&weights(&sft), a));
    assert!(moved < 1e-3, "{moved}");

    // Each round continues the adapter it starts from: round 1 the SFT adapter, round 2
    // round 1's. The reference is the round's starting model (`previous`), so each round's
    // first step has no implicit reward and a loss of ln 2, which a policy started from the
    // bare base would not have; and the adapter stays over the SFT stage's base.
    let (round1, last) = (path("online/round-1"), path("online"));
    for artifact in [&round1, &last] {
        assert_eq!(
            adapter_config(artifact)["base_model_name_or_path"],
            base.as_str()
        );
        assert_eq!(
            tensor_names(&weights(artifact)),
            tensor_names(&weights(&sft))
        );
        let step = first_step(artifact);
        let margin = step["rewards/margins"].as_f64().unwrap();
        assert!(margin.abs() < 1e-5, "{step}");
        assert!(
            (step["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5,
            "{step}"
        );
    }
    // A fresh adapter would be a new Kaiming draw, as far from the incoming A as A is large;
    // a continued one is the incoming A moved by a few steps of lr 1e-3.
    let sft_a = tensor(&weights(&sft), a);
    let size = sft_a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let round1_a = tensor(&weights(&round1), a);
    let moved = [
        max_abs_diff(&round1_a, &sft_a),
        max_abs_diff(&tensor(&weights(&last), a), &round1_a),
    ];
    assert!(moved.iter().all(|m| *m < 0.1 * size), "{moved:?} of {size}");

    // The lockfile lists the base among the inputs of every continuing vertex.
    let lock = s.read("recipe.lock");
    let entry = |node: &str| -> String {
        let start = lock.find(&format!("name = \"{node}\"\n")).unwrap();
        let end = lock[start..]
            .find("[[node]]")
            .map_or(lock.len(), |e| start + e);
        lock[start..end].to_owned()
    };
    for node in ["rm_more", "rm_from_sft", "online/round-1", "online"] {
        assert!(
            entry(node).contains(&format!("adapter_base = \"{base}\"")),
            "{}",
            entry(node)
        );
    }
    assert!(s.to_run("recipe.toml").is_empty());
}

#[test]
fn continued_reward_and_round_adapters_keep_their_settings() {
    let s = scratch();
    let text = CONTINUED_KINDS.replacen(
        "max_steps = 1\nshuffle = false\nlora = { r = 2, alpha = 4 }",
        "max_steps = 1\nshuffle = false\nlora = { r = 2, alpha = 2 }",
        1,
    );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains("stage `rm_more` continues the LoRA adapter that `rm` trained"),
        "{err}"
    );
    assert!(err.contains("`alpha` is 2 here and 4 there"), "{err}");
    let line = text
        .lines()
        .position(|l| l.contains("alpha = 2 }"))
        .unwrap()
        + 1;
    assert!(err.contains(&format!("recipe.toml:{line}:")), "{err}");

    let text = CONTINUED_KINDS.replacen(
        "logging_steps = 1\nlora = { r = 4,",
        "logging_steps = 1\nlora = { r = 8,",
        1,
    );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains("stage `online` continues the LoRA adapter that `sft` trained"),
        "{err}"
    );
    assert!(err.contains("`r` is 8 here and 4 there"), "{err}");

    // `merge_adapter` over a model that carries no adapter would mean nothing.
    let text = CONTINUED_KINDS.replacen(
        "model = \"base\"\ndata = \"prefs\"\n",
        "model = \"base\"\ndata = \"prefs\"\nmerge_adapter = true\n",
        1,
    );
    s.write("recipe.toml", &text);
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(err.contains("`base` carries no adapter"), "{err}");
    let line = text
        .lines()
        .position(|l| l.contains("merge_adapter"))
        .unwrap()
        + 1;
    assert!(err.contains(&format!("recipe.toml:{line}:")), "{err}");
}

/// A policy that continues a model node's adapter, with the bare base as its `reference`: the
/// reference is that base, not the starting policy, although both read the same directory.
const REFERENCE: &str = r#"
[recipe]
seed = 1

[models.base]
hf = "model"

[datasets.instructions]
path = "sft.jsonl"

[stages.sft]
kind = "sft"
model = "base"
data = "instructions"
learning_rate = 1e-2
batch_size = 16
max_steps = 3
shuffle = false
lora = { r = 4, alpha = 8 }
"#;

const GRPO_AGAINST: &str = r#"
[models.tuned]
hf = "model"
adapter = "trained_adapter"

[stages.against_base]
kind = "grpo"
model = "tuned"
reference = "base"
reward = { rule = "length", target = 20 }
data = "instructions"
learning_rate = 1e-4
beta = 0.04
num_generations = 2
num_iterations = 1
rollout_batch_size = 2
response_length = 8
batch_size = 2
lora = { r = 4, alpha = 8 }

[stages.against_itself]
kind = "grpo"
model = "tuned"
reward = { rule = "length", target = 20 }
data = "instructions"
learning_rate = 1e-4
beta = 0.04
num_generations = 2
num_iterations = 1
rollout_batch_size = 2
response_length = 8
batch_size = 2
lora = { r = 4, alpha = 8 }
"#;

#[test]
fn a_continued_policy_is_measured_against_the_reference_it_names() {
    let s = scratch();
    s.write("recipe.toml", REFERENCE);
    s.ok(&["run", "recipe.toml"]);
    let sft = s.ok(&["show", "recipe.toml", "sft", "--path"]);
    std::fs::create_dir_all(s.path("trained_adapter")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            Path::new(sft.trim()).join("adapter").join(file),
            s.path(&format!("trained_adapter/{file}")),
        )
        .unwrap();
    }
    s.write("recipe.toml", &format!("{REFERENCE}{GRPO_AGAINST}"));
    s.ok(&["run", "recipe.toml"]);
    let kl = |node: &str| {
        let out = s.ok(&["show", "recipe.toml", node, "--path"]);
        first_step(Path::new(out.trim()))["objective/kl"]
            .as_f64()
            .unwrap()
    };
    // Before any update the policy is base + the trained adapter: as far from the bare base as
    // SFT moved it, and exactly its own starting point.
    let (against_base, against_itself) = (kl("against_base"), kl("against_itself"));
    assert!(against_base.abs() > 1e-4, "{against_base}");
    assert!(against_itself.abs() < 1e-6, "{against_itself}");
}

/// LoRA SFT, then DPO without a `lora` table: DPO continues SFT's adapter (TRL's behaviour for
/// a `PeftModel` given no `peft_config`), keyed as the same table written out; with
/// `merge_adapter = true` and no table it trains the merged model in full.
const INHERITED: &str = r#"
[recipe]
seed = 1

[models.base]
hf = "model"

[datasets.instructions]
path = "sft.jsonl"

[datasets.prefs]
path = "prefs.jsonl"

[stages.sft]
kind = "sft"
model = "base"
data = "instructions"
learning_rate = 1e-2
batch_size = 16
max_steps = 2
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.dpo]
kind = "dpo"
model = "sft"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false

[stages.full]
kind = "dpo"
model = "sft"
merge_adapter = true
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
"#;

#[test]
fn a_stage_without_lora_continues_the_adapter_of_its_model() {
    let s = scratch();
    s.write("recipe.toml", INHERITED);
    let inherited = s.key("recipe.toml", "dpo");
    let written = INHERITED.replacen(
        "max_steps = 1\nshuffle = false\n",
        "max_steps = 1\nshuffle = false\nlora = { r = 4, alpha = 8, target_modules = \"all-linear\" }\n",
        1,
    );
    s.write("explicit.toml", &written);
    assert_eq!(s.key("explicit.toml", "dpo"), inherited);

    s.ok(&["run", "recipe.toml"]);
    let path = |node: &str| {
        let out = s.ok(&["show", "recipe.toml", node, "--path"]);
        Path::new(out.trim()).to_path_buf()
    };
    let (sft, dpo, full) = (path("sft"), path("dpo"), path("full"));
    // DPO's first step starts from SFT's adapter: policy = reference, loss ln 2.
    let first = first_step(&dpo);
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    let config = adapter_config(&dpo);
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"], "all-linear");
    let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let moved = max_abs_diff(
        &tensor(&dpo.join("adapter/adapter_model.safetensors"), a),
        &tensor(&sft.join("adapter/adapter_model.safetensors"), a),
    );
    assert!(moved > 0.0 && moved < 1e-2, "{moved}");
    // Merged first, then trained in full: no adapter.
    assert!(!full.join("adapter").exists());
    assert_eq!(tensor_names(&full.join("model.safetensors")).len(), 21);
}
