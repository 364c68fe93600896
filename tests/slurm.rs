//! The Slurm executor against a real Slurm (`.ci/slurm-up.sh` starts a one-node cluster on this
//! machine): a run of command stages and a training stage builds through `sbatch` what a local
//! run builds, one job per stage; a failing job fails the run with its log; a killed `rudder`
//! re-run adopts its jobs rather than submitting them again; Ctrl-C cancels them; a requeued
//! training job resumes from its checkpoint.
//!
//! Without `sbatch` or a responding cluster every test here says so and passes, unless
//! `RUDDER_REQUIRE_SLURM` is set (as `.ci/run` does), when it fails.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, stderr};

/// Whether a Slurm cluster answers; says why not otherwise.
fn slurm() -> bool {
    let why = match Command::new("sinfo")
        .args(["--noheader", "--format=%T"])
        .output()
    {
        Err(_) => Some("`sinfo` is not installed".to_owned()),
        Ok(out) if !out.status.success() => Some(format!(
            "the cluster does not answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(out) => {
            let states = String::from_utf8_lossy(&out.stdout).into_owned();
            let usable = states.lines().any(|s| {
                let s = s.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-']);
                matches!(s, "idle" | "mixed" | "allocated" | "completing")
            });
            (!usable).then(|| format!("no node is up (sinfo: {})", states.trim()))
        }
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("RUDDER_REQUIRE_SLURM").is_some() => {
            panic!("RUDDER_REQUIRE_SLURM is set, but {why} (.ci/slurm-up.sh starts one)")
        }
        Some(why) => {
            eprintln!("skipping a Slurm test: {why} (.ci/slurm-up.sh starts a one-node cluster)");
            false
        }
    }
}

const SLURM: &str =
    "[executor]\nkind = \"slurm\"\npoll_seconds = 0.2\nresources = { time = \"30:00\" }\n";

/// Data preparation, a small SFT stage on the fixture model, and a command on its output.
fn training_scratch() -> Scratch {
    let fixtures = common::fixtures();
    let s = Scratch::new();
    s.fixture_model("model");
    std::fs::copy(fixtures.join("sft.jsonl"), s.path("sft.jsonl")).unwrap();
    s.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
seed = 1

{SLURM}
[models.base]
hf = "model"

[datasets.instructions]
path = "sft.jsonl"

[stages.prep]
kind = "command"
inputs = ["instructions"]
cmd = "head -n 12 {{{{ inputs.instructions }}}} > {{{{ out }}}}/train.jsonl"
outputs = {{ train = "train.jsonl" }}

[stages.sft]
kind = "sft"
model = "base"
data = "prep.train"
learning_rate = 1e-3
batch_size = 4
max_steps = 3
logging_steps = 1
shuffle = false
lr_scheduler_type = "constant"
resources = {{ cpus = 1, mem = "1G", time = "10:00" }}

[stages.size]
kind = "command"
inputs = ["sft"]
cmd = "wc -c < {{{{ inputs.sft }}}}/model.safetensors > {{{{ out }}}}/size.txt"
outputs = {{ size = "size.txt" }}
"#
        ),
    );
    s
}

/// Job ids a run's output names (`submitted as Slurm job N`, `already queued as Slurm job N`).
fn job_ids(err: &str) -> Vec<String> {
    err.lines()
        .filter_map(|l| l.split(" as Slurm job ").nth(1))
        .map(|id| id.trim().to_owned())
        .collect()
}

/// `(id, name, state)` of jobs from `sacct`: the accounting database, or the job-completion
/// log on a cluster without one (like the test cluster). Waits briefly for late records.
fn sacct(ids: &[String]) -> Vec<(String, String, String)> {
    let query = |completion: bool| {
        let mut command = Command::new("sacct");
        command.args([
            "--noheader",
            "--parsable2",
            "--format=JobIDRaw,JobName,State",
        ]);
        command.arg(if completion {
            "--completion"
        } else {
            "--allocations"
        });
        command.arg(format!("--jobs={}", ids.join(",")));
        let out = command.output().expect("sacct runs");
        out.status.success().then(|| {
            let mut rows: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split('|').collect();
                    (f.len() >= 3 && !f[0].contains('.')).then(|| {
                        (
                            f[0].to_owned(),
                            f[1].to_owned(),
                            f[2].split_whitespace().next().unwrap_or("").to_owned(),
                        )
                    })
                })
                .collect();
            rows.sort();
            rows.dedup_by(|a, b| a.0 == b.0);
            rows
        })
    };
    let start = Instant::now();
    loop {
        let rows = query(false).or_else(|| query(true)).expect("sacct answers");
        if rows.len() >= ids.len() || start.elapsed() > Duration::from_secs(10) {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every artifact of a store: key -> (file, blake3), from the manifests.
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

fn spawn(s: &Scratch, args: &[&str], log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .current_dir(s.dir.path())
        .env_remove("RUDDER_STORE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path(log)).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until `ready` holds, failing after `seconds`.
fn wait_for(what: &str, seconds: u64, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(seconds),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn squeue_state(id: &str) -> String {
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%T|%R", "--jobs", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_slurm_run_builds_what_a_local_run_builds_with_one_job_per_stage() {
    if !slurm() {
        return;
    }
    let local = training_scratch();
    let cluster = training_scratch();
    local.ok(&["run", "recipe.toml", "--executor", "local"]);
    let out = cluster.rudder(&["run", "recipe.toml"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ran 3 stages, 0 cached"), "{err}");
    // Same keys, same lockfile, same bytes.
    let lock = |s: &Scratch| {
        s.read("recipe.lock")
            .replace(s.dir.path().to_str().unwrap(), "")
    };
    assert_eq!(lock(&local), lock(&cluster));
    assert_eq!(artifacts(&local), artifacts(&cluster));
    // The command stages were confined inside their jobs as they are on this machine.
    let sandbox = |s: &Scratch, node: &str| {
        let path = s.path(&format!(
            ".rudder/objects/{}/manifest.json",
            s.key("recipe.toml", node)
        ));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        manifest["sandbox"].clone()
    };
    for node in ["prep", "size"] {
        assert_eq!(sandbox(&local, node), sandbox(&cluster, node), "{node}");
        assert_eq!(sandbox(&cluster, node)["mode"], "on", "{node}");
    }
    // One job per stage, each with the stage's name, each completed.
    let ids = job_ids(&err);
    assert_eq!(ids.len(), 3, "{err}");
    let jobs = sacct(&ids);
    let names: BTreeSet<&str> = jobs.iter().map(|j| j.1.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["rudder:prep", "rudder:sft", "rudder:size"]),
        "{jobs:?}"
    );
    assert!(jobs.iter().all(|j| j.2 == "COMPLETED"), "{jobs:?}");
    // Each job's log is streamed, line by line under the stage's name; the training job got
    // the one CPU it asked for as its thread budget.
    assert!(
        err.contains("sft: building `sft` (sft)") && err.contains("with 1 thread\n"),
        "{err}"
    );
    let sft_key = cluster.key("recipe.toml", "sft");
    let script = cluster.read(&format!(".rudder/slurm/{sft_key}.sh"));
    for option in [
        "--cpus-per-task=1",
        "--mem=1G",
        "--time=10:00",
        "--job-name=rudder:sft",
        "--dependency=afterok:",
    ] {
        assert!(script.contains(option), "{script}");
    }
    // Nothing left to do, through either executor.
    assert!(cluster.to_run("recipe.toml").is_empty());
    let again = stderr(&cluster.rudder(&["run", "recipe.toml"]));
    assert!(again.contains("ran 0 stages, 3 cached"), "{again}");
    assert!(!again.contains("Slurm job"), "{again}");
}

/// `ok` and `bad` are independent; `after_bad` reads `bad`.
const FAILING: &str = r#"
[stages.ok]
kind = "command"
cmd = "echo fine > {{ out }}/ok.txt"
outputs = { ok = "ok.txt" }

[stages.bad]
kind = "command"
cmd = "echo the-bad-stage-says-why >&2; exit 5"
outputs = { b = "b.txt" }

[stages.after_bad]
kind = "command"
inputs = ["bad.b"]
cmd = "cp {{ inputs['bad.b'] }} {{ out }}/a.txt"
outputs = { a = "a.txt" }
"#;

#[test]
fn a_failing_job_fails_the_run_with_its_slurm_state_and_log() {
    if !slurm() {
        return;
    }
    let s = Scratch::new();
    s.write("recipe.toml", &format!("{SLURM}{FAILING}"));
    let out = s.rudder(&["run", "recipe.toml", "--keep-going"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stage `bad` (command) failed: Slurm job"),
        "{err}"
    );
    assert!(err.contains("FAILED"), "{err}");
    let bad_key = s.key("recipe.toml", "bad");
    assert!(
        err.contains(&format!(
            "--- last lines of {}",
            s.path(&format!(".rudder/slurm/{bad_key}.log")).display()
        )),
        "{err}"
    );
    assert!(err.contains("the-bad-stage-says-why"), "{err}");
    assert!(err.contains("1 stage not run: after_bad"), "{err}");
    // The independent stage was built and recorded; Slurm cancelled the one that needed `bad`.
    assert_eq!(s.objects(), 1);
    assert!(s.read("recipe.lock").contains("name = \"ok\""));
    let jobs = sacct(&job_ids(&err));
    let state = |name: &str| {
        jobs.iter()
            .find(|j| j.1 == format!("rudder:{name}"))
            .map(|j| j.2.clone())
    };
    assert_eq!(state("ok").as_deref(), Some("COMPLETED"), "{jobs:?}");
    assert_eq!(state("bad").as_deref(), Some("FAILED"), "{jobs:?}");
    assert_eq!(state("after_bad").as_deref(), Some("CANCELLED"), "{jobs:?}");
}

/// `first` is quick, `slow` reads it and waits (WAIT, which each test fills in), `last` reads
/// `slow`. Every command runs in the sandbox, inside its Slurm job.
const CHAIN: &str = r#"
[stages.first]
kind = "command"
cmd = "echo 1 > {{ out }}/first.txt"
outputs = { first = "first.txt" }

[stages.slow]
kind = "command"
inputs = ["first.first"]
read_paths = ["gate"]
cmd = "WAIT; cp {{ inputs['first.first'] }} {{ out }}/slow.txt"
outputs = { slow = "slow.txt" }

[stages.last]
kind = "command"
inputs = ["slow.slow"]
cmd = "cp {{ inputs['slow.slow'] }} {{ out }}/last.txt"
outputs = { last = "last.txt" }
"#;

#[test]
fn a_killed_run_is_picked_up_from_the_store_and_the_queue_without_resubmitting() {
    if !slurm() {
        return;
    }
    let s = Scratch::new();
    // `slow` runs until the test opens its gate (at most two minutes), not for a time that a
    // loaded machine could outlast before the re-run looks at the queue.
    let wait =
        "i=0; while [ ! -e gate/open ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 9; sleep 0.1; done";
    s.write(
        "recipe.toml",
        &format!("{SLURM}{}", CHAIN.replace("WAIT", wait)),
    );
    std::fs::create_dir(s.path("gate")).unwrap();
    let mut child = spawn(&s, &["run", "recipe.toml"], "first.log");
    wait_for("`first` to be built and `slow` to run", 60, || {
        std::fs::read_to_string(s.path("first.log")).is_ok_and(|l| l.contains("[2/3] slow"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let first = s.read("first.log");
    // The jobs outlive the killed `rudder`; a re-run finds `first` built and the other two
    // queued, and waits for them.
    let mut child = spawn(&s, &["run", "recipe.toml"], "second.log");
    wait_for("the re-run to adopt both jobs", 60, || {
        std::fs::read_to_string(s.path("second.log"))
            .is_ok_and(|l| l.matches("already queued as").count() == 2)
    });
    std::fs::write(s.path("gate/open"), "").unwrap();
    let status = child.wait().unwrap();
    let err = s.read("second.log");
    assert!(status.success(), "{first}\n---\n{err}");
    assert!(err.contains("ran 2 stages, 1 cached"), "{err}");
    assert!(
        err.contains("queued slow (command): already queued as Slurm job")
            && err.contains("queued last (command): already queued as Slurm job"),
        "{err}"
    );
    assert!(!err.contains("submitted as"), "{err}");
    let ids: BTreeSet<String> = job_ids(&first).into_iter().chain(job_ids(&err)).collect();
    let jobs = sacct(&ids.into_iter().collect::<Vec<_>>());
    assert_eq!(jobs.len(), 3, "one job per stage: {jobs:?}");
    assert!(jobs.iter().all(|j| j.2 == "COMPLETED"), "{jobs:?}");
    assert_eq!(s.objects(), 3);
    assert!(s.to_run("recipe.toml").is_empty());
}

#[test]
fn ctrl_c_cancels_the_run_s_jobs() {
    if !slurm() {
        return;
    }
    let s = Scratch::new();
    // Confined, `slow` says it started in its own output, still being built in `tmp/`.
    s.write(
        "recipe.toml",
        &format!(
            "{SLURM}{}",
            CHAIN.replace("WAIT", "touch {{ out }}/started; sleep 60")
        ),
    );
    std::fs::create_dir(s.path("gate")).unwrap();
    let slow = s.key("recipe.toml", "slow");
    let mut child = spawn(&s, &["run", "recipe.toml"], "run.log");
    wait_for("`slow` to start", 60, || {
        std::fs::read_dir(s.path(".rudder/tmp")).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with(&slow)
                    && e.path().join("started").exists()
            })
        })
    });
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap().code();
    let err = s.read("run.log");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("error: interrupted"), "{err}");
    let ids = job_ids(&err);
    assert_eq!(ids.len(), 3, "{err}");
    // `slow` and `last` were cancelled; `first` had completed and stays built.
    for id in &ids[1..] {
        assert!(
            squeue_state(id).starts_with("CANCELLED"),
            "{id}: {}",
            squeue_state(id)
        );
    }
    assert_eq!(s.objects(), 1);
    assert_eq!(s.to_run("recipe.toml"), ["slow", "last"]);
}

/// An artifact edited in the store is moved to quarantine by the run that submits the jobs, and
/// one Slurm job builds it again; what was built from it stays cached.
#[test]
fn a_corrupted_artifact_is_quarantined_and_rebuilt_by_a_job() {
    if !slurm() {
        return;
    }
    let s = Scratch::new();
    s.write(
        "recipe.toml",
        &format!("{SLURM}{}", CHAIN.replace("WAIT", "true")),
    );
    std::fs::create_dir(s.path("gate")).unwrap();
    s.ok(&["run", "recipe.toml"]);
    let first = s.path(&format!(
        ".rudder/objects/{}/first.txt",
        s.key("recipe.toml", "first")
    ));
    std::fs::write(&first, "edited\n").unwrap();
    let out = s.rudder(&["run", "recipe.toml", "--verify", "full"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "warning: the artifact of `first` is corrupted (file first.txt: digest mismatch): moved to"
        ),
        "{err}"
    );
    assert!(err.contains("ran 1 stage, 2 cached"), "{err}");
    assert_eq!(job_ids(&err).len(), 1, "{err}");
    let script = s.read(&format!(
        ".rudder/slurm/{}.sh",
        s.key("recipe.toml", "first")
    ));
    assert!(script.contains("--verify full"), "{script}");
    assert_eq!(std::fs::read_to_string(&first).unwrap(), "1\n");
    assert_eq!(
        std::fs::read_dir(s.path(".rudder/quarantine"))
            .unwrap()
            .count(),
        1
    );
    s.ok(&["verify", "recipe.toml"]);
}

/// A training job that Slurm requeues mid-stage (as a preemption or a node failure would)
/// resumes from its checkpoint and ends with the weights of an uninterrupted local run.
///
/// The requeue must reach the job between its first checkpoint and its last step: that window
/// is 250 of the 300 steps (several seconds here, some forty times what the requeue takes when
/// the machine is idle), so that a loaded machine does not let the training finish first.
#[test]
fn a_requeued_training_job_resumes_from_its_checkpoint() {
    if !slurm() {
        return;
    }
    let long = |s: &Scratch| {
        let text = s
            .read("recipe.toml")
            .replace("max_steps = 3", "max_steps = 300\ncheckpoint_every = 50");
        s.write("recipe.toml", &text);
    };
    let local = training_scratch();
    long(&local);
    local.ok(&[
        "run",
        "recipe.toml",
        "--executor",
        "local",
        "--until",
        "sft",
    ]);
    let cluster = training_scratch();
    long(&cluster);
    let key = cluster.key("recipe.toml", "sft");
    let mut child = spawn(
        &cluster,
        &["run", "recipe.toml", "--until", "sft"],
        "run.log",
    );
    // The job's id is known once it is submitted, so that nothing but the requeue itself
    // stands between the first checkpoint and the requeue.
    wait_for("the sft job to be submitted", 60, || {
        cluster
            .read("run.log")
            .contains("queued sft (sft): submitted as Slurm job")
    });
    let id = job_ids(&cluster.read("run.log"))
        .into_iter()
        .last()
        .expect("the sft job's id");
    let checkpoint = cluster.path(&format!(".rudder/work/{key}/checkpoint"));
    wait_for("the first checkpoint", 120, || {
        std::fs::read_dir(&checkpoint).is_ok_and(|mut d| d.next().is_some())
    });
    let requeue = Command::new("scontrol")
        .args(["requeue", &id])
        .output()
        .unwrap();
    assert!(requeue.status.success(), "{requeue:?}");
    // Slurm holds a requeued job back for a while (its BeginTime); let it start again now.
    wait_for("the requeued job to be pending", 60, || {
        squeue_state(&id).starts_with("PENDING")
    });
    let release = Command::new("scontrol")
        .args(["update", &format!("JobId={id}"), "StartTime=now"])
        .output()
        .unwrap();
    assert!(release.status.success(), "{release:?}");
    let status = child.wait().unwrap();
    let err = cluster.read("run.log");
    assert!(status.success(), "{err}");
    let log = cluster.read(&format!(".rudder/slurm/{key}.log"));
    assert_eq!(
        log.matches("building `sft`").count(),
        2,
        "the job should have been built twice (did it end before the requeue reached it?): {log}"
    );
    assert!(log.contains("DUE TO JOB REQUEUE"), "{log}");
    let weights = |s: &Scratch| {
        let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
        std::fs::read(Path::new(dir.trim()).join("model.safetensors")).unwrap()
    };
    assert!(
        weights(&local) == weights(&cluster),
        "resumed weights differ"
    );
    let metrics = |s: &Scratch| {
        let dir = s.ok(&["show", "recipe.toml", "sft", "--path"]);
        std::fs::read_to_string(Path::new(dir.trim()).join("metrics.jsonl")).unwrap()
    };
    assert_eq!(metrics(&local), metrics(&cluster));
}
