//! Stages that make their own data, through the binary: `iterative_dpo` caches every round as its
//! own node (raising `rounds` runs one round, a round-2 override re-runs rounds 2.., a run stopped
//! between rounds resumes at the next one), and `constitutional`'s outputs feed `sft` and `dpo`.

mod common;

use std::path::Path;

use common::Scratch;

/// A scratch project with the fixture policy (and its tokenizer), four prompts and `stages`.
fn scratch(stages: &str) -> Scratch {
    let s = Scratch::new();
    s.fixture_model("policy");
    s.write(
        "prompts.jsonl",
        "{\"prompt\": \"Question: What color is the sky?\\nAnswer:\"}\n\
         {\"prompt\": \"Question: How many legs does a cat have?\\nAnswer:\"}\n\
         {\"prompt\": \"Question: What is two plus two?\\nAnswer:\"}\n\
         {\"prompt\": \"Question: Where do fish live?\\nAnswer:\"}\n",
    );
    s.write("recipe.toml", &recipe(stages));
    s
}

fn recipe(stages: &str) -> String {
    format!(
        r#"
[recipe]
seed = 1

[models.policy]
hf = "policy"

[datasets.prompts]
path = "prompts.jsonl"
{stages}"#
    )
}

/// Iterative DPO with `rounds` and extra lines (overrides).
fn idpo(rounds: u32, extra: &str) -> String {
    format!(
        r#"
[stages.idpo]
kind = "iterative_dpo"
model = "policy"
data = "prompts"
judge = {{ rule = "length", target = 24 }}
rounds = {rounds}
num_samples = 3
max_new_tokens = 8
temperature = 1.0
learning_rate = 1e-3
batch_size = 4
max_length = 64
{extra}
"#
    )
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn artifact(s: &Scratch, node: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(s.ok(&["show", "recipe.toml", node, "--path"]).trim())
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn raising_rounds_runs_exactly_one_more_round() {
    let s = scratch(&idpo(2, ""));
    assert_eq!(names(&s.to_run("recipe.toml")), ["idpo/round-1", "idpo"]);
    s.ok(&["run", "recipe.toml"]);
    let old_last = s.key("recipe.toml", "idpo");
    let dir = artifact(&s, "idpo");
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "samples.jsonl",
        "pairs.jsonl",
        "rounds.jsonl",
    ] {
        assert!(dir.join(file).is_file(), "{file} in the round's artifact");
    }
    assert_eq!(json_lines(&dir.join("samples.jsonl")).len(), 12);

    s.write("recipe.toml", &recipe(&idpo(3, "")));
    // The old last round is now round 2, with the same key.
    assert_eq!(s.key("recipe.toml", "idpo/round-2"), old_last);
    assert_eq!(names(&s.to_run("recipe.toml")), ["idpo"]);
    let before = s.objects();
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), before + 1);

    // The final artifact holds the whole per-round table; `rudder metrics` shows every round.
    let rounds = json_lines(&artifact(&s, "idpo").join("rounds.jsonl"));
    let numbers: Vec<f64> = rounds
        .iter()
        .map(|r| r["round"].as_f64().unwrap())
        .collect();
    assert_eq!(numbers, [1.0, 2.0, 3.0]);
    for r in &rounds {
        assert!(r["score"].is_number() && r["pairs"].is_number() && r["ties"].is_number());
    }
    let metrics = s.ok(&["metrics", "recipe.toml"]);
    for node in ["idpo/round-1", "idpo/round-2", "idpo "] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} in\n{metrics}"));
        assert!(line.contains("score=") && line.contains("pairs="), "{line}");
    }
}

#[test]
fn a_round_two_override_reruns_rounds_two_onwards_only() {
    let s = scratch(&idpo(3, ""));
    s.ok(&["run", "recipe.toml"]);
    s.write(
        "recipe.toml",
        &recipe(&idpo(3, "round = { \"2\" = { beta = 0.3 } }")),
    );
    let plan = s.plan("recipe.toml");
    let run: Vec<&str> = plan
        .iter()
        .filter(|n| n.1 == "run")
        .map(|n| n.0.as_str())
        .collect();
    assert_eq!(run, ["idpo/round-2", "idpo"]);
    let round2 = plan.iter().find(|n| n.0 == "idpo/round-2").unwrap();
    assert!(
        round2.3.iter().any(|r| r.contains("beta")),
        "{:?}",
        round2.3
    );
    // A round-3 override leaves rounds 1 and 2 alone.
    s.ok(&["run", "recipe.toml"]);
    s.write(
        "recipe.toml",
        &recipe(&idpo(
            3,
            "round = { \"2\" = { beta = 0.3 }, \"3\" = { num_samples = 2 } }",
        )),
    );
    assert_eq!(names(&s.to_run("recipe.toml")), ["idpo"]);
}

#[test]
fn a_run_stopped_between_rounds_resumes_at_the_next_round() {
    let s = scratch(&idpo(3, "reference = \"previous\""));
    s.ok(&["run", "recipe.toml", "--until", "idpo/round-1"]);
    assert_eq!(names(&s.to_run("recipe.toml")), ["idpo/round-2", "idpo"]);
    let out = s.rudder(&["run", "recipe.toml"]);
    let status = common::stderr(&out);
    assert!(out.status.success(), "{status}");
    assert!(status.contains("ran 2 stages"), "{status}");
    assert!(s.to_run("recipe.toml").is_empty());
}

const CAI: &str = r#"
[stages.cai]
kind = "constitutional"
model = "policy"
data = "prompts"
principles = ["wrong or misleading", "rude or unkind"]
principles_per_prompt = 2
max_new_tokens = 6
temperature = 1.0

[stages.cai_fb]
kind = "constitutional"
model = "policy"
data = "prompts"
principles = "principles.txt"
ai_feedback = true
max_new_tokens = 6
temperature = 1.0

[stages.sft]
kind = "sft"
model = "policy"
data = "cai.revisions"
max_steps = 2
batch_size = 4

[stages.dpo]
kind = "dpo"
model = "policy"
data = "cai.pairs"
max_steps = 2
batch_size = 4

[stages.dpo_fb]
kind = "dpo"
model = "policy"
data = "cai_fb.pairs"
max_steps = 2
batch_size = 4
"#;

#[test]
fn constitutional_outputs_feed_sft_and_dpo() {
    let s = scratch(CAI);
    s.write(
        "principles.txt",
        "# what a good answer avoids\nwrong or misleading\n\nrude or unkind\n",
    );
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "cai");
    let revisions = json_lines(&dir.join("revisions.jsonl"));
    assert_eq!(revisions.len(), 4);
    for r in &revisions {
        assert!(r["prompt"].is_string() && r["completion"].is_string());
        assert_eq!(r["critiques"].as_array().unwrap().len(), 2);
        // Two principles per prompt out of two: each is used once.
        let mut used: Vec<&str> = r["principles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        used.sort();
        assert_eq!(used, ["rude or unkind", "wrong or misleading"]);
    }
    let pairs = json_lines(&dir.join("pairs.jsonl"));
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert_ne!(p["chosen"], p["rejected"]);
    }
    let feedback = json_lines(&artifact(&s, "cai_fb").join("pairs.jsonl"));
    assert!(!feedback.is_empty());
    assert!(feedback.iter().all(|p| p["logp_margin"].is_number()));
    for node in ["sft", "dpo", "dpo_fb"] {
        assert!(artifact(&s, node).join("model.safetensors").is_file());
    }
    // Generations are cached: changing a downstream stage re-runs only that stage.
    s.write(
        "recipe.toml",
        &recipe(&CAI.replace(
            "max_steps = 2\nbatch_size = 4\n\n[stages.dpo]",
            "max_steps = 3\nbatch_size = 4\n\n[stages.dpo]",
        )),
    );
    assert_eq!(names(&s.to_run("recipe.toml")), ["sft"]);
}

#[test]
fn a_judge_scripts_content_is_in_every_rounds_key() {
    let stage = idpo(2, "").replace(
        "judge = { rule = \"length\", target = 24 }",
        "judge = { command = \"python3 judge.py\", deps = [\"judge.py\"] }",
    );
    let s = scratch(&stage);
    s.write("judge.py", "print(1)\n");
    let before = (
        s.key("recipe.toml", "idpo/round-1"),
        s.key("recipe.toml", "idpo"),
    );
    s.write("judge.py", "print(2)\n");
    let after = (
        s.key("recipe.toml", "idpo/round-1"),
        s.key("recipe.toml", "idpo"),
    );
    assert_ne!(before.0, after.0);
    assert_ne!(before.1, after.1);
}

/// The DPO family's options work in rounds too: an MPO mix with RPO's NLL term, LD-DPO and WPO,
/// and a loss list whose weights do not match is a recipe error.
#[test]
fn rounds_take_the_dpo_options() {
    let s = scratch(&idpo(
        2,
        "loss_type = [\"sigmoid\", \"ipo\"]\nloss_weights = [1.0, 0.5]\nrpo_alpha = 0.1\n\
         ld_alpha = 0.5\nuse_weighting = true\nf_divergence_type = \"js_divergence\"",
    ));
    s.ok(&["run", "recipe.toml"]);
    let metrics = json_lines(&artifact(&s, "idpo").join("metrics.jsonl"));
    assert!(!metrics.is_empty());
    assert!(
        metrics
            .iter()
            .all(|m| m["loss"].as_f64().is_some_and(f64::is_finite))
    );

    s.write(
        "recipe.toml",
        &recipe(&idpo(
            2,
            "loss_type = [\"sigmoid\", \"ipo\"]\nloss_weights = [1.0]",
        )),
    );
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("loss_weights has 1 entries"));

    // Round overrides have the ranges of the values they override.
    s.write(
        "recipe.toml",
        &recipe(&idpo(2, "round = { \"2\" = { num_samples = 1 } }")),
    );
    let out = s.rudder(&["validate", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("num_samples"),
        "{}",
        common::stderr(&out)
    );
}
