//! Training stages through the binary: an SFT stage on the fixture model trains, commits a
//! Hugging Face directory with metrics, is cached on re-run, and its model generates.

mod common;

use std::path::Path;

use common::Scratch;

fn scratch() -> Scratch {
    let fixtures = common::fixtures();
    let s = Scratch::new();
    s.fixture_model("model");
    std::fs::copy(fixtures.join("sft.jsonl"), s.path("sft.jsonl")).unwrap();
    s.write(
        "recipe.toml",
        r#"
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
learning_rate = 1e-3
batch_size = 16
max_steps = 3
logging_steps = 1
shuffle = false
lr_scheduler_type = "constant"
"#,
    );
    s
}

#[test]
fn sft_trains_commits_and_is_cached() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
    let dir = Path::new(dir.trim());
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "manifest.json",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing from the artifact");
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 3);
    for key in [
        "step",
        "loss",
        "learning_rate",
        "grad_norm",
        "mean_token_accuracy",
        "num_tokens",
    ] {
        assert!(
            steps[0].get(key).is_some(),
            "metrics.jsonl lacks {key}: {}",
            steps[0]
        );
    }
    assert!(steps[2]["loss"].as_f64().unwrap() < steps[0]["loss"].as_f64().unwrap());
    assert!(s.to_run("recipe.toml").is_empty());
    // The trained model generates through the CLI.
    let out: serde_json::Value = serde_json::from_str(&s.ok(&[
        "generate",
        "recipe.toml",
        "sft",
        "--prompt",
        "Question: What color is grass?\nAnswer:",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["completions"].as_array().unwrap().len(), 1);
    // A parameter change re-runs it and says why.
    let plan = s.ok(&[
        "plan",
        "recipe.toml",
        "--set",
        "stages.sft.learning_rate=5e-4",
    ]);
    assert!(plan.contains("learning_rate: 0.001 -> 0.0005"), "{plan}");
}

#[test]
fn the_cpu_backend_is_bit_identical_run_after_run() {
    let a = scratch();
    let b = scratch();
    a.ok(&["run", "recipe.toml"]);
    b.ok(&["run", "recipe.toml"]);
    let weights = |s: &Scratch| {
        let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
        std::fs::read(Path::new(dir.trim()).join("model.safetensors")).unwrap()
    };
    assert!(
        weights(&a) == weights(&b),
        "two runs of the same recipe differ"
    );
    assert_eq!(
        a.read("recipe.lock")
            .replace(a.dir.path().to_str().unwrap(), ""),
        b.read("recipe.lock")
            .replace(b.dir.path().to_str().unwrap(), "")
    );
}

#[test]
fn a_bad_data_row_fails_before_training_naming_file_row_and_field() {
    let s = scratch();
    let mut data = std::fs::read_to_string(s.path("sft.jsonl")).unwrap();
    data.push_str("{\"prompt\": \"x\", \"completion\": 5}\n");
    s.write("sft.jsonl", &data);
    let out = s.rudder(&["run", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(
        err.contains("sft.jsonl: row 17: field `completion`"),
        "{err}"
    );
    assert_eq!(s.objects(), 0);
}

/// SIGKILL in the middle of a training stage, then a re-run, gives the same artifact as a run
/// that was never interrupted: it resumes from the last checkpoint in the store's work
/// directory, and the killed attempt never leaves a partial artifact.
#[test]
fn a_killed_training_stage_resumes_to_the_same_weights() {
    let long = |s: &Scratch| {
        let text = s
            .read("recipe.toml")
            .replace("max_steps = 3", "max_steps = 120\ncheckpoint_every = 10");
        s.write("recipe.toml", &text);
    };
    let whole = scratch();
    long(&whole);
    whole.ok(&["run", "recipe.toml"]);
    let artifact = |s: &Scratch, file: &str| {
        let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
        std::fs::read(Path::new(dir.trim()).join(file)).unwrap()
    };

    let killed = scratch();
    long(&killed);
    common::run_killed_after_first_checkpoint(&killed);
    killed.ok(&["run", "recipe.toml"]);
    assert!(
        artifact(&whole, "model.safetensors") == artifact(&killed, "model.safetensors"),
        "resumed weights differ"
    );
    assert_eq!(
        artifact(&whole, "metrics.jsonl"),
        artifact(&killed, "metrics.jsonl")
    );
}

/// An `export` stage writes the model outside the store; it is cached while the copy exists and
/// runs again, saying why, once the copy is gone.
#[test]
fn export_writes_the_model_out_and_rewrites_it_when_it_is_gone() {
    let s = scratch();
    let text = s.read("recipe.toml");
    s.write(
        "recipe.toml",
        &format!(
            "{text}\n[stages.publish]\nkind = \"export\"\nmodel = \"sft\"\nout = \"exported/sft\"\n"
        ),
    );
    s.ok(&["run", "recipe.toml"]);
    let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
    let artifact = std::fs::read(Path::new(dir.trim()).join("model.safetensors")).unwrap();
    let exported = || std::fs::read(s.path("exported/sft/model.safetensors")).unwrap();
    assert!(exported() == artifact);
    assert!(s.path("exported/sft/tokenizer.json").is_file());
    assert!(!s.path("exported/sft/manifest.json").exists());
    // The store's files are read-only; the exported copies are the user's to change.
    for file in ["model.safetensors", "tokenizer.json"] {
        use std::os::unix::fs::PermissionsExt;
        let stored = std::fs::metadata(Path::new(dir.trim()).join(file)).unwrap();
        assert_eq!(
            stored.permissions().mode() & 0o222,
            0,
            "{file} in the store"
        );
        let copy = std::fs::metadata(s.path(&format!("exported/sft/{file}"))).unwrap();
        assert_ne!(copy.permissions().mode() & 0o200, 0, "exported {file}");
    }
    assert!(s.to_run("recipe.toml").is_empty());

    std::fs::remove_dir_all(s.path("exported")).unwrap();
    let plan = s.plan("recipe.toml");
    let publish = plan.iter().find(|n| n.0 == "publish").unwrap();
    assert_eq!(publish.1, "run");
    assert_eq!(publish.3, vec!["exported/sft is missing".to_string()]);
    assert_eq!(s.to_run("recipe.toml"), vec!["publish"]);
    s.ok(&["run", "recipe.toml"]);
    assert!(exported() == artifact);
}
