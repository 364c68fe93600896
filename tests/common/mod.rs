//! Helpers for end-to-end tests that drive the real `rudder` binary in a scratch directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap()
    }

    pub fn rudder(&self, args: &[&str]) -> Output {
        rudder_in(self.dir.path(), args)
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.rudder(args);
        assert!(
            out.status.success(),
            "rudder {args:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rudder plan --json` as (name, state, key, reasons).
    pub fn plan(&self, recipe: &str) -> Vec<(String, String, String, Vec<String>)> {
        let json: serde_json::Value =
            serde_json::from_str(&self.ok(&["plan", recipe, "--json"])).unwrap();
        json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_owned(),
                    n["state"].as_str().unwrap().to_owned(),
                    n["key"].as_str().unwrap().to_owned(),
                    n["reasons"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect()
    }

    /// Names of the stages `plan` says will run.
    pub fn to_run(&self, recipe: &str) -> Vec<String> {
        self.plan(recipe)
            .into_iter()
            .filter(|n| n.1 == "run")
            .map(|n| n.0)
            .collect()
    }

    pub fn key(&self, recipe: &str, node: &str) -> String {
        self.plan(recipe)
            .into_iter()
            .find(|n| n.0 == node)
            .unwrap_or_else(|| panic!("no node {node}"))
            .2
    }

    /// Number of complete artifacts in the store.
    pub fn objects(&self) -> usize {
        std::fs::read_dir(self.path(".rudder/objects"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// The shared reference fixtures (`../shared/fixtures`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

impl Scratch {
    /// The fixture policy as a Hugging Face directory `dir` (config, weights, tokenizer files).
    pub fn fixture_model(&self, dir: &str) {
        std::fs::create_dir_all(self.path(dir)).unwrap();
        for file in [
            "policy/config.json",
            "policy/model.safetensors",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
        ] {
            let name = Path::new(file).file_name().unwrap().to_str().unwrap();
            std::fs::copy(fixtures().join(file), self.path(&format!("{dir}/{name}"))).unwrap();
        }
    }
}

pub fn rudder_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUDDER_STORE")
        .env_remove("RUDDER_REMOTE")
        .output()
        .expect("rudder runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts `rudder run recipe.toml`, waits for the first checkpoint in the store's work directory,
/// kills the process with SIGKILL, and checks that the killed stage left no artifact.
pub fn run_killed_after_first_checkpoint(s: &Scratch) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(["run", "recipe.toml"])
        .current_dir(s.dir.path())
        .env_remove("RUDDER_STORE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let work = s.path(".rudder/work");
    let has_checkpoint = || {
        std::fs::read_dir(&work)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                std::fs::read_dir(entry.path().join("checkpoint"))
                    .is_ok_and(|mut d| d.next().is_some())
            })
    };
    let start = Instant::now();
    while !has_checkpoint() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint was written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the stage finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(s.objects(), 0, "a killed stage left an artifact");
}
