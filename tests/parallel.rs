//! Stages at once on one machine (`-j N`, `jobs` in `[recipe]`): independent stages run
//! concurrently, dependents wait for their inputs, a failure stops new stages while running
//! ones finish, `--keep-going` goes on with independent branches, and a parallel run builds
//! exactly what a sequential one does.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{Scratch, stderr};

/// `left` and `right` each wait (up to 3 s) for the other to have started: they succeed only
/// when they run at once. `join` reads both; `twin` is `join` under another name. The two meet
/// through marker files in the recipe's directory, which a sandboxed command may not write: they
/// opt out of the sandbox.
const FAN: &str = r#"
[recipe]
name = "fan"
jobs = 2

[stages.left]
kind = "command"
sandbox = false
cmd = "touch left.started; i=0; while [ ! -e right.started ]; do i=$((i+1)); [ $i -gt 60 ] && exit 9; sleep 0.05; done; echo l > {{ out }}/l.txt"
outputs = { l = "l.txt" }

[stages.right]
kind = "command"
sandbox = false
cmd = "touch right.started; i=0; while [ ! -e left.started ]; do i=$((i+1)); [ $i -gt 60 ] && exit 9; sleep 0.05; done; echo r > {{ out }}/r.txt"
outputs = { r = "r.txt" }

[stages.join]
kind = "command"
inputs = ["left.l", "right.r"]
cmd = "cat {{ inputs['left.l'] }} {{ inputs['right.r'] }} > {{ out }}/j.txt"
outputs = { j = "j.txt" }

[stages.twin]
kind = "command"
inputs = ["left.l", "right.r"]
cmd = "cat {{ inputs['left.l'] }} {{ inputs['right.r'] }} > {{ out }}/j.txt"
outputs = { j = "j.txt" }
"#;

#[test]
fn independent_stages_run_at_once_and_dependents_after_them() {
    let s = Scratch::new();
    s.write("recipe.toml", FAN);
    let out = s.rudder(&["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // At once, every status line names its stage.
    for name in ["left", "right", "join"] {
        assert!(err.contains(&format!("      {name} done in")), "{err}");
    }
    // `twin` has `join`'s key: built once.
    assert!(err.contains("ran 3 stages"), "{err}");
    assert_eq!(s.objects(), 3);
    let dir = s.ok(&["show", "recipe.toml", "join", "--path"]);
    assert_eq!(
        std::fs::read_to_string(Path::new(dir.trim()).join("j.txt")).unwrap(),
        "l\nr\n"
    );
    // `-j 1` wins over the recipe's `jobs`: one at a time, `left` waits for `right` in vain.
    // The failure stops the run; nothing else starts; the lockfile keeps what was built.
    std::fs::remove_file(s.path("left.started")).unwrap();
    std::fs::remove_file(s.path("right.started")).unwrap();
    let lock = s.read("recipe.lock");
    let out = s.rudder(&["run", "recipe.toml", "-j", "1", "--force-all"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stage `left` (command) failed: command failed with exit code 9"),
        "{err}"
    );
    assert!(err.contains("2 stages not run: right, join"), "{err}");
    assert!(err.contains("--keep-going"), "{err}");
    assert_eq!(s.objects(), 3);
    assert_eq!(s.read("recipe.lock"), lock);
}

/// `bad` fails while `slow` runs beside it; `later` and `after_bad` wait for a free slot. `slow`
/// tells `bad` it has started with a marker file in the recipe's directory (outside the sandbox,
/// like `left` and `right` above); `bad` gives up after a minute rather than hang the suite.
const FAILING: &str = r#"
[recipe]
name = "failing"
jobs = 2

[stages.slow]
kind = "command"
sandbox = false
cmd = "touch slow.started; sleep 1; echo s > {{ out }}/s.txt"
outputs = { s = "s.txt" }

[stages.bad]
kind = "command"
sandbox = false
cmd = "i=0; while [ ! -e slow.started ]; do i=$((i+1)); [ $i -gt 3000 ] && exit 9; sleep 0.02; done; echo boom >&2; exit 3"
outputs = { b = "b.txt" }

[stages.later]
kind = "command"
cmd = "echo l > {{ out }}/l.txt"
outputs = { l = "l.txt" }

[stages.after_bad]
kind = "command"
inputs = ["bad.b"]
cmd = "cp {{ inputs['bad.b'] }} {{ out }}/a.txt"
outputs = { a = "a.txt" }
"#;

#[test]
fn a_failure_stops_new_stages_lets_running_ones_finish_and_keep_going_goes_on() {
    let s = Scratch::new();
    s.write("recipe.toml", FAILING);
    let out = s.rudder(&["run", "recipe.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stage `bad` (command) failed"), "{err}");
    assert!(err.contains("boom"), "{err}");
    assert!(err.contains("2 stages not run: later, after_bad"), "{err}");
    // `slow` was running: it finished, was committed, and the lockfile records it.
    assert_eq!(s.objects(), 1);
    let lock = s.read("recipe.lock");
    assert!(lock.contains("name = \"slow\""), "{lock}");
    assert!(lock.contains("\"s.txt\" = "), "{lock}");
    assert!(!lock.contains("name = \"bad\""), "{lock}");
    assert_eq!(s.to_run("recipe.toml"), ["bad", "later", "after_bad"]);

    let out = s.rudder(&["run", "recipe.toml", "--keep-going"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stage `bad` (command) failed"), "{err}");
    assert!(err.contains("1 stage not run: after_bad"), "{err}");
    assert!(!err.contains("hint:"), "{err}");
    assert_eq!(s.objects(), 2);
    assert_eq!(s.to_run("recipe.toml"), ["bad", "after_bad"]);
}

/// Shortens every training stage of `dpo_variants.toml` (and its data) identically for both
/// runs: the point is that the parallel run builds the same bytes, not a good model.
const SHORT: &[&str] = &[
    "stages.pretrain.max_steps=4",
    "stages.sft.max_steps=3",
    "stages.sigmoid.max_steps=2",
    "stages.ipo.max_steps=2",
    "stages.hinge.max_steps=2",
    "stages.apo_zero.max_steps=2",
    "stages.mpo.max_steps=2",
    "stages.kto.max_steps=2",
    "stages.orpo.max_steps=2",
    "stages.simpo.max_steps=2",
    "stages.eval.num_samples=1",
    "stages.eval.max_new_tokens=4",
];

/// A copy of `recipes/dpo_variants.toml` with the first lines of each of its data files.
fn dpo_variants() -> Scratch {
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let s = Scratch::new();
    s.write(
        "dpo_variants.toml",
        &std::fs::read_to_string(recipes.join("dpo_variants.toml")).unwrap(),
    );
    for (file, lines) in [
        ("data/sft.jsonl", 64),
        ("data/prefs.jsonl", 48),
        ("data/prompts.jsonl", 2),
        ("data/corpus.txt", 300),
    ] {
        let text = std::fs::read_to_string(recipes.join(file)).unwrap();
        let head: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
        s.write(file, &head);
    }
    for file in ["data/sentiment.py", "scripts/split.py"] {
        s.write(file, &std::fs::read_to_string(recipes.join(file)).unwrap());
    }
    s
}

fn run_dpo_variants(s: &Scratch, jobs: &str) {
    let mut args = vec!["run", "dpo_variants.toml", "-j", jobs];
    for set in SHORT {
        args.extend(["--set", set]);
    }
    s.ok(&args);
}

/// Every artifact of the store: key -> (file, blake3) of each file, from its manifest.
fn artifacts(s: &Scratch) -> Vec<(String, Vec<(String, String)>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(s.path(".rudder/objects")).unwrap() {
        let entry = entry.unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path().join("manifest.json")).unwrap())
                .unwrap();
        let files = manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["blake3"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        found.push((entry.file_name().to_string_lossy().into_owned(), files));
    }
    found.sort();
    found
}

/// `dpo_variants.toml` (eight losses from one SFT model) run one stage at a time and three at
/// once, in two stores: the same keys, the same lockfile, byte for byte the same artifacts.
#[test]
fn a_parallel_run_builds_the_same_artifacts_as_a_sequential_one() {
    let sequential = dpo_variants();
    let parallel = dpo_variants();
    let clock = Instant::now();
    run_dpo_variants(&sequential, "1");
    let one = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    run_dpo_variants(&parallel, "3");
    let three = clock.elapsed().as_secs_f64();
    eprintln!("dpo_variants, shortened: -j 1 {one:.1}s, -j 3 {three:.1}s");
    assert_eq!(
        sequential.read("dpo_variants.lock"),
        parallel.read("dpo_variants.lock")
    );
    let (a, b) = (artifacts(&sequential), artifacts(&parallel));
    // Thirteen stages and two reference caches (one shared by the five DPO-family stages, one
    // for KTO).
    assert_eq!(a.len(), 15, "{a:?}");
    assert_eq!(a, b);
}
