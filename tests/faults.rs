//! Faults injected into every step of the store's commit protocol and of the lockfile's
//! replacement, through the real binary (a debug build reads `RUDDER_FAULT`, see
//! `engine/src/fault.rs`): the disk filling up, a write failing mid-file, a failed sync or
//! rename, and the process killed with SIGKILL at each step. After every one, no partial
//! artifact is visible, the lockfile is the previous one or the new one (byte for byte, never
//! torn), and the next run completes with the same result as a run that met no fault.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use common::{Scratch, stderr};

const RECIPE: &str = r#"
[recipe]
name = "pipeline"

[datasets.raw]
path = "raw.txt"

[stages.upper]
kind = "command"
inputs = ["raw"]
cmd = "tr a-z A-Z < {{ inputs.raw }} | sed \"s/$/$SUFFIX/\" > {{ out }}/upper.txt"
outputs = { text = "upper.txt" }
env = { SUFFIX = "!" }

[stages.count]
kind = "command"
inputs = ["upper.text"]
cmd = "wc -c < {{ inputs['upper.text'] }} > {{ out }}/count.txt"
outputs = { count = "count.txt" }
"#;

/// The recipe after an edit that makes both stages run again.
fn edited() -> String {
    RECIPE.replace("SUFFIX = \"!\"", "SUFFIX = \"?\"")
}

fn rudder_with_fault(s: &Scratch, fault: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .current_dir(s.dir.path())
        .env_remove("RUDDER_STORE")
        .env("RUDDER_FAULT", fault)
        .output()
        .expect("rudder runs")
}

/// A store that ran the recipe once (lockfile A), with the edit written: the next run builds
/// two new artifacts and writes lockfile B.
fn prepared() -> (Scratch, String) {
    let s = Scratch::new();
    s.write("recipe.toml", RECIPE);
    s.write("raw.txt", "alpha\nbeta\n");
    s.ok(&["run", "recipe.toml"]);
    let before = s.read("recipe.lock");
    s.write("recipe.toml", &edited());
    (s, before)
}

/// Lockfile B, from a run that meets no fault.
fn clean_lockfile() -> String {
    let (s, _) = prepared();
    s.ok(&["run", "recipe.toml"]);
    s.read("recipe.lock")
}

fn tmp_entries(s: &Scratch) -> usize {
    std::fs::read_dir(s.path(".rudder/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What must hold after any fault, and after the run that follows it.
fn check_recovery(s: &Scratch, fault: &str, before: &str, after: &str) {
    // Every artifact that is visible is whole.
    let verify = s.rudder(&["verify", "--store", ".rudder"]);
    assert!(
        verify.status.success(),
        "{fault}: a partial artifact is visible\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );
    let lock = s.read("recipe.lock");
    assert!(
        lock == before || lock == after,
        "{fault}: the lockfile is neither the previous nor the new one:\n{lock}"
    );
    // The next run completes, and ends where a run without the fault ends.
    let out = s.rudder(&["run", "recipe.toml"]);
    assert!(
        out.status.success(),
        "{fault}: the next run failed: {}",
        stderr(&out)
    );
    assert_eq!(s.read("recipe.lock"), after, "{fault}");
    assert_eq!(tmp_entries(s), 0, "{fault}: tmp/ kept a pending artifact");
    assert!(s.to_run("recipe.toml").is_empty(), "{fault}");
    s.ok(&["verify", "recipe.toml"]);
    assert_eq!(s.objects(), 4, "{fault}");
}

fn fault_hook_present() -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: RUDDER_FAULT is read by debug builds only");
    }
    cfg!(debug_assertions)
}

/// Every step of the commit protocol and of the lockfile's replacement, killed.
const KILL_POINTS: &[&str] = &[
    // the stage's files are written into tmp/ and are being hashed
    "kill@commit.hash",
    // half of manifest.json written
    "kill@commit.manifest",
    // before the files and directories are synced
    "kill@commit.sync",
    // before the rename that publishes
    "kill@commit.rename",
    // after the rename, before the lockfile
    "kill@commit.published",
    // half of the lockfile's temporary file written
    "kill@atomic.write:recipe.lock",
    "kill@atomic.sync:recipe.lock",
    "kill@atomic.rename:recipe.lock",
];

/// Every write of the protocols, failing.
const ERROR_POINTS: &[&str] = &[
    "enospc@commit.hash",
    "enospc@commit.manifest",
    "short@commit.manifest",
    "eio@commit.sync",
    "eio@commit.rename",
    "enospc@atomic.write:recipe.lock",
    "short@atomic.write:recipe.lock",
    "eio@atomic.sync:recipe.lock",
    "eio@atomic.rename:recipe.lock",
    // the run record and the store's version marker are written the same way
    "enospc@atomic.write",
];

#[test]
fn a_process_killed_at_any_step_of_a_commit_loses_nothing() {
    if !fault_hook_present() {
        return;
    }
    let after = clean_lockfile();
    for fault in KILL_POINTS {
        let (s, before) = prepared();
        let out = rudder_with_fault(&s, fault, &["run", "recipe.toml"]);
        assert_eq!(
            out.status.signal(),
            Some(libc_sigkill()),
            "{fault}: not killed: {}",
            stderr(&out)
        );
        check_recovery(&s, fault, &before, &after);
    }
    eprintln!("{} kill points survived", KILL_POINTS.len());
}

#[test]
fn a_write_that_fails_at_any_step_of_a_commit_loses_nothing() {
    if !fault_hook_present() {
        return;
    }
    let after = clean_lockfile();
    for fault in ERROR_POINTS {
        let (s, before) = prepared();
        let out = rudder_with_fault(&s, fault, &["run", "recipe.toml"]);
        assert_eq!(out.status.code(), Some(1), "{fault}: {}", stderr(&out));
        let err = stderr(&out);
        let expected = if fault.starts_with("enospc") {
            "No space left on device"
        } else {
            "Input/output error"
        };
        assert!(err.contains(expected), "{fault}: {err}");
        assert!(!err.contains("panicked"), "{fault}: {err}");
        // A failed commit is an error of the run, not a stage left half-published.
        assert_eq!(tmp_entries(&s), 0, "{fault}: tmp/ kept a pending artifact");
        check_recovery(&s, fault, &before, &after);
    }
    eprintln!("{} failing writes survived", ERROR_POINTS.len());
}

fn libc_sigkill() -> i32 {
    9
}
