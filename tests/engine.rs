//! End-to-end behaviour of the engine through the `rudder` binary, on command stages.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, stderr};

/// raw -> upper -> count, plus an independent `other` stage.
const RECIPE: &str = r#"
[recipe]
name = "pipeline"

[datasets.raw]
path = "raw.txt"

[stages.upper]
kind = "command"
inputs = ["raw"]
deps = ["scripts/upper.sh"]
cmd = "sh scripts/upper.sh {{ inputs.raw }} {{ out }}/upper.txt"
outputs = { text = "upper.txt" }
env = { SUFFIX = "!" }

[stages.count]
kind = "command"
inputs = ["upper.text"]
cmd = "wc -l < {{ inputs['upper.text'] }} > {{ out }}/count.txt"
outputs = { count = "count.txt" }

[stages.other]
kind = "command"
cmd = "echo independent > {{ out }}/other.txt"
outputs = { other = "other.txt" }
"#;

fn scratch() -> Scratch {
    let s = Scratch::new();
    s.write("recipe.toml", RECIPE);
    s.write("raw.txt", "alpha\nbeta\n");
    s.write(
        "scripts/upper.sh",
        "tr a-z A-Z < \"$1\" | sed \"s/\\$/$SUFFIX/\" > \"$2\"\n",
    );
    s
}

#[test]
fn rerunning_an_unchanged_recipe_runs_nothing() {
    let s = scratch();
    assert_eq!(s.to_run("recipe.toml"), ["upper", "count", "other"]);
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), 3);
    assert!(s.to_run("recipe.toml").is_empty());
    let out = s.rudder(&["run", "recipe.toml"]);
    assert!(
        stderr(&out).contains("ran 0 stages, 3 cached"),
        "{}",
        stderr(&out)
    );
    let path = s.ok(&["show", "recipe.toml", "count", "--path"]);
    assert_eq!(
        std::fs::read_to_string(format!("{}/count.txt", path.trim()))
            .unwrap()
            .trim(),
        "2"
    );
    assert!(s.path("recipe.lock").is_file());
}

#[test]
fn a_parameter_change_reruns_that_stage_and_its_descendants() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    s.write(
        "recipe.toml",
        &RECIPE.replace("SUFFIX = \"!\"", "SUFFIX = \"?\""),
    );
    let plan = s.plan("recipe.toml");
    let upper = plan.iter().find(|n| n.0 == "upper").unwrap();
    assert_eq!(upper.1, "run");
    assert_eq!(upper.3, ["env.SUFFIX: \"!\" -> \"?\""]);
    let count = plan.iter().find(|n| n.0 == "count").unwrap();
    assert_eq!(count.1, "run");
    assert_eq!(count.3, ["input upper will be rebuilt"]);
    assert_eq!(s.to_run("recipe.toml"), ["upper", "count"]);
    // `--set` is the same change without editing the file.
    s.write("recipe.toml", RECIPE);
    let out = s.ok(&[
        "plan",
        "recipe.toml",
        "--set",
        "stages.upper.env.SUFFIX=\"?\"",
    ]);
    assert!(out.contains("env.SUFFIX: \"!\" -> \"?\""), "{out}");
}

#[test]
fn writing_a_default_or_renaming_a_node_changes_no_key() {
    let s = scratch();
    let before = s.plan("recipe.toml");
    let explicit = RECIPE.replace("name = \"pipeline\"", "name = \"pipeline\"\nseed = 0\nbackend = \"cpu\"").replace(
        "outputs = { other = \"other.txt\" }",
        "outputs = { other = \"other.txt\" }\ndeps = []\nenv = {}\ninputs = []\nprecision = \"fp32\"",
    );
    s.write("recipe.toml", &explicit);
    let after = s.plan("recipe.toml");
    let keys = |plan: &[(String, String, String, Vec<String>)]| {
        plan.iter().map(|n| n.2.clone()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&before), keys(&after));
    let renamed = RECIPE
        .replace("[datasets.raw]", "[datasets.source]")
        .replace("inputs = [\"raw\"]", "inputs = [\"source\"]")
        .replace("{{ inputs.raw }}", "{{ inputs.source }}")
        .replace("[stages.upper]", "[stages.shout]")
        .replace("upper.text", "shout.text");
    s.write("recipe.toml", &renamed);
    let renamed_plan = s.plan("recipe.toml");
    assert_eq!(keys(&before), keys(&renamed_plan));
    assert_eq!(renamed_plan[1].0, "shout");
}

#[test]
fn editing_data_or_a_dependency_reruns_its_consumers_only() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    s.write("raw.txt", "alpha\nbeta\ngamma\n");
    let plan = s.plan("recipe.toml");
    assert_eq!(
        plan.iter().find(|n| n.0 == "upper").unwrap().3,
        ["inputs[0] raw changed (content)"]
    );
    assert_eq!(s.to_run("recipe.toml"), ["upper", "count"]);
    s.ok(&["run", "recipe.toml"]);
    let path = s.ok(&["show", "recipe.toml", "count", "--path"]);
    assert_eq!(
        std::fs::read_to_string(format!("{}/count.txt", path.trim()))
            .unwrap()
            .trim(),
        "3"
    );
    s.write("scripts/upper.sh", "tr a-z A-Z < \"$1\" > \"$2\"\n");
    let plan = s.plan("recipe.toml");
    assert_eq!(
        plan.iter().find(|n| n.0 == "upper").unwrap().3,
        ["dependency scripts/upper.sh changed (content)"]
    );
    assert_eq!(s.to_run("recipe.toml"), ["upper", "count"]);
}

#[test]
fn a_failing_command_commits_nothing_and_keeps_earlier_artifacts() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let lock_before = s.read("recipe.lock");
    let failing = RECIPE.replace(
        "cmd = \"echo independent > {{ out }}/other.txt\"",
        "cmd = \"echo partial > {{ out }}/other.txt; echo boom >&2; exit 3\"\nenv = { X = \"1\" }",
    );
    s.write("recipe.toml", &failing);
    let out = s.rudder(&["run", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("exit code 3") && err.contains("boom"), "{err}");
    assert_eq!(s.objects(), 3);
    assert_eq!(s.read("recipe.lock"), lock_before);
    assert_eq!(s.to_run("recipe.toml"), ["other"]);
    // A missing declared output fails the same way.
    s.write(
        "recipe.toml",
        &RECIPE.replace("> {{ out }}/other.txt", "> {{ out }}/elsewhere.txt"),
    );
    let out = s.rudder(&["run", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("declared output(s): other.txt"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s.objects(), 3);
}

#[test]
fn sigkill_mid_stage_leaves_no_partial_artifact() {
    let s = scratch();
    let slow = RECIPE.replace(
        "cmd = \"echo independent > {{ out }}/other.txt\"",
        "cmd = \"echo started > {{ out }}/other.txt; touch started.flag; sleep 30\"\nsandbox = false",
    );
    s.write("recipe.toml", &slow);
    // One stage at a time, so that `upper` and `count` are done when `other` starts.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(["run", "recipe.toml", "-j", "1"])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !s.path("started.flag").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the stage never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // upper and count finished before; the killed stage left nothing visible.
    assert_eq!(s.objects(), 2);
    assert_eq!(s.to_run("recipe.toml"), ["other"]);
    s.write("recipe.toml", &slow.replace("; sleep 30", ""));
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), 3);
    assert!(
        std::fs::read_dir(s.path(".rudder/tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn concurrent_runs_on_one_store_stay_consistent() {
    let s = scratch();
    s.write(
        "recipe.toml",
        &RECIPE.replace("echo independent", "sleep 1; echo independent"),
    );
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_rudder"))
            .args(["run", "recipe.toml"])
            .current_dir(s.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    // Each stage was built by exactly one of them (the other waited for its key's lock and
    // found it built), whichever took which.
    let built: usize = [&a, &b]
        .iter()
        .map(|o| stderr(o).matches("done in").count())
        .sum();
    assert_eq!(built, 3, "{}\n---\n{}", stderr(&a), stderr(&b));
    assert_eq!(s.objects(), 3);
    assert!(s.to_run("recipe.toml").is_empty());
}

#[test]
fn selection_only_until_and_force() {
    let s = scratch();
    assert_eq!(s.ok(&["run", "recipe.toml", "--until", "upper"]).len(), 0);
    assert_eq!(s.objects(), 1);
    let out = s.rudder(&["run", "recipe.toml", "--only", "other"]);
    assert!(out.status.success());
    assert_eq!(s.objects(), 2);
    s.ok(&["run", "recipe.toml"]);
    let plan = s.ok(&["plan", "recipe.toml", "--force", "upper"]);
    assert!(plan.contains("forced"), "{plan}");
    let out = s.rudder(&["run", "recipe.toml", "--force", "upper"]);
    assert!(stderr(&out).contains("ran 1 stage,"), "{}", stderr(&out));
    let out = s.rudder(&["plan", "recipe.toml", "--only", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no node named `nope`"));
}

#[test]
fn gc_removes_what_no_lockfile_references() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    s.write(
        "recipe.toml",
        &RECIPE.replace("SUFFIX = \"!\"", "SUFFIX = \"?\""),
    );
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), 5);
    let dry = s.ok(&["gc", "--store", ".rudder", "--dry-run", "recipe.lock"]);
    assert_eq!(dry.matches("would remove").count(), 2, "{dry}");
    assert_eq!(s.objects(), 5);
    s.ok(&["gc", "--store", ".rudder", "recipe.lock"]);
    assert_eq!(s.objects(), 3);
    assert!(s.to_run("recipe.toml").is_empty());
}

#[test]
fn dag_formats() {
    let s = scratch();
    let text = s.ok(&["dag", "recipe.toml"]);
    assert!(
        text.contains("count (command) <- inputs[0]: upper.text"),
        "{text}"
    );
    let dot = s.ok(&["dag", "recipe.toml", "--format", "dot"]);
    assert!(dot.contains("\"upper\" -> \"count\""), "{dot}");
    let mermaid = s.ok(&["dag", "recipe.toml", "--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
}

#[test]
fn preference_keys_ignore_names_and_defaults_and_a_failed_part_commits_nothing() {
    let s = Scratch::new();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    s.write(
        "recipe.toml",
        &format!(
            "[datasets.prefs]\npath = \"prefs.jsonl\"\n\n[models.base]\nhf = \"{}\"\n\n[stages.dpo]\nkind = \"dpo\"\nmodel = \"base\"\ndata = \"prefs\"\n",
            fixtures.join("policy").display()
        ),
    );
    s.write(
        "prefs.jsonl",
        "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\"}\n",
    );
    s.ok(&["validate", "recipe.toml"]);
    let plan = s.plan("recipe.toml");
    let names: Vec<&str> = plan.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(names, ["prefs", "base", "dpo/ref_logps", "dpo"]);
    assert!(s.ok(&["dag", "recipe.toml"]).contains(
        "dpo (dpo) <- model: base, reference: base, data: prefs, ref_logps: dpo/ref_logps"
    ));
    // Writing the default `reference` explicitly changes no key.
    let key = s.key("recipe.toml", "dpo");
    let text = s.read("recipe.toml");
    s.write(
        "recipe.toml",
        &format!("{text}reference = \"base\"\nbeta = 0.1\n"),
    );
    assert_eq!(s.key("recipe.toml", "dpo"), key);
    // Renaming the model node changes no key either: references enter keys as their
    // targets' keys, never as names.
    let renamed = text
        .replace("[models.base]", "[models.start]")
        .replace("model = \"base\"", "model = \"start\"");
    s.write("recipe.toml", &renamed);
    assert_eq!(s.key("recipe.toml", "dpo"), key);
    // The fixture directory has no tokenizer, so the reference log-probs cannot be computed:
    // the part fails, names the problem, and nothing is committed.
    let out = s.rudder(&["run", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no tokenizer.json"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s.objects(), 0);
}

#[test]
fn broken_recipes_exit_2_without_panicking() {
    let s = scratch();
    let cases = [
        RECIPE[..RECIPE.len() / 2].to_owned(),
        RECIPE.replace("kind = \"command\"", "kind = 7"),
        RECIPE.replace("inputs = [\"raw\"]", "inputs = [\"upper\"]"),
        RECIPE.replace(
            "[stages.other]\nkind = \"command\"",
            "[stages.other]\nkind = \"command\"\nafter = [\"count\", \"other\"]",
        ),
        format!(
            "{RECIPE}\n[stages.upper2]\nkind = \"command\"\ninputs = [\"upper3\"]\ncmd = \"x\"\noutputs = {{ a = \"a\" }}\n[stages.upper3]\nkind = \"command\"\ninputs = [\"upper2\"]\ncmd = \"x\"\noutputs = {{ a = \"a\" }}\n"
        ),
        "\u{0}\u{1}[[[".to_owned(),
        format!("x = {}1{}", "[".repeat(5000), "]".repeat(5000)),
    ];
    for (i, case) in cases.iter().enumerate() {
        s.write("recipe.toml", case);
        let out = s.rudder(&["plan", "recipe.toml"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(!err.contains("panicked"), "case {i}: {err}");
        assert!(
            err.contains("recipe.toml:"),
            "case {i} has no location: {err}"
        );
    }
    s.write("recipe.toml", &cases[4]);
    let err = stderr(&s.rudder(&["plan", "recipe.toml"]));
    assert!(
        err.contains("dependency cycle between `upper2`, `upper3`"),
        "{err}"
    );
}

#[test]
fn identical_stages_under_two_names_build_once() {
    let s = scratch();
    let twin = RECIPE.replace("[stages.other]", "[stages.twin]\nkind = \"command\"\ncmd = \"echo independent > {{ out }}/other.txt\"\noutputs = { other = \"other.txt\" }\n\n[stages.other]");
    s.write("recipe.toml", &twin);
    assert_eq!(s.key("recipe.toml", "twin"), s.key("recipe.toml", "other"));
    let out = s.rudder(&["run", "recipe.toml"]);
    assert!(stderr(&out).contains("ran 3 stages"), "{}", stderr(&out));
    assert_eq!(s.objects(), 3);
}

#[test]
fn resources_and_the_executor_change_no_key() {
    let s = scratch();
    let before = s.plan("recipe.toml");
    let text = RECIPE
        .replace(
            "name = \"pipeline\"",
            "name = \"pipeline\"\njobs = 4\n\n[executor]\nkind = \"slurm\"\nresources = { partition = \"cpu\" }",
        )
        .replace(
            "env = { SUFFIX = \"!\" }",
            "env = { SUFFIX = \"!\" }\nresources = { gpus = 1, cpus = 8, mem = \"64G\", time = \"4:00:00\", extra = [\"--qos=high\"] }",
        );
    s.write("recipe.toml", &text);
    let after = s.plan("recipe.toml");
    let keys = |plan: &[(String, String, String, Vec<String>)]| {
        plan.iter().map(|n| n.2.clone()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&before), keys(&after));
    // A bad value is a located recipe error.
    s.write("recipe.toml", &text.replace("\"64G\"", "\"lots\""));
    let out = s.rudder(&["plan", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("recipe.toml:"), "{err}");
    assert!(
        err.contains("`mem = \"lots\"` is not a memory size"),
        "{err}"
    );
}

/// `rudder exec` (what a Slurm job runs) builds one node only under the key the recipe's plan
/// gives it, and only once its inputs are built.
#[test]
fn exec_builds_one_node_by_its_planned_key() {
    let s = scratch();
    let upper = s.key("recipe.toml", "upper");
    let count = s.key("recipe.toml", "count");
    let out = s.rudder(&["exec", "recipe.toml", "count", "--key", &count]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("its input `upper`") && stderr(&out).contains("is not in the store"),
        "{}",
        stderr(&out)
    );
    // A key the plan does not give the node: refused, nothing built.
    let out = s.rudder(&["exec", "recipe.toml", "upper", "--key", &count]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "the recipe's plan gives `upper` the key {upper}, not {count}"
        )),
        "{}",
        stderr(&out)
    );
    let out = s.rudder(&["exec", "recipe.toml", "upper", "--key", "beef"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(s.objects(), 0);
    s.ok(&["exec", "recipe.toml", "upper", "--key", &upper]);
    assert_eq!(s.objects(), 1);
    assert_eq!(s.to_run("recipe.toml"), ["count", "other"]);
    let out = s.rudder(&["exec", "recipe.toml", "upper", "--key", &upper]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("is in the store already"),
        "{}",
        stderr(&out)
    );
    // The same recipe with a different setting plans another key: a job submitted for the old
    // one cannot build the new one.
    s.write(
        "recipe.toml",
        &RECIPE.replace("SUFFIX = \"!\"", "SUFFIX = \"?\""),
    );
    let out = s.rudder(&["exec", "recipe.toml", "upper", "--key", &upper]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(s.objects(), 1);
    // exec writes no lockfile: the run that submitted the job does.
    assert!(!s.path("recipe.lock").exists());
}
