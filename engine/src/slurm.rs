//! The Slurm executor: every job becomes one `sbatch` job that runs `rudder exec` on that one
//! key over the same store (on a filesystem shared by the cluster's nodes), and Slurm holds the
//! DAG: a job is submitted with `--dependency=afterok:` on the jobs of its inputs and
//! `--kill-on-invalid-dep=yes`, so that a failed input cancels it. rudder submits every job at
//! once, then polls `squeue` (and `sacct` for jobs `squeue` has forgotten), streams each job's
//! log, and reports each end; Ctrl-C cancels its jobs (`scancel`).
//!
//! ```text
//!   rudder run ──sbatch──► job split ◄─afterok── job sft ◄─afterok── job dpo
//!       │ polls squeue         │ rudder exec recipe split --key K1 --store /shared/.rudder
//!       │ tails .rudder/slurm/<key>.log
//!       └ writes the lockfile when every job has ended
//! ```
//!
//! Files, in the store's `slurm/`: `<key>.sh` (the job script, with the sbatch command line in
//! a comment), `<key>.log` (its output, appended across requeues), `<key>.job` (the job id while
//! it may run: a second `rudder run` adopts a live job rather than submitting it again).
//!
//! A job cannot drift from the plan: `rudder exec` plans the recipe itself and refuses to run
//! when its plan gives the node another key. It checks the artifacts it reads against their
//! manifests as a local build does (`--verify` is passed on); an artifact this run's plan found
//! corrupted is quarantined before its job is submitted. A requeued job resumes from the checkpoints in
//! `work/<key>/`. What a job asks for comes from `[stages.x.resources]` over
//! `[executor.resources]`; none of it is in any key.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rudder_schema::{Backend, NodeBody, Precision, Resources};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::executor::{Executor, Job, JobEnd, Run};
use crate::integrity::VerifyMode;
use crate::plan::PlanEntry;
use crate::runner::{Progress, StageOutcome};

/// How many lines of a failed job's log its error shows.
const LOG_TAIL: usize = 20;

/// Version of the `<key>.job` record.
const JOB_RECORD_VERSION: u32 = 1;

/// How long a cancelled run waits for its jobs to stop (they checkpoint on SIGTERM).
const CANCEL_WAIT: Duration = Duration::from_secs(60);

/// Polls a job may go unseen by both `squeue` and `sacct` before it counts as lost.
const UNKNOWN_POLLS: u32 = 10;

pub struct SlurmExecutor {
    /// The `rudder` binary the jobs run, as the compute nodes see it.
    pub program: PathBuf,
    /// The recipe, absolute.
    pub recipe: PathBuf,
    /// `--set` overrides, passed on so that every job plans the keys this run planned.
    pub overrides: Vec<String>,
    /// `--backend` and `--precision`, passed on for the same reason.
    pub backend: Option<Backend>,
    pub precision: Option<Precision>,
    /// `--verify`, passed on so that each job checks its inputs as this run checks artifacts.
    pub verify: VerifyMode,
    /// Time between two polls of `squeue`.
    pub poll: Duration,
}

/// `<key>.job`: the Slurm job that builds a key.
#[derive(Debug, Serialize, Deserialize)]
struct JobRecord {
    version: u32,
    job_id: String,
    job_name: String,
}

/// What Slurm says of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, ...
    pub state: String,
    /// Why it is pending, or where it runs (`squeue`'s `%R`); the exit code once ended.
    pub detail: String,
}

impl JobState {
    /// Whether the job has ended for good. Preempted and node-failed jobs may still be
    /// requeued; [`SlurmExecutor`] waits a few polls before taking them as ended.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "OUT_OF_MEMORY"
                | "NODE_FAIL"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
        )
    }

    fn may_be_requeued(&self) -> bool {
        matches!(self.state.as_str(), "PREEMPTED" | "NODE_FAIL")
    }

    fn has_started(&self) -> bool {
        self.state != "PENDING" && self.state != "REQUEUED" && !self.state.starts_with("REQUEUE")
    }
}

/// A job submitted (or adopted) by this run.
struct Live {
    id: String,
    log: PathBuf,
    /// How much of the log has been shown.
    offset: u64,
    /// The log's last line while it is incomplete.
    partial: String,
    state: Option<JobState>,
    /// Set once the job is seen running.
    progress: Option<Box<dyn Progress>>,
    started: Option<Instant>,
    /// Consecutive polls that did not find the job, or found it preempted.
    doubtful_polls: u32,
    /// This run cancelled it (Ctrl-C, or pending after a failure).
    cancelled: bool,
}

enum Track {
    Live(Box<Live>),
    Done(JobEnd),
}

impl Executor for SlurmExecutor {
    fn execute(&self, run: &Run<'_>, jobs: &[Job<'_>]) -> Vec<JobEnd> {
        let mut tracks: Vec<Option<Track>> = jobs.iter().map(|_| None).collect();
        let dir = run.store.slurm_dir();
        let mut failed = false;
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let err = EngineError::io(format!("creating {}", dir.display()), e);
            let mut ends: Vec<JobEnd> = jobs.iter().map(|_| JobEnd::NotRun).collect();
            ends[0] = JobEnd::Failed(err);
            return ends;
        }
        for (i, job) in jobs.iter().enumerate() {
            let needs_failed = job.needs.iter().any(|&n| {
                matches!(
                    tracks[n],
                    Some(Track::Done(JobEnd::Failed(_) | JobEnd::NotRun))
                )
            });
            if needs_failed
                || (failed && !run.keep_going)
                || run.interrupted.load(Ordering::Relaxed)
            {
                tracks[i] = Some(Track::Done(JobEnd::NotRun));
                continue;
            }
            // A corrupted artifact goes to quarantine here, so that a job builds it again.
            if let Err(err) = run.quarantine_corrupted(job.entry) {
                failed = true;
                tracks[i] = Some(Track::Done(JobEnd::Failed(err)));
                continue;
            }
            if !job.rerun && run.store.contains(&job.entry.key) {
                tracks[i] = Some(Track::Done(JobEnd::Found));
                continue;
            }
            let after: Vec<&str> = job
                .needs
                .iter()
                .filter_map(|&n| match &tracks[n] {
                    Some(Track::Live(live)) => Some(live.id.as_str()),
                    _ => None,
                })
                .collect();
            tracks[i] = Some(match self.submit(run, job, &after) {
                Ok((live, adopted)) => {
                    let how = if adopted {
                        "already queued as"
                    } else {
                        "submitted as"
                    };
                    run.observer
                        .stage_queued(job.entry, &format!("{how} Slurm job {}", live.id));
                    Track::Live(Box::new(live))
                }
                Err(err) => {
                    failed = true;
                    Track::Done(JobEnd::Failed(err))
                }
            });
        }
        let mut tracks: Vec<Track> = tracks
            .into_iter()
            .map(|t| t.expect("every job was considered"))
            .collect();
        if failed && !run.keep_going {
            self.cancel_pending(&mut tracks);
        }
        self.watch(run, jobs, &mut tracks);
        tracks
            .into_iter()
            .map(|track| match track {
                Track::Done(end) => end,
                Track::Live(_) => JobEnd::NotRun,
            })
            .collect()
    }
}

impl SlurmExecutor {
    /// The sbatch job for `job`: a live one recorded by an earlier run (`true`), or a new one.
    fn submit(
        &self,
        run: &Run<'_>,
        job: &Job<'_>,
        after: &[&str],
    ) -> Result<(Live, bool), EngineError> {
        let entry = job.entry;
        let dir = run.store.slurm_dir();
        let hex = entry.key.to_hex();
        let log = dir.join(format!("{hex}.log"));
        let record_path = dir.join(format!("{hex}.job"));
        let job_name = format!("rudder:{}", entry.name);
        if !job.rerun
            && let Some(id) = adoptable(&record_path)
        {
            return Ok((live(id, log), true));
        }
        let _ = std::fs::remove_file(&log);
        let store = absolute(run.store.root());
        let resources = resources_of(run, entry);
        let script = dir.join(format!("{hex}.sh"));
        let args = sbatch_args(&job_name, &log, &run.recipe.dir, after, &resources);
        let mut exec = vec![
            self.program.display().to_string(),
            "exec".into(),
            self.recipe.display().to_string(),
            entry.name.clone(),
            "--key".into(),
            hex.clone(),
            "--store".into(),
            store.display().to_string(),
        ];
        for o in &self.overrides {
            exec.push("--set".into());
            exec.push(o.clone());
        }
        if let Some(backend) = self.backend {
            exec.push("--backend".into());
            exec.push(backend.as_str().into());
        }
        if let Some(precision) = self.precision {
            exec.push("--precision".into());
            exec.push(precision.as_str().into());
        }
        if self.verify == VerifyMode::Full {
            exec.push("--verify".into());
            exec.push("full".into());
        }
        if job.rerun {
            exec.push("--force".into());
        }
        let text = format!(
            "#!/bin/sh\n# Builds `{}` ({}) of {}, key {hex}.\n# Submitted with: sbatch {} {}\nexec {}\n",
            entry.name,
            entry.kind,
            self.recipe.display(),
            args.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            shell_quote(&script.display().to_string()),
            exec.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
        );
        crate::fsutil::write_atomic(&script, text.as_bytes())?;
        let output = Command::new("sbatch")
            .arg("--parsable")
            .args(&args)
            .arg(&script)
            .output()
            .map_err(|e| fail(entry, format!("cannot run `sbatch`: {e}")))?;
        if !output.status.success() {
            return Err(fail(
                entry,
                format!(
                    "sbatch refused the job: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = parse_job_id(&stdout).ok_or_else(|| {
            fail(
                entry,
                format!("sbatch printed no job id: {:?}", stdout.trim()),
            )
        })?;
        let record = JobRecord {
            version: JOB_RECORD_VERSION,
            job_id: id.clone(),
            job_name,
        };
        crate::fsutil::write_atomic(
            &record_path,
            serde_json::to_string(&record)
                .expect("record serialises")
                .as_bytes(),
        )?;
        Ok((live(id, log), false))
    }

    /// Polls until every job has ended, streaming their logs; on Ctrl-C cancels them.
    fn watch(&self, run: &Run<'_>, jobs: &[Job<'_>], tracks: &mut [Track]) {
        let total = jobs.len();
        let mut cancelled_at: Option<Instant> = None;
        loop {
            if run.interrupted.load(Ordering::Relaxed) && cancelled_at.is_none() {
                let ids: Vec<String> = live_ids(tracks);
                if !ids.is_empty() {
                    let _ = Command::new("scancel").args(&ids).status();
                }
                for track in tracks.iter_mut() {
                    if let Track::Live(live) = track {
                        live.cancelled = true;
                    }
                }
                cancelled_at = Some(Instant::now());
            }
            let ids = live_ids(tracks);
            if ids.is_empty() {
                break;
            }
            if cancelled_at.is_some_and(|at| at.elapsed() > CANCEL_WAIT) {
                break;
            }
            let Some(states) = query(&ids) else {
                for track in tracks.iter_mut() {
                    if let Track::Live(live) = track {
                        stream(live);
                    }
                }
                sleep_unless_interrupted(run, self.poll);
                continue;
            };
            let mut newly_failed = false;
            for i in 0..tracks.len() {
                let Track::Live(live) = &mut tracks[i] else {
                    continue;
                };
                let entry = jobs[i].entry;
                let state = states.get(&live.id).cloned();
                match &state {
                    Some(s) if s.is_final() && s.may_be_requeued() => live.doubtful_polls += 1,
                    Some(_) => live.doubtful_polls = 0,
                    None => live.doubtful_polls += 1,
                }
                if let Some(s) = &state
                    && live.progress.is_none()
                    && (s.has_started() && !s.is_final()
                        || s.is_final() && (s.state != "CANCELLED" || has_output(&live.log)))
                {
                    live.progress = Some(run.observer.stage_started(
                        entry,
                        run.next_position(),
                        total,
                    ));
                    live.started = Some(Instant::now());
                }
                if let (Some(progress), Some(s)) = (&live.progress, &state)
                    && live.state.as_ref() != Some(s)
                {
                    progress.set_message(format!("Slurm job {} {}", live.id, s.describe()));
                }
                stream(live);
                if state.is_some() {
                    live.state = state.clone();
                }
                // A site that ignores --kill-on-invalid-dep leaves such a job pending forever.
                if state
                    .as_ref()
                    .is_some_and(|s| s.detail.contains("DependencyNeverSatisfied"))
                    && !live.cancelled
                {
                    let _ = Command::new("scancel").arg(&live.id).status();
                    live.cancelled = true;
                }
                let ended = match &state {
                    Some(s) if s.is_final() => !s.may_be_requeued() || live.doubtful_polls >= 3,
                    Some(_) => false,
                    None => live.doubtful_polls >= UNKNOWN_POLLS,
                };
                if !ended {
                    continue;
                }
                let needs_failed = jobs[i]
                    .needs
                    .iter()
                    .any(|&n| matches!(tracks[n], Track::Done(JobEnd::Failed(_) | JobEnd::NotRun)));
                let Track::Live(live) =
                    std::mem::replace(&mut tracks[i], Track::Done(JobEnd::NotRun))
                else {
                    unreachable!("matched above");
                };
                let end = self.finish(run, entry, *live, needs_failed);
                newly_failed |= matches!(end, JobEnd::Failed(_));
                tracks[i] = Track::Done(end);
            }
            if newly_failed && !run.keep_going {
                self.cancel_pending(tracks);
            }
            sleep_unless_interrupted(run, self.poll);
        }
    }

    /// The end of a job Slurm says has ended.
    fn finish(&self, run: &Run<'_>, entry: &PlanEntry, live: Live, needs_failed: bool) -> JobEnd {
        let record = run
            .store
            .slurm_dir()
            .join(format!("{}.job", entry.key.to_hex()));
        let _ = std::fs::remove_file(record);
        let seconds = live.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let state = live.state.clone();
        let completed = state.as_ref().is_some_and(|s| s.state == "COMPLETED");
        if completed && run.store.contains(&entry.key) {
            let manifest = run.store.manifest(&entry.key).ok().flatten();
            let outcome = StageOutcome {
                summary: manifest
                    .as_ref()
                    .map(|m| m.summary.clone())
                    .unwrap_or_default(),
            };
            let seconds = manifest.map_or(seconds, |m| m.seconds);
            if live.progress.is_some() {
                run.observer.stage_finished(entry, Ok(&outcome), seconds);
            }
            return JobEnd::Built { outcome, seconds };
        }
        let cancelled = state.as_ref().is_some_and(|s| s.state == "CANCELLED");
        // Cancelled by this run, or by Slurm because an input failed: it did not fail itself.
        if cancelled && (live.cancelled || needs_failed) {
            return JobEnd::NotRun;
        }
        let what = match &state {
            Some(s) if completed => format!(
                "Slurm job {} completed, but its artifact is not in the store ({})",
                live.id,
                s.describe()
            ),
            Some(s) => format!("Slurm job {} {}", live.id, s.describe()),
            None => format!(
                "Slurm job {} is gone: neither squeue nor sacct knows it",
                live.id
            ),
        };
        let tail = log_tail(&live.log, LOG_TAIL);
        let message = if tail.is_empty() {
            format!("{what}; its log {} is empty", live.log.display())
        } else {
            format!(
                "{what}\n--- last lines of {} ---\n{tail}",
                live.log.display()
            )
        };
        if live.progress.is_some() {
            run.observer.stage_finished(entry, Err(&message), seconds);
        }
        JobEnd::Failed(fail(entry, message))
    }

    /// After a failure: cancels the jobs that have not started (running ones finish).
    fn cancel_pending(&self, tracks: &mut [Track]) {
        let mut pending: Vec<String> = Vec::new();
        for track in tracks.iter_mut() {
            if let Track::Live(live) = track
                && live.progress.is_none()
            {
                live.cancelled = true;
                pending.push(live.id.clone());
            }
        }
        if !pending.is_empty() {
            let _ = Command::new("scancel")
                .arg("--state=PENDING")
                .args(&pending)
                .status();
        }
    }
}

impl JobState {
    fn describe(&self) -> String {
        if self.detail.is_empty() {
            self.state.clone()
        } else {
            format!("{} ({})", self.state, self.detail)
        }
    }
}

fn live(id: String, log: PathBuf) -> Live {
    Live {
        id,
        log,
        offset: 0,
        partial: String::new(),
        state: None,
        progress: None,
        started: None,
        doubtful_polls: 0,
        cancelled: false,
    }
}

fn fail(entry: &PlanEntry, message: String) -> EngineError {
    EngineError::StageFailed {
        node: entry.name.clone(),
        kind: entry.kind.clone(),
        message,
    }
}

fn live_ids(tracks: &[Track]) -> Vec<String> {
    tracks
        .iter()
        .filter_map(|t| match t {
            Track::Live(live) => Some(live.id.clone()),
            Track::Done(_) => None,
        })
        .collect()
}

fn sleep_unless_interrupted(run: &Run<'_>, total: Duration) {
    let until = Instant::now() + total;
    while Instant::now() < until && !run.interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50).min(total));
    }
}

/// The job recorded at `path` if Slurm still has it pending or running under the same name.
fn adoptable(path: &Path) -> Option<String> {
    let record: JobRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    if record.version != JOB_RECORD_VERSION {
        return None;
    }
    let output = Command::new("squeue")
        .args(["--noheader", "--format=%i|%j|%T", "--jobs"])
        .arg(&record.job_id)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next()?;
    let mut fields = line.split('|');
    let (id, name, state) = (fields.next()?, fields.next()?, fields.next()?);
    let state = JobState {
        state: state.trim().to_owned(),
        detail: String::new(),
    };
    (id.trim() == record.job_id && name.trim() == record.job_name && !state.is_final())
        .then_some(record.job_id)
}

/// The resources of `entry`'s stage over the executor's defaults.
fn resources_of(run: &Run<'_>, entry: &PlanEntry) -> Resources {
    let vertex = run.graph.vertex(entry.index);
    match &run.recipe.nodes[vertex.node].body {
        NodeBody::Stage(stage) => stage.resources.or(&run.recipe.executor.resources),
        _ => run.recipe.executor.resources.clone(),
    }
}

/// sbatch's options for one job (before the script).
pub fn sbatch_args(
    job_name: &str,
    log: &Path,
    workdir: &Path,
    after: &[&str],
    resources: &Resources,
) -> Vec<String> {
    let mut args = vec![
        format!("--job-name={job_name}"),
        format!("--output={}", log.display()),
        // A requeued job appends to its log rather than truncating what it said before.
        "--open-mode=append".to_owned(),
        "--nodes=1".to_owned(),
        "--ntasks=1".to_owned(),
        format!("--chdir={}", workdir.display()),
    ];
    if !after.is_empty() {
        args.push(format!("--dependency=afterok:{}", after.join(":")));
        args.push("--kill-on-invalid-dep=yes".to_owned());
    }
    if let Some(gpus) = resources.gpus.filter(|&g| g > 0) {
        args.push(format!("--gres=gpu:{gpus}"));
    }
    if let Some(cpus) = resources.cpus {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(mem) = &resources.mem {
        args.push(format!("--mem={mem}"));
    }
    if let Some(time) = &resources.time {
        args.push(format!("--time={time}"));
    }
    if let Some(partition) = &resources.partition {
        args.push(format!("--partition={partition}"));
    }
    if let Some(account) = &resources.account {
        args.push(format!("--account={account}"));
    }
    args.extend(resources.extra.iter().cloned());
    args
}

/// `sbatch --parsable` prints `ID` or `ID;CLUSTER`.
pub fn parse_job_id(stdout: &str) -> Option<String> {
    let id = stdout.trim().split(';').next()?.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_')).then(|| id.to_owned())
}

/// What Slurm says of each job: `squeue` for the jobs it still has, `sacct` for the others
/// (`--completion` when the cluster keeps no accounting database, only a completion log).
/// `None` when the controller does not answer (a restart, a timeout): nothing is known then.
fn query(ids: &[String]) -> Option<BTreeMap<String, JobState>> {
    let list = ids.join(",");
    let mut states = BTreeMap::new();
    let output = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%i|%T|%R"])
        .arg(format!("--jobs={list}"))
        .output()
        .ok()?;
    // squeue fails when it knows none of the ids; that is an answer, unlike an unreachable
    // controller.
    if !output.status.success()
        && !String::from_utf8_lossy(&output.stderr).contains("Invalid job id")
    {
        return None;
    }
    states.extend(parse_squeue(&String::from_utf8_lossy(&output.stdout)));
    let missing: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !states.contains_key(*id))
        .collect();
    if missing.is_empty() {
        return Some(states);
    }
    let sacct = |completion: bool| {
        let mut command = Command::new("sacct");
        command.args([
            "--noheader",
            "--parsable2",
            "--format=JobIDRaw,State,ExitCode",
        ]);
        if completion {
            command.arg("--completion");
        } else {
            command.arg("--allocations");
        }
        command
            .arg(format!("--jobs={}", missing.join(",")))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| parse_sacct(&String::from_utf8_lossy(&o.stdout)))
    };
    if let Some(found) = sacct(false).or_else(|| sacct(true)) {
        for (id, state) in found {
            if missing.contains(&id.as_str()) {
                states.insert(id, state);
            }
        }
    }
    Some(states)
}

/// `squeue --format=%i|%T|%R` lines.
pub fn parse_squeue(text: &str) -> BTreeMap<String, JobState> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, '|');
            let id = fields.next()?.trim();
            let state = fields.next()?.trim();
            let detail = fields.next().unwrap_or("").trim();
            let detail = match detail {
                "(None)" | "None" => "",
                other => other.trim_start_matches('(').trim_end_matches(')'),
            };
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_owned(),
                    JobState {
                        state: state.to_owned(),
                        detail: detail.to_owned(),
                    },
                )
            })
        })
        .collect()
}

/// `sacct --parsable2 --format=JobIDRaw,State,ExitCode` lines (job steps, `ID.batch`, skipped;
/// the last record of a requeued job wins).
pub fn parse_sacct(text: &str) -> BTreeMap<String, JobState> {
    let mut states = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('|').collect();
        let [id, state, exit, ..] = fields.as_slice() else {
            continue;
        };
        if id.is_empty() || id.contains('.') {
            continue;
        }
        // `CANCELLED by 0`: the state is the first word.
        let state = state.split_whitespace().next().unwrap_or("").to_owned();
        if state.is_empty() {
            continue;
        }
        states.insert(
            (*id).to_owned(),
            JobState {
                state,
                detail: format!("exit code {exit}"),
            },
        );
    }
    states
}

/// Shows what the job's log gained since the last look, line by line through its progress.
fn stream(live: &mut Live) {
    // A job not seen running has written nothing yet; what it writes is shown once it is.
    let Some(progress) = &live.progress else {
        return;
    };
    let Ok(mut file) = std::fs::File::open(&live.log) else {
        return;
    };
    let Ok(length) = file.metadata().map(|m| m.len()) else {
        return;
    };
    if length < live.offset {
        // Truncated (a new attempt): start again.
        live.offset = 0;
        live.partial.clear();
    }
    if length == live.offset || file.seek(SeekFrom::Start(live.offset)).is_err() {
        return;
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return;
    }
    live.offset += bytes.len() as u64;
    live.partial.push_str(&String::from_utf8_lossy(&bytes));
    let Some(complete) = live.partial.rfind('\n') else {
        return;
    };
    let lines: String = live.partial.drain(..=complete).collect();
    for line in lines.lines() {
        progress.println(line);
    }
}

/// Whether a job wrote anything (a job cancelled while pending did not).
fn has_output(log: &Path) -> bool {
    std::fs::metadata(log).is_ok_and(|m| m.len() > 0)
}

/// The last `n` lines of a log, without terminal control sequences' carriage returns.
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `text` as one word for `sh`.
pub fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbatch_options_follow_the_resources() {
        let resources = Resources {
            gpus: Some(2),
            cpus: Some(8),
            mem: Some("64G".into()),
            time: Some("4:00:00".into()),
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            extra: vec!["--qos=high".into()],
        };
        let args = sbatch_args(
            "rudder:sft",
            Path::new("/s/slurm/k.log"),
            Path::new("/r"),
            &["11", "12"],
            &resources,
        );
        assert_eq!(
            args,
            [
                "--job-name=rudder:sft",
                "--output=/s/slurm/k.log",
                "--open-mode=append",
                "--nodes=1",
                "--ntasks=1",
                "--chdir=/r",
                "--dependency=afterok:11:12",
                "--kill-on-invalid-dep=yes",
                "--gres=gpu:2",
                "--cpus-per-task=8",
                "--mem=64G",
                "--time=4:00:00",
                "--partition=gpu",
                "--account=lab",
                "--qos=high",
            ]
        );
        let bare = sbatch_args(
            "rudder:x",
            Path::new("/l"),
            Path::new("/r"),
            &[],
            &Resources::default(),
        );
        assert_eq!(bare.len(), 6);
    }

    #[test]
    fn slurm_output_is_parsed() {
        assert_eq!(parse_job_id("123\n").as_deref(), Some("123"));
        assert_eq!(parse_job_id("77;cluster\n").as_deref(), Some("77"));
        assert_eq!(parse_job_id("Submitted batch job 5"), None);
        let states = parse_squeue("5|PENDING|(Dependency)\n6|RUNNING|node3\n7|COMPLETED|(None)\n");
        assert_eq!(states["5"].describe(), "PENDING (Dependency)");
        assert!(!states["5"].has_started() && !states["5"].is_final());
        assert!(states["6"].has_started() && !states["6"].is_final());
        assert!(states["7"].is_final());
        assert_eq!(states["7"].detail, "");
        let states = parse_sacct("8|FAILED|1:0\n8.batch|FAILED|1:0\n9|CANCELLED by 0|0:15\n");
        assert_eq!(states.len(), 2);
        assert_eq!(states["8"].describe(), "FAILED (exit code 1:0)");
        assert_eq!(states["9"].state, "CANCELLED");
    }

    #[test]
    fn quoting_survives_the_shell() {
        for text in [
            "plain",
            "with space",
            "it's",
            "",
            "a\"b$c`d",
            "stages.x.env.A=\"1 2\"",
        ] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(text)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), text);
        }
    }
}
