//! Online RL stages through the binary: `ppo` against a reward model, `rloo` and `grpo` against a
//! rule, on the fixture policy. Each logs finite metrics under TRL's names, `ppo` writes its
//! value model and rollouts, and a second run finds everything cached.

mod common;

use std::path::Path;

use common::Scratch;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// A scratch project with `policy/` and `rm/` (each with the fixture tokenizer) and prompts.
fn scratch(stages: &str) -> Scratch {
    let s = Scratch::new();
    for (dir, files) in [
        (
            "policy",
            &["policy/config.json", "policy/model.safetensors"][..],
        ),
        (
            "rm",
            &["rm_init/config.json", "rm_init/model.safetensors"][..],
        ),
    ] {
        std::fs::create_dir_all(s.path(dir)).unwrap();
        for file in files.iter().copied().chain([
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
        ]) {
            let name = Path::new(file).file_name().unwrap().to_str().unwrap();
            std::fs::copy(fixtures().join(file), s.path(&format!("{dir}/{name}"))).unwrap();
        }
    }
    std::fs::copy(fixtures().join("sft.jsonl"), s.path("prompts.jsonl")).unwrap();
    s.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
seed = 3

[models.policy]
hf = "policy"

[models.rm]
hf = "rm"

[datasets.prompts]
path = "prompts.jsonl"
{stages}"#
        ),
    );
    s
}

const STAGES: &str = r#"
[stages.ppo]
kind = "ppo"
model = "policy"
reward = "rm"
data = "prompts"
learning_rate = 1e-4
num_iterations = 2
rollout_batch_size = 4
response_length = 8
ppo_epochs = 2
num_mini_batches = 2
batch_size = 2
missing_eos_penalty = 1.0
adaptive_kl = { target = 6.0, horizon = 100 }
save_rollouts = true
logging_steps = 1

[stages.rloo]
kind = "rloo"
model = "policy"
reward = { rule = "length", target = 20 }
data = "prompts"
learning_rate = 1e-4
num_generations = 2
num_iterations = 2
rollout_batch_size = 2
response_length = 8
batch_size = 2
logging_steps = 1

[stages.grpo]
kind = "grpo"
model = "policy"
reward = { rule = "length", target = 20 }
data = "prompts"
learning_rate = 1e-4
beta = 0.04
num_generations = 2
num_iterations = 2
rollout_batch_size = 2
response_length = 8
batch_size = 2
logging_steps = 1
"#;

fn artifact(s: &Scratch, node: &str) -> std::path::PathBuf {
    Path::new(s.ok(&["show", "recipe.toml", node, "--path"]).trim()).to_path_buf()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn finite(line: &serde_json::Value, key: &str) -> f64 {
    let v = line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {line}"));
    assert!(v.is_finite(), "{key} = {v}");
    v
}

#[test]
fn rl_stages_train_log_finite_metrics_and_are_cached() {
    let s = scratch(STAGES);
    s.ok(&["run", "recipe.toml"]);

    let ppo = artifact(&s, "ppo");
    let metrics = lines(&ppo.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for line in &metrics {
        for key in [
            "loss",
            "learning_rate",
            "grad_norm",
            "objective/kl",
            "objective/entropy",
            "objective/rlhf_reward",
            "objective/scores",
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "val/clipfrac_avg",
            "loss/policy_avg",
            "loss/value_avg",
        ] {
            finite(line, key);
        }
    }
    // The adaptive controller moved the coefficient after the first iteration.
    assert_ne!(
        finite(&metrics[0], "objective/kl_coef"),
        finite(&metrics[1], "objective/kl_coef")
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(ppo.join(file).is_file(), "{file}");
        assert!(ppo.join("value").join(file).is_file(), "value/{file}");
    }
    let rollouts = lines(&ppo.join("rollouts.jsonl"));
    assert_eq!(rollouts.len(), 2 * 4);
    for r in &rollouts {
        assert!(r["prompt"].is_string() && r["response"].is_string());
        finite(r, "score");
        finite(r, "kl");
    }

    for node in ["rloo", "grpo"] {
        let dir = artifact(&s, node);
        let metrics = lines(&dir.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 2, "{node}");
        for line in &metrics {
            for key in [
                "loss",
                "grad_norm",
                "reward",
                "kl",
                "clip_ratio/region_mean",
            ] {
                finite(line, key);
            }
        }
        assert!(dir.join("model.safetensors").is_file());
        assert!(!dir.join("rollouts.jsonl").exists());
    }

    assert!(s.to_run("recipe.toml").is_empty());
    let objects = s.objects();
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), objects);
}

#[test]
fn rl_settings_that_do_not_apply_are_refused() {
    let s = scratch(
        r#"
[stages.ppo]
kind = "ppo"
model = "policy"
reward = "rm"
data = "prompts"
max_steps = 3
num_iterations = 1
rollout_batch_size = 2
response_length = 4
"#,
    );
    // A recipe error, found by `validate` before anything runs, pointing at the setting.
    for command in ["validate", "run"] {
        let out = s.rudder(&[command, "recipe.toml"]);
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = common::stderr(&out);
        assert!(stderr.contains("num_iterations"), "{stderr}");
        assert!(stderr.contains("max_steps = 3"), "{stderr}");
        assert!(stderr.contains("recipe.toml:"), "{stderr}");
    }
    assert_eq!(s.objects(), 0);
}

/// SIGKILL in the middle of PPO, then a re-run, ends with the policy, value model and metrics
/// of a run that was never interrupted: rollouts are seeded by iteration, and the checkpoint
/// holds both models, both optimisers and the adaptive KL coefficient.
#[test]
fn a_killed_ppo_stage_resumes_to_the_same_models() {
    let ppo = STAGES[..STAGES.find("[stages.rloo]").unwrap()].replace(
        "num_iterations = 2",
        "num_iterations = 16\ncheckpoint_every = 2",
    );
    let whole = scratch(&ppo);
    whole.ok(&["run", "recipe.toml"]);
    let killed = scratch(&ppo);
    common::run_killed_after_first_checkpoint(&killed);
    killed.ok(&["run", "recipe.toml"]);
    for file in [
        "model.safetensors",
        "value/model.safetensors",
        "metrics.jsonl",
        "rollouts.jsonl",
    ] {
        let read = |s: &Scratch| std::fs::read(artifact(s, "ppo").join(file)).unwrap();
        assert!(
            read(&whole) == read(&killed),
            "{file} differs after resuming"
        );
    }
}
