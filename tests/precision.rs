//! `precision = "bf16"` through the binary: a recipe of LoRA SFT, DPO continuing its adapter,
//! TR-DPO, a reward model, GRPO and generation runs in bf16 on `cpu`, records its precision in every
//! manifest, reproduces byte for byte in a second store, and keys apart from fp32 (a stage's
//! own `precision` and `--precision` win over the recipe's; `export`, which computes nothing in
//! a precision, keeps fp32).

mod common;

use std::path::{Path, PathBuf};

use common::Scratch;

const RECIPE: &str = r#"
[recipe]
seed = 1
precision = "bf16"

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
learning_rate = 1e-3
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
max_steps = 2
shuffle = false
lora = { r = 4, alpha = 8, target_modules = "all-linear" }

[stages.full_dpo]
kind = "dpo"
model = "base"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false
precision = "fp32"

[stages.tr_dpo]
kind = "dpo"
model = "base"
data = "prefs"
learning_rate = 1e-3
batch_size = 8
max_steps = 2
shuffle = false
sync_ref_model = true
ref_model_sync_steps = 1

[stages.rm]
kind = "reward"
model = "base"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 1
shuffle = false

[stages.grpo]
kind = "grpo"
model = "sft"
merge_adapter = true
reward = "rm"
data = "instructions"
learning_rate = 1e-4
num_generations = 2
num_iterations = 1
rollout_batch_size = 2
response_length = 8
batch_size = 2
lora = { r = 2, alpha = 4 }

[stages.gen]
kind = "generate"
model = "dpo"
data = "instructions"
batch_size = 4
max_new_tokens = 6

[stages.out]
kind = "export"
model = "dpo"
out = "exported"
"#;

fn scratch() -> Scratch {
    let fixtures = common::fixtures();
    let s = Scratch::new();
    s.fixture_model("model");
    std::fs::copy(fixtures.join("sft.jsonl"), s.path("sft.jsonl")).unwrap();
    std::fs::copy(fixtures.join("prefs.jsonl"), s.path("prefs.jsonl")).unwrap();
    s.write("recipe.toml", RECIPE);
    s
}

fn artifact(s: &Scratch, node: &str, store: &str) -> PathBuf {
    let out = s.ok(&["show", "recipe.toml", node, "--path", "--store", store]);
    PathBuf::from(out.trim())
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn total_memory(s: &Scratch, extra: &[&str]) -> (u64, u64) {
    let mut args = vec!["plan", "recipe.toml", "--json"];
    args.extend_from_slice(extra);
    let json: serde_json::Value = serde_json::from_str(&s.ok(&args)).unwrap();
    let sft = &json["memory"]["sft"];
    (
        sft["weights"].as_u64().unwrap(),
        sft["activations"].as_u64().unwrap(),
    )
}

#[test]
fn a_bf16_recipe_runs_reproduces_and_keys_apart_from_fp32() {
    let s = scratch();
    s.ok(&["run", "recipe.toml", "--store", "first"]);
    for (node, precision) in [
        ("sft", "bf16"),
        ("dpo", "bf16"),
        ("dpo/ref_logps", "bf16"),
        ("full_dpo", "fp32"),
        ("tr_dpo", "bf16"),
        ("rm", "bf16"),
        ("grpo", "bf16"),
        ("gen", "bf16"),
        // Exporting merges in fp32 whatever the recipe's precision.
        ("out", "fp32"),
    ] {
        let dir = artifact(&s, node, "first");
        assert_eq!(manifest(&dir)["precision"], precision, "{node}");
    }

    // A second store builds the same bytes: bf16 on `cpu` is exact run to run.
    s.ok(&["run", "recipe.toml", "--store", "second"]);
    for (node, file) in [
        ("sft", "adapter/adapter_model.safetensors"),
        ("dpo", "adapter/adapter_model.safetensors"),
        ("dpo", "model.safetensors"),
        ("tr_dpo", "model.safetensors"),
        ("rm", "model.safetensors"),
        ("grpo", "model.safetensors"),
        ("gen", "completions.jsonl"),
    ] {
        let read = |store: &str| std::fs::read(artifact(&s, node, store).join(file)).unwrap();
        assert!(read("first") == read("second"), "{node}/{file} differs");
    }

    // The merged model is saved in the base's dtype (fp32 here). An fp32 base is held in fp32
    // (bf16 would round it), so the weights the adapter leaves alone are the base's to the bit.
    let merged = std::fs::read(artifact(&s, "dpo", "first").join("model.safetensors")).unwrap();
    let base = std::fs::read(s.path("model/model.safetensors")).unwrap();
    let (merged, base) = (
        safetensors::SafeTensors::deserialize(&merged).unwrap(),
        safetensors::SafeTensors::deserialize(&base).unwrap(),
    );
    let norm = |st: &safetensors::SafeTensors| {
        let t = st.tensor("model.norm.weight").unwrap();
        (t.dtype(), t.data().to_vec())
    };
    assert_eq!(norm(&merged).0, safetensors::Dtype::F32);
    assert!(norm(&merged) == norm(&base));

    // `--precision fp32` re-keys every stage that computes, and only those.
    let plan: serde_json::Value = serde_json::from_str(&s.ok(&[
        "plan",
        "recipe.toml",
        "--json",
        "--store",
        "first",
        "--precision",
        "fp32",
    ]))
    .unwrap();
    let state = |node: &str| -> String {
        plan["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap_or_else(|| panic!("{node} planned"))["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for node in ["sft", "dpo", "tr_dpo", "rm", "grpo", "gen", "out"] {
        assert_eq!(state(node), "run", "{node} under --precision fp32");
    }
    assert_eq!(state("full_dpo"), "cached");
    // `rudder generate` computes in the recipe's precision; under `--precision fp32` the stage
    // is another artifact, not built yet.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "recipe.toml",
            "dpo",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--store",
            "first",
        ];
        args.extend_from_slice(extra);
        s.rudder(&args)
    };
    let out = generate(&[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello"));
    let out = generate(&["--precision", "fp32"]);
    assert!(common::stderr(&out).contains("`dpo` is not in the store"));
    let bad = s.rudder(&["plan", "recipe.toml", "--precision", "fp16"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown precision `fp16`"));

    // The estimate follows the precision: activations in bf16; this fp32 checkpoint's frozen
    // base held in fp32 with the bf16 copies of its weights (a bf16 checkpoint's would halve).
    let (bf16_weights, bf16_activations) = total_memory(&s, &[]);
    let (fp32_weights, fp32_activations) = total_memory(&s, &["--precision", "fp32"]);
    assert!(
        bf16_weights > fp32_weights,
        "{bf16_weights} vs {fp32_weights}"
    );
    assert!(
        bf16_activations < fp32_activations,
        "{bf16_activations} vs {fp32_activations}"
    );
}
