//! The store cannot lie: artifacts are read-only, checked against their manifests before they
//! are used, and a corrupted one is never consumed but quarantined and rebuilt; `rudder verify`
//! finds what is wrong. Through the real binary, on command stages.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common::{Scratch, stderr};

/// raw -> upper -> count.
const RECIPE: &str = r#"
[recipe]
name = "pipeline"

[datasets.raw]
path = "raw.txt"

[stages.upper]
kind = "command"
inputs = ["raw"]
cmd = "tr a-z A-Z < {{ inputs.raw }} > {{ out }}/upper.txt"
outputs = { text = "upper.txt" }

[stages.count]
kind = "command"
inputs = ["upper.text"]
cmd = "wc -l < {{ inputs['upper.text'] }} > {{ out }}/count.txt"
outputs = { count = "count.txt" }
"#;

fn scratch() -> Scratch {
    let s = Scratch::new();
    s.write("recipe.toml", RECIPE);
    s.write("raw.txt", "alpha\nbeta\n");
    s
}

fn artifact(s: &Scratch, node: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(s.ok(&["show", "recipe.toml", node, "--path"]).trim())
}

fn append(path: &std::path::Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn quarantined(s: &Scratch) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(s.path(".rudder/quarantine"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn committed_artifacts_are_read_only() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "upper");
    for path in [
        dir.clone(),
        dir.join("upper.txt"),
        dir.join("manifest.json"),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "{} is writable", path.display());
    }
    // Forced re-runs and gc still replace and remove read-only artifacts.
    s.ok(&["run", "recipe.toml", "--force-all"]);
    s.write("raw.txt", "gamma\n");
    s.ok(&["run", "recipe.toml"]);
    assert_eq!(s.objects(), 4);
    s.ok(&["gc", "--store", ".rudder", "recipe.lock"]);
    assert_eq!(s.objects(), 2);
}

#[test]
fn an_edited_artifact_is_never_consumed_but_quarantined_and_rebuilt() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let upper = artifact(&s, "upper").join("upper.txt");
    append(&upper, "SMUGGLED\n");
    // plan names the file; the artifact downstream of it stays cached (its key is unchanged,
    // and it was built from the true content).
    let plan = s.plan("recipe.toml");
    let entry = plan.iter().find(|n| n.0 == "upper").unwrap();
    assert_eq!(entry.1, "run");
    assert_eq!(entry.3, ["corrupted (file upper.txt: digest mismatch)"]);
    assert_eq!(s.to_run("recipe.toml"), ["upper"]);
    // verify reports it and exits 1, touching nothing.
    let out = s.rudder(&["verify", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("corrupted")
            && text.contains("upper (command)  file upper.txt: digest mismatch"),
        "{text}"
    );
    assert!(stderr(&out).contains("1 corrupted"), "{}", stderr(&out));
    assert!(quarantined(&s).is_empty());
    // run quarantines it with a note and builds it again; count is not rebuilt.
    let out = s.rudder(&["run", "recipe.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "warning: the artifact of `upper` is corrupted (file upper.txt: digest mismatch)"
        ),
        "{err}"
    );
    assert!(err.contains("ran 1 stage, 1 cached"), "{err}");
    assert_eq!(std::fs::read_to_string(&upper).unwrap(), "ALPHA\nBETA\n");
    let places = quarantined(&s);
    assert_eq!(places.len(), 1);
    let note: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(places[0].join("note.json")).unwrap())
            .unwrap();
    assert_eq!(note["name"], "upper");
    assert_eq!(note["problems"][0], "file upper.txt: digest mismatch");
    assert_eq!(
        std::fs::read_to_string(places[0].join("artifact/upper.txt")).unwrap(),
        "ALPHA\nBETA\nSMUGGLED\n"
    );
    assert!(s.to_run("recipe.toml").is_empty());
    s.ok(&["verify", "recipe.toml"]);
    s.ok(&["verify", "--store", ".rudder"]);
}

#[test]
fn deleted_and_added_files_are_corruption_too() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "count");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(dir.join("count.txt")).unwrap();
    std::fs::write(dir.join("stray.txt"), "x").unwrap();
    let plan = s.plan("recipe.toml");
    assert_eq!(
        plan.iter().find(|n| n.0 == "count").unwrap().3,
        ["corrupted (file count.txt: missing, file stray.txt: not in the manifest)"]
    );
    s.ok(&["run", "recipe.toml"]);
    s.ok(&["verify", "--all", "recipe.toml"]);
}

/// Damage that leaves every file's size and stat as recorded (a disk returning other bytes)
/// passes the cheap check; `--verify full` hashes every file and finds it. Simulated by
/// recording another digest in the manifest instead of changing the file.
#[test]
fn verify_full_hashes_what_the_cheap_check_trusts() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "upper");
    let manifest_path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["files"][0]["blake3"] = serde_json::Value::String("0".repeat(64));
    std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert!(s.to_run("recipe.toml").is_empty());
    let full: serde_json::Value =
        serde_json::from_str(&s.ok(&["plan", "recipe.toml", "--json", "--verify", "full"]))
            .unwrap();
    let upper = full["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "upper")
        .unwrap();
    assert_eq!(upper["state"], "run");
    assert_eq!(
        upper["reasons"][0],
        "corrupted (file upper.txt: digest mismatch)"
    );
    assert_eq!(s.rudder(&["verify", "recipe.toml"]).status.code(), Some(1));
    let out = s.rudder(&["run", "recipe.toml", "--verify", "full"]);
    assert!(stderr(&out).contains("ran 1 stage"), "{}", stderr(&out));
    s.ok(&["verify", "recipe.toml"]);
}

/// An artifact damaged while the run is under way (here by an unconfined stage that writes
/// into its input) is caught when the next stage is about to read it.
#[test]
fn an_input_damaged_during_the_run_fails_its_reader_and_is_rebuilt_next_time() {
    let s = scratch();
    let vandal = RECIPE.replace(
        "[stages.count]\nkind = \"command\"",
        "[stages.vandal]\nkind = \"command\"\ninputs = [\"upper\"]\ncmd = \"echo oops >> {{ inputs.upper }}/upper.txt && touch {{ out }}/done\"\noutputs = { done = \"done\" }\nsandbox = false\n\n[stages.count]\nkind = \"command\"\nafter = [\"vandal\"]",
    );
    s.write("recipe.toml", &vandal);
    let out = s.rudder(&["run", "recipe.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("stage `count` (command) failed: input `upper` is corrupted (file upper.txt: digest mismatch)")
            && err.contains("is not read: run again to rebuild it"),
        "{err}"
    );
    assert_eq!(quarantined(&s).len(), 1);
    // Confined, the same stage cannot write into its input at all, even as root.
    s.write("recipe.toml", &vandal.replace("sandbox = false\n", ""));
    let out = s.rudder(&["run", "recipe.toml", "--force", "vandal"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    s.write(
        "recipe.toml",
        &vandal.replace("echo oops >> {{ inputs.upper }}/upper.txt && ", ""),
    );
    s.ok(&["run", "recipe.toml"]);
    s.ok(&["verify", "recipe.toml"]);
    assert_eq!(
        std::fs::read_to_string(artifact(&s, "count").join("count.txt"))
            .unwrap()
            .trim(),
        "2"
    );
}

/// Two stages that read one input at once, both after it was damaged: the input is moved to
/// quarantine once (under its key's lock), both stages fail without reading it, and the next
/// run builds it again.
#[test]
fn readers_at_once_quarantine_a_damaged_input_once() {
    let s = scratch();
    let text = RECIPE.replace(
        "[stages.count]\nkind = \"command\"",
        "[stages.vandal]\nkind = \"command\"\ninputs = [\"upper\"]\ncmd = \"echo oops >> {{ inputs.upper }}/upper.txt && touch {{ out }}/done\"\noutputs = { done = \"done\" }\nsandbox = false\n\n[stages.count]\nkind = \"command\"\nafter = [\"vandal\"]",
    ) + "\n[stages.chars]\nkind = \"command\"\ninputs = [\"upper.text\"]\nafter = [\"vandal\"]\ncmd = \"wc -c < {{ inputs['upper.text'] }} > {{ out }}/chars.txt\"\noutputs = { chars = \"chars.txt\" }\n";
    s.write("recipe.toml", &text);
    let out = s.rudder(&["run", "recipe.toml", "-j", "2", "--keep-going"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // One finds it corrupted and moves it; the other then finds it gone (or, first, corrupted).
    for stage in ["count", "chars"] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("stage `{stage}` (command) failed: ")))
            .unwrap_or_else(|| panic!("{stage} did not fail: {err}"));
        assert!(line.contains("input `upper`"), "{err}");
    }
    assert_eq!(quarantined(&s).len(), 1, "{err}");
    assert_eq!(
        err.matches("warning: the artifact of `upper` is corrupted")
            .count(),
        1,
        "{err}"
    );
    s.write(
        "recipe.toml",
        &text.replace("echo oops >> {{ inputs.upper }}/upper.txt && ", ""),
    );
    s.ok(&["run", "recipe.toml", "-j", "2"]);
    s.ok(&["verify", "recipe.toml"]);
}

/// `rudder exec` (what a Slurm job runs) checks the inputs it reads like `rudder run` does.
#[test]
fn exec_refuses_a_corrupted_input() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    append(&artifact(&s, "upper").join("upper.txt"), "extra\n");
    let key = s.key("recipe.toml", "count");
    let out = s.rudder(&["exec", "recipe.toml", "count", "--key", &key, "--force"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("input `upper` is corrupted (file upper.txt: digest mismatch)"),
        "{err}"
    );
    assert_eq!(quarantined(&s).len(), 1);
    // Its artifact from before stays, intact.
    s.ok(&["verify", "recipe.toml"]);
    assert_eq!(s.to_run("recipe.toml"), ["upper"]);
}

#[test]
fn a_store_from_a_newer_rudder_is_refused() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    s.write(".rudder/store.json", r#"{"layout": 3}"#);
    let out = s.rudder(&["run", "recipe.toml", "--force-all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("layout version 3 is newer than this rudder's 2"),
        "{}",
        stderr(&out)
    );
}

/// A store written before artifacts were read-only (layout 1: writable files, no stats in the
/// manifests) is upgraded by the next run and keeps its artifacts.
#[test]
fn a_layout_1_store_is_upgraded_and_kept() {
    let s = scratch();
    s.ok(&["run", "recipe.toml"]);
    let dir = artifact(&s, "upper");
    let manifest_path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["layout"] = 1.into();
    manifest["files"][0].as_object_mut().unwrap().remove("stat");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    s.write(".rudder/store.json", r#"{"layout": 1}"#);
    assert!(s.to_run("recipe.toml").is_empty());
    let out = s.rudder(&["run", "recipe.toml"]);
    assert!(stderr(&out).contains("ran 0 stages"), "{}", stderr(&out));
    assert!(s.read(".rudder/store.json").contains("\"layout\":2"));
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0);
    s.ok(&["verify", "recipe.toml"]);
}
