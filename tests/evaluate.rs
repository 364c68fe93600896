//! `generate` and `evaluate` through the binary: a generate stage writes a completions dataset;
//! an evaluate stage compares two fixture models with a command judge, a baseline and a
//! reference, prints its table, and is cached on re-run. A model's KL to itself is exactly 0 and
//! its win rate against itself exactly 0.5; the judge's script is part of the stage's key.

mod common;

use std::path::Path;

use common::Scratch;
use serde_json::Value;

/// Scores a completion by how many `a`s it holds.
const COUNT_A: &str = r#"import json, sys
for line in sys.stdin:
    print(json.loads(line)["completion"].count("a"))
"#;

const RECIPE: &str = r#"
[recipe]
seed = 3

[models.policy]
hf = "policy"

[models.reference]
hf = "reference"

[datasets.prompts]
path = "prompts.jsonl"

[stages.gen]
kind = "generate"
model = "policy"
data = "prompts"
num_samples = 2
batch_size = 4
max_new_tokens = 6
temperature = 1.0

[stages.eval]
kind = "evaluate"
models = ["policy", "reference"]
data = "prompts"
baseline = "policy"
reference = "reference"
num_samples = 2
batch_size = 4
max_new_tokens = 6
temperature = 1.0
judge = { command = "python3 count_a.py", deps = ["count_a.py"] }
"#;

fn scratch() -> Scratch {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let s = Scratch::new();
    for model in ["policy", "reference"] {
        std::fs::create_dir_all(s.path(model)).unwrap();
        for file in [
            format!("{model}/config.json"),
            format!("{model}/model.safetensors"),
            "tokenizer/tokenizer.json".to_owned(),
            "tokenizer/tokenizer_config.json".to_owned(),
        ] {
            let name = Path::new(&file).file_name().unwrap().to_str().unwrap();
            std::fs::copy(fixtures.join(&file), s.path(&format!("{model}/{name}"))).unwrap();
        }
    }
    s.write(
        "prompts.jsonl",
        concat!(
            "{\"prompt\": \"Question: What color is grass?\\nAnswer:\"}\n",
            "{\"prompt\": \"Question: What do birds build?\\nAnswer:\"}\n",
            "{\"prompt\": \"Complete the sentence: The dog ran to the\"}\n",
        ),
    );
    s.write("count_a.py", COUNT_A);
    s.write("recipe.toml", RECIPE);
    s
}

fn artifact(s: &Scratch, node: &str) -> std::path::PathBuf {
    let dir = s.ok(&["show", "recipe.toml", node, "--path"]);
    Path::new(dir.trim()).to_path_buf()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_and_evaluate_write_their_artifacts_and_are_cached() {
    let s = scratch();
    let out = s.rudder(&["run", "recipe.toml"]);
    let stderr = common::stderr(&out);
    assert!(out.status.success(), "{stderr}");
    // The table reaches the user.
    assert!(
        stderr.contains("win_rate") && stderr.contains("eos_fraction"),
        "{stderr}"
    );

    let completions = jsonl(&artifact(&s, "gen").join("completions.jsonl"));
    assert_eq!(completions.len(), 6);
    for (i, c) in completions.iter().enumerate() {
        assert_eq!(c["row"], i / 2);
        assert_eq!(c["sample"], i % 2);
        assert!(c["prompt"].is_string() && c["completion"].is_string());
        assert!(matches!(
            c["finish_reason"].as_str(),
            Some("eos" | "length")
        ));
    }

    let dir = artifact(&s, "eval");
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let models = eval["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    let (policy, reference) = (&models[0], &models[1]);
    assert_eq!(policy["model"], "policy");
    assert_eq!(reference["model"], "reference");
    for m in models {
        assert!(m["score"].as_f64().unwrap() >= 0.0, "{m}");
        let length = m["length"].as_f64().unwrap();
        assert!(length > 0.0 && length <= 6.0, "{m}");
        let eos = m["eos_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&eos), "{m}");
        assert!(m["kl"].as_f64().unwrap().is_finite(), "{m}");
        assert_eq!(m["samples"], 6);
    }
    // The baseline against itself ties everywhere; the reference's KL to itself is nothing.
    assert_eq!(policy["win_rate"].as_f64(), Some(0.5));
    assert_eq!(reference["kl"].as_f64(), Some(0.0));
    assert_ne!(policy["kl"].as_f64(), Some(0.0));

    let samples = jsonl(&dir.join("samples.jsonl"));
    assert_eq!(samples.len(), 12);
    for sample in &samples {
        let a = sample["completion"].as_str().unwrap().matches('a').count();
        assert_eq!(sample["score"].as_f64(), Some(a as f64), "{sample}");
    }

    // The summary metrics are recorded under the models' names.
    let metrics = s.ok(&["metrics", "recipe.toml", "--json"]);
    assert!(metrics.contains("policy/win_rate"), "{metrics}");
    assert!(metrics.contains("reference/kl"), "{metrics}");

    // Cached on re-run; a change to the judge's script re-runs only the evaluation.
    assert!(s.to_run("recipe.toml").is_empty());
    let again = s.rudder(&["run", "recipe.toml"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        common::stderr(&again)
    );
    assert!(
        again.status.success() && said.contains("ran 0 stages"),
        "{said}"
    );
    s.write("count_a.py", &COUNT_A.replace("\"a\"", "\"e\""));
    assert_eq!(s.to_run("recipe.toml"), vec!["eval".to_owned()]);
}

#[test]
fn a_failing_judge_fails_the_stage_and_names_the_command() {
    let s = scratch();
    s.write(
        "count_a.py",
        "import sys\nsys.stderr.write('judge exploded\\n')\nsys.exit(4)\n",
    );
    let out = s.rudder(&["run", "recipe.toml", "--only", "eval"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = common::stderr(&out);
    assert!(
        stderr.contains("judge command `python3 count_a.py`") && stderr.contains("judge exploded"),
        "{stderr}"
    );
}

#[test]
fn a_reward_stage_judges_an_evaluation() {
    let s = scratch();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    std::fs::copy(fixtures.join("prefs.jsonl"), s.path("prefs.jsonl")).unwrap();
    s.write(
        "recipe.toml",
        r#"
[recipe]
seed = 3

[models.policy]
hf = "policy"

[datasets.prompts]
path = "prompts.jsonl"

[datasets.prefs]
path = "prefs.jsonl"

[stages.rm]
kind = "reward"
model = "policy"
data = "prefs"
learning_rate = 1e-3
batch_size = 4
max_steps = 1

[stages.eval]
kind = "evaluate"
models = ["policy"]
data = "prompts"
judge = "rm"
max_new_tokens = 4
"#,
    );
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "eval");
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let policy = &eval["models"][0];
    assert!(policy["score"].as_f64().unwrap().is_finite(), "{eval}");
    assert!(policy.get("win_rate").is_none() && policy.get("kl").is_none());
    // Greedy by default: one answer per prompt.
    assert_eq!(jsonl(&dir.join("samples.jsonl")).len(), 3);
}
