//! Preference stages through the binary: a DPO stage trains from the fixture policy against the
//! fixture reference, its reference log-probs are an internal node computed once and shared by
//! every stage with the same reference, data and tokenisation, and its first steps reproduce
//! TRL's losses.

mod common;

use std::path::Path;

use common::Scratch;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// A scratch project with `policy/` and `reference/` model directories and `prefs.jsonl`.
fn scratch(stages: &str) -> Scratch {
    let s = Scratch::new();
    for model in ["policy", "reference"] {
        std::fs::create_dir_all(s.path(model)).unwrap();
        for file in [
            format!("{model}/config.json"),
            format!("{model}/model.safetensors"),
            "tokenizer/tokenizer.json".into(),
            "tokenizer/tokenizer_config.json".into(),
        ] {
            let name = Path::new(&file).file_name().unwrap().to_str().unwrap();
            std::fs::copy(fixtures().join(&file), s.path(&format!("{model}/{name}"))).unwrap();
        }
    }
    std::fs::copy(fixtures().join("prefs.jsonl"), s.path("prefs.jsonl")).unwrap();
    s.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
seed = 1

[models.policy]
hf = "policy"

[models.reference]
hf = "reference"

[datasets.prefs]
path = "prefs.jsonl"
{stages}"#
        ),
    );
    s
}

const DPO: &str = r#"
[stages.dpo]
kind = "dpo"
model = "policy"
reference = "reference"
data = "prefs"
learning_rate = 1e-3
batch_size = 16
max_steps = 3
logging_steps = 1
shuffle = false
lr_scheduler_type = "constant"
max_grad_norm = 0.0
"#;

fn metrics(s: &Scratch, node: &str) -> Vec<serde_json::Value> {
    let dir = s.ok(&["show", "recipe.toml", node, "--path"]);
    std::fs::read_to_string(Path::new(dir.trim()).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn dpo_trains_with_cached_reference_log_probs_shared_across_stages() {
    let ipo = DPO
        .replace("[stages.dpo]", "[stages.ipo]")
        .replace("kind = \"dpo\"", "kind = \"dpo\"\nloss_type = \"ipo\"");
    let s = scratch(&format!("{DPO}{ipo}"));
    let plan = s.plan("recipe.toml");
    let names: Vec<&str> = plan.iter().map(|n| n.0.as_str()).collect();
    assert!(names.contains(&"dpo/ref_logps") && names.contains(&"ipo/ref_logps"));
    // Same reference, data and tokenisation: one key, so one computation.
    assert_eq!(
        s.key("recipe.toml", "dpo/ref_logps"),
        s.key("recipe.toml", "ipo/ref_logps")
    );
    s.ok(&["run", "recipe.toml"]);

    // TRL's first three sigmoid-DPO losses (dpo_trajectory.json).
    let trajectory: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("dpo_trajectory.json")).unwrap(),
    )
    .unwrap();
    let lines = metrics(&s, "dpo");
    assert_eq!(lines.len(), 3);
    for (line, step) in lines.iter().zip(trajectory["steps"].as_array().unwrap()) {
        let (ours, theirs) = (
            line["loss"].as_f64().unwrap(),
            step["loss"].as_f64().unwrap(),
        );
        assert!((ours - theirs).abs() / theirs < 1e-4, "{ours} vs {theirs}");
        for key in [
            "rewards/chosen",
            "rewards/accuracies",
            "logps/rejected",
            "grad_norm",
        ] {
            assert!(line[key].is_number(), "{key} logged");
        }
    }
    // The IPO loss differs from the sigmoid one from the first step.
    let ipo_loss = metrics(&s, "ipo")[0]["loss"].as_f64().unwrap();
    assert!((ipo_loss - lines[0]["loss"].as_f64().unwrap()).abs() > 1e-3);

    // A new beta re-trains the stage but not the reference log-probs.
    let text =
        s.read("recipe.toml")
            .replacen("max_grad_norm = 0.0", "max_grad_norm = 0.0\nbeta = 0.2", 1);
    s.write("recipe.toml", &text);
    assert_eq!(s.to_run("recipe.toml"), vec!["dpo"]);
    s.ok(&["run", "recipe.toml"]);
    assert!(s.to_run("recipe.toml").is_empty());

    // The artifact is a model directory that generates.
    let out = s.ok(&[
        "generate",
        "recipe.toml",
        "dpo",
        "--prompt",
        "Question: What is 2 + 2?\nAnswer:",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(out.contains("completions"));
}

#[test]
fn pairs_truncated_to_nothing_are_dropped_with_a_warning() {
    // max_length 22 leaves the shorter prompts room for completion tokens and the four longest none.
    let s = scratch(&DPO.replace("max_steps = 3", "max_steps = 1\nmax_length = 22"));
    let out = s.rudder(&["run", "recipe.toml"]);
    let stderr = common::stderr(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no completion token left"), "{stderr}");
    let loss = metrics(&s, "dpo")[0]["loss"].as_f64().unwrap();
    assert!(loss.is_finite());
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("dpo_golden.json")).unwrap())
        .unwrap()
}

#[test]
fn orpo_and_simpo_first_steps_equal_trl() {
    let one_step = DPO
        .replace("max_steps = 3", "max_steps = 1")
        .replace("reference = \"reference\"\n", "");
    let stage = |name: &str, kind: &str, extra: &str| {
        one_step
            .replace("[stages.dpo]", &format!("[stages.{name}]"))
            .replace("kind = \"dpo\"", &format!("kind = \"{kind}\"\n{extra}"))
    };
    let s = scratch(
        &[
            stage("orpo", "orpo", "beta = 0.1"),
            stage("simpo", "simpo", "beta = 0.1\nsimpo_gamma = 0.5"),
            stage(
                "cpo",
                "simpo",
                "loss_type = \"sigmoid\"\nbeta = 0.1\ncpo_alpha = 1.0",
            ),
            stage(
                "simpo_nll",
                "simpo",
                "beta = 2.0\nsimpo_gamma = 1.0\ncpo_alpha = 1.0",
            ),
        ]
        .concat(),
    );
    s.ok(&["run", "recipe.toml"]);
    let golden = golden();
    for (node, expect) in [
        ("orpo", &golden["orpo"]),
        ("simpo", &golden["cpo"]["simpo"]),
        ("cpo", &golden["cpo"]["cpo_sigmoid"]),
        ("simpo_nll", &golden["cpo"]["cpo_simpo_beta2_gamma1_alpha1"]),
    ] {
        let line = &metrics(&s, node)[0];
        let (ours, theirs) = (
            line["loss"].as_f64().unwrap(),
            expect["loss"].as_f64().unwrap(),
        );
        assert!(
            (ours - theirs).abs() / theirs.abs() < 1e-5,
            "{node}: {ours} vs {theirs}"
        );
        assert!(line["nll_loss"].is_number() && line["rewards/margins"].is_number());
    }
    assert!(metrics(&s, "orpo")[0]["log_odds_ratio"].is_number());
}

#[test]
fn kto_first_steps_equal_trl_with_and_without_a_positive_kl() {
    let one_step = DPO
        .replace("max_steps = 3", "max_steps = 1")
        .replace("batch_size = 16", "batch_size = 32")
        .replace("kind = \"dpo\"", "kind = \"kto\"");
    let stage = |name: &str, extra: &str| {
        one_step
            .replace("[stages.dpo]", &format!("[stages.{name}]"))
            .replace("kind = \"kto\"", &format!("kind = \"kto\"\n{extra}"))
    };
    let swapped = stage("kto_swapped_models", "")
        .replace("model = \"policy\"", "model = \"reference\"")
        .replace("reference = \"reference\"", "reference = \"policy\"");
    let s = scratch(
        &[
            stage("kto", ""),
            swapped,
            stage("apo_zero_unpaired", "loss_type = \"apo_zero_unpaired\""),
        ]
        .concat(),
    );
    s.ok(&["run", "recipe.toml"]);
    let golden = golden();
    for node in ["kto", "kto_swapped_models", "apo_zero_unpaired"] {
        let expect = &golden["kto"][node];
        let line = &metrics(&s, node)[0];
        let (ours, theirs) = (
            line["loss"].as_f64().unwrap(),
            expect["loss"].as_f64().unwrap(),
        );
        assert!(
            (ours - theirs).abs() / theirs.abs() < 1e-5,
            "{node}: {ours} vs {theirs}"
        );
        if node != "apo_zero_unpaired" {
            let (kl, expect_kl) = (line["kl"].as_f64().unwrap(), expect["kl"].as_f64().unwrap());
            assert!(
                (kl - expect_kl).abs() < 1e-4,
                "{node}: kl {kl} vs {expect_kl}"
            );
        }
    }
    assert!(golden["kto"]["kto_swapped_models"]["kl"].as_f64().unwrap() > 0.0);
}
