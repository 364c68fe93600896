//! Running a plan: the plan's stages become [`Job`]s (one per key, each naming the jobs it
//! needs), an [`Executor`] carries them out (on threads of this process, `local.rs`, or as Slurm
//! jobs, `slurm.rs`), and [`Run`] records the run and the lockfile. [`Run::build`] is how one
//! key is built wherever a job runs: take the key's lock, run the stage into a pending
//! artifact, commit it on success, discard it on failure.
//!
//! ```text
//!   plan ──► jobs (deduplicated by key) ──► Executor::execute ──► ends ──► lockfile, run record
//!                                             │ local: threads calling Run::build
//!                                             │ slurm: sbatch jobs running `rudder exec`,
//!                                             │        which calls Run::build
//! ```
//!
//! Every artifact is checked against its manifest just before a stage reads it; a corrupted
//! one is moved to quarantine, never read (the plan already sends corrupted artifacts it finds
//! to be rebuilt, and the builder of such a key quarantines it under the key's lock; this
//! catches those that changed since). A Slurm job checks its inputs the same way, since
//! `rudder exec` builds through [`Run::build`] too.
//!
//! What a stage is given and how a kind plugs in is `runner.rs`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use petgraph::Direction;
use rudder_schema::kinds::Produces;
use rudder_schema::{DataFormat, NodeBody, Recipe};
use serde_json::json;

use crate::error::EngineError;
use crate::graph::{Graph, Source};
use crate::integrity::{Problem, VerifyMode};
use crate::key::Key;
use crate::lockfile::{LOCKFILE_VERSION, LockEntry, Lockfile};
use crate::plan::{Plan, PlanEntry, Reason, State};
use crate::runner::{InputKind, Progress, Registry, StageContext, StageInput, StageOutcome};
use crate::store::{Health, LAYOUT_VERSION, Manifest, Store};

/// Callbacks for the user interface. Stages may run at once, so each is called from the
/// thread that runs (or watches) that stage.
pub trait Observer: Send + Sync {
    fn waiting_for_lock(&self, holder: Option<u32>);
    /// Another process (`holder`: `pid 12 on node3`) is building this stage's key; the run
    /// waits for it and then uses its artifact.
    fn waiting_for_key(&self, entry: &PlanEntry, holder: Option<&str>) {
        let _ = (entry, holder);
    }
    /// The stage waits in a cluster's queue (`detail`: `submitted as Slurm job 12`).
    fn stage_queued(&self, entry: &PlanEntry, detail: &str) {
        let _ = (entry, detail);
    }
    fn stage_started(&self, entry: &PlanEntry, position: usize, total: usize) -> Box<dyn Progress>;
    fn stage_finished(&self, entry: &PlanEntry, result: Result<&StageOutcome, &str>, seconds: f64);
    /// A corrupted artifact was moved to `place` (a directory in the store's quarantine).
    fn quarantined(&self, node: &str, place: &std::path::Path, problems: &[Problem]) {
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        tracing::warn!(
            "artifact of `{node}` is corrupted ({}): moved to {}",
            problems.join(", "),
            place.display()
        );
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RunReport {
    /// `(vertex name, seconds)` of every stage that ran.
    pub ran: Vec<(String, f64)>,
    pub cached: usize,
    /// Stages another run built while this one was running.
    pub built_elsewhere: usize,
}

/// One key to build: the first plan entry that has it (identical stages under two names are
/// one job).
#[derive(Debug)]
pub struct Job<'p> {
    pub entry: &'p PlanEntry,
    /// Indices of the jobs that must succeed before this one starts.
    pub needs: Vec<usize>,
    /// Build even when the key is in the store: forced, or what it wrote outside the store
    /// is gone.
    pub rerun: bool,
}

/// How a job ended.
#[derive(Debug)]
pub enum JobEnd {
    /// Built by this run.
    Built {
        outcome: StageOutcome,
        seconds: f64,
    },
    /// In the store already when its turn came: another run built it meanwhile.
    Found,
    Failed(EngineError),
    /// Never started: an input failed, or the run stopped (a failure without `--keep-going`,
    /// or Ctrl-C).
    NotRun,
}

/// Where and how jobs are carried out.
pub trait Executor {
    /// Carries out every job after the jobs it needs, telling `run.observer` as stages start
    /// and finish. Returns how each job ended, in the order of `jobs`. After a failure it
    /// starts nothing more unless `run.keep_going`, then only jobs that need no failed one; on
    /// `run.interrupted` it starts nothing more and lets running stages checkpoint and stop.
    fn execute(&self, run: &Run<'_>, jobs: &[Job<'_>]) -> Vec<JobEnd>;
}

/// One run of a plan.
pub struct Run<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub plan: &'a Plan,
    pub observer: &'a dyn Observer,
    pub interrupted: &'a AtomicBool,
    /// After a failure, go on with the stages that do not depend on it.
    pub keep_going: bool,
    /// How inputs are checked before a stage reads them.
    pub verify: VerifyMode,
    /// Numbers the stages as they start (`[3/10]`).
    started: AtomicUsize,
}

impl<'a> Run<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        recipe: &'a Recipe,
        graph: &'a Graph,
        registry: &'a Registry,
        store: &'a Store,
        plan: &'a Plan,
        observer: &'a dyn Observer,
        interrupted: &'a AtomicBool,
        keep_going: bool,
        verify: VerifyMode,
    ) -> Self {
        Run {
            recipe,
            graph,
            registry,
            store,
            plan,
            observer,
            interrupted,
            keep_going,
            verify,
            started: AtomicUsize::new(0),
        }
    }

    /// Runs the plan with `executor`. The caller holds the store lock. The lockfile records what
    /// is built: it is written after a run that succeeded, and after one that failed but built
    /// something (a stage that failed or did not run keeps its previous entry).
    pub fn run(&self, lock: &Lockfile, executor: &dyn Executor) -> Result<RunReport, EngineError> {
        let started = SystemTime::now();
        let jobs = self.jobs();
        let ends = if jobs.is_empty() {
            Vec::new()
        } else {
            executor.execute(self, &jobs)
        };
        let mut report = RunReport::default();
        let mut failures = Vec::new();
        let mut not_run = Vec::new();
        for (job, end) in jobs.iter().zip(ends) {
            match end {
                JobEnd::Built { seconds, .. } => report.ran.push((job.entry.name.clone(), seconds)),
                JobEnd::Found => report.built_elsewhere += 1,
                JobEnd::Failed(err) => failures.push(err),
                JobEnd::NotRun => not_run.push(job.entry.name.clone()),
            }
        }
        report.cached = self
            .plan
            .entries
            .iter()
            .filter(|e| e.state == State::Cached && !e.is_source)
            .count();
        let interrupted = self.interrupted.load(Ordering::Relaxed);
        let failure = if interrupted {
            Some(EngineError::Interrupted)
        } else if failures.is_empty() {
            None
        } else if failures.len() == 1 && not_run.is_empty() {
            failures.pop()
        } else {
            Some(EngineError::RunFailed { failures, not_run })
        };
        self.record_run(&report, started, failure.as_ref())?;
        if failure.is_none() || !report.ran.is_empty() {
            self.write_lockfile(lock)?;
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(report),
        }
    }

    /// The plan's stages to run as jobs: one per key, in plan order, each needing the jobs of
    /// the vertices it reads or comes after, directly or through a source (for a key shared by
    /// two vertices, those of both).
    pub fn jobs(&self) -> Vec<Job<'a>> {
        let plan = self.plan;
        let mut by_key: BTreeMap<Key, usize> = BTreeMap::new();
        let mut jobs: Vec<Job<'a>> = Vec::new();
        let mut members: Vec<Vec<&PlanEntry>> = Vec::new();
        for entry in plan.to_run() {
            let rerun = entry
                .reasons
                .iter()
                .any(|r| matches!(r, Reason::Forced | Reason::ExternalMissing(_)));
            match by_key.get(&entry.key) {
                Some(&i) => {
                    jobs[i].rerun |= rerun;
                    members[i].push(entry);
                }
                None => {
                    by_key.insert(entry.key, jobs.len());
                    jobs.push(Job {
                        entry,
                        needs: Vec::new(),
                        rerun,
                    });
                    members.push(vec![entry]);
                }
            }
        }
        let job_of: BTreeMap<_, usize> = members
            .iter()
            .enumerate()
            .flat_map(|(i, entries)| entries.iter().map(move |e| (e.index, i)))
            .collect();
        for (i, entries) in members.iter().enumerate() {
            let mut needs = BTreeSet::new();
            let mut stack: Vec<_> = entries.iter().map(|e| e.index).collect();
            let mut seen = BTreeSet::new();
            while let Some(index) = stack.pop() {
                for from in self
                    .graph
                    .graph
                    .neighbors_directed(index, Direction::Incoming)
                {
                    if !seen.insert(from) {
                        continue;
                    }
                    match job_of.get(&from) {
                        Some(&j) if j != i => {
                            needs.insert(j);
                        }
                        Some(_) => {}
                        // A fresh model is a source that reads a tokenizer stage: its
                        // readers need that stage's job.
                        None if plan.keyed[&from].is_source => stack.push(from),
                        None => {}
                    }
                }
            }
            jobs[i].needs = needs.into_iter().collect();
        }
        jobs
    }

    /// The number of the next stage to start (`[3/10]`).
    pub fn next_position(&self) -> usize {
        self.started.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Builds one job's key on this thread with `threads` threads: waits for the key's lock,
    /// and builds it unless it is in the store by then (another process built it).
    pub fn build(&self, job: &Job<'_>, total: usize, threads: usize) -> JobEnd {
        let entry = job.entry;
        let _key_lock = match self.store.lock_key(&entry.key, |holder| {
            self.observer.waiting_for_key(entry, holder.as_deref());
        }) {
            Ok(lock) => lock,
            Err(err) => return JobEnd::Failed(err),
        };
        if is_corrupted(entry)
            && let Err(err) = self.quarantine_if_corrupted(&entry.key, &entry.name)
        {
            return JobEnd::Failed(err);
        }
        if !job.rerun && self.store.contains(&entry.key) {
            return JobEnd::Found;
        }
        if self.interrupted.load(Ordering::Relaxed) {
            return JobEnd::NotRun;
        }
        let position = self.next_position();
        let clock = Instant::now();
        let progress = self.observer.stage_started(entry, position, total);
        // A panicking stage fails alone; the others keep running.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_one(entry, progress.as_ref(), threads)
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            Err(EngineError::StageFailed {
                node: entry.name.clone(),
                kind: entry.kind.clone(),
                message: format!("panicked: {message}"),
            })
        });
        let seconds = clock.elapsed().as_secs_f64();
        match result {
            Ok(outcome) => {
                self.observer.stage_finished(entry, Ok(&outcome), seconds);
                drop(progress);
                JobEnd::Built { outcome, seconds }
            }
            Err(err) => {
                self.observer
                    .stage_finished(entry, Err(&err.to_string()), seconds);
                drop(progress);
                if matches!(err, EngineError::Interrupted) {
                    JobEnd::NotRun
                } else {
                    JobEnd::Failed(err)
                }
            }
        }
    }

    fn run_one(
        &self,
        entry: &PlanEntry,
        progress: &dyn Progress,
        threads: usize,
    ) -> Result<StageOutcome, EngineError> {
        let plan = self.plan;
        let vertex = self.graph.vertex(entry.index);
        let node = &self.recipe.nodes[vertex.node];
        let NodeBody::Stage(stage) = &node.body else {
            unreachable!("only stages run");
        };
        let fail = |message: String| EngineError::StageFailed {
            node: entry.name.clone(),
            kind: entry.kind.clone(),
            message,
        };
        let runner = self.registry.get(&entry.kind).ok_or_else(|| {
            fail(format!(
                "stage kind `{}` is not implemented in this build of rudder (validate, plan and dag work; run does not)",
                entry.kind
            ))
        })?;
        let keyed = &plan.keyed[&entry.index];
        // A job started on its own (`rudder exec`) relies on its inputs being built.
        for input in &vertex.inputs {
            if let Source::Vertex { index, .. } = input.source {
                let from = &plan.keyed[&index];
                if !from.is_source && !self.store.contains(&from.key) {
                    return Err(fail(format!(
                        "its input `{}` ({}) is not in the store",
                        self.graph.vertex(index).name,
                        from.key.short()
                    )));
                }
            }
        }
        let inputs = self.inputs(entry)?;
        let work_dir = self.store.work_dir(&entry.key);
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| EngineError::io(format!("creating {}", work_dir.display()), e))?;
        let pending = self.store.begin(&entry.key)?;
        let started = SystemTime::now();
        let clock = Instant::now();
        let ctx = StageContext {
            name: &entry.name,
            kind: &entry.kind,
            key: entry.key,
            spec: stage.spec.as_ref(),
            part: vertex.part.as_ref(),
            inputs,
            out_dir: &pending.dir,
            work_dir: &work_dir,
            recipe_dir: &self.recipe.dir,
            seed: stage.seed,
            backend: keyed.backend,
            precision: stage.precision,
            threads,
            progress,
            interrupted: self.interrupted,
        };
        // A command stage's memory is its own process's, which this one does not see.
        let peak = (entry.kind != "command").then(crate::peak::PeakWatch::start);
        let result = runner.run_noted(&ctx);
        let peak_memory = peak.as_ref().and_then(crate::peak::PeakWatch::peak);
        drop(peak);
        let (outcome, notes) = match result {
            Ok(outcome) if !self.interrupted.load(Ordering::Relaxed) => outcome,
            Ok(_) => {
                self.store.abandon(pending);
                return Err(EngineError::Interrupted);
            }
            Err(err) => {
                self.store.abandon(pending);
                if self.interrupted.load(Ordering::Relaxed) {
                    return Err(EngineError::Interrupted);
                }
                return Err(fail(err.to_string()));
            }
        };
        // Declared outputs must exist before anything is committed.
        let declared = stage.spec.produces();
        if vertex.part.is_none() {
            let missing: Vec<&str> = declared
                .outputs()
                .iter()
                .filter(|(_, file)| !pending.dir.join(file).is_file())
                .map(|(_, file)| file.as_str())
                .collect();
            if !missing.is_empty() {
                self.store.abandon(pending);
                return Err(fail(format!(
                    "did not create its declared output(s): {}",
                    missing.join(", ")
                )));
            }
        }
        let files = match self.store.describe_files(&pending) {
            Ok(files) => files,
            Err(e) => {
                self.store.abandon(pending);
                return Err(e);
            }
        };
        let manifest = Manifest {
            layout: LAYOUT_VERSION,
            key: entry.key.to_hex(),
            kind: entry.kind.clone(),
            name: entry.name.clone(),
            implementation_version: runner.version(),
            params: keyed.entry.params.clone(),
            inputs: keyed.entry.inputs.clone(),
            seed: stage.seed,
            backend: keyed.backend.as_str().into(),
            precision: stage.precision.as_str().into(),
            files,
            summary: outcome.summary.clone(),
            sandbox: notes.sandbox,
            rudder_version: env!("CARGO_PKG_VERSION").into(),
            started: humantime::format_rfc3339_seconds(started).to_string(),
            seconds: clock.elapsed().as_secs_f64(),
            peak_memory,
        };
        self.store.commit(pending, &manifest)?;
        let _ = std::fs::remove_dir_all(&work_dir);
        Ok(outcome)
    }

    /// Each input's path and description.
    fn inputs(&self, entry: &PlanEntry) -> Result<Vec<StageInput>, EngineError> {
        let plan = self.plan;
        let vertex = self.graph.vertex(entry.index);
        let mut inputs = Vec::new();
        for input in &vertex.inputs {
            let stage_input = match &input.source {
                Source::File(path) => {
                    StageInput {
                        role: input.role.clone(),
                        node: path.display().to_string(),
                        key: Key::from_hex(&crate::digest::hash_file(path).map_err(|e| {
                            EngineError::io(format!("reading {}", path.display()), e)
                        })?)
                        .expect("BLAKE3 hex is a key"),
                        path: Some(path.clone()),
                        kind: InputKind::File,
                    }
                }
                Source::Vertex { index, output } => {
                    let from = self.graph.vertex(*index);
                    let keyed = &plan.keyed[index];
                    let node = &self.recipe.nodes[from.node];
                    let (path, kind) = match (&node.body, &from.part) {
                        (NodeBody::Dataset(spec), _) => (
                            Some(self.recipe.dir.join(&spec.path)),
                            InputKind::Dataset {
                                format: spec.input_format().expect("validated when loading"),
                                columns: spec.columns.clone(),
                            },
                        ),
                        (NodeBody::Model(model), _) => match &model.spec.hf {
                            Some(hf) => (
                                Some(self.recipe.dir.join(hf)),
                                match (&model.spec.adapter, input.bare) {
                                    (Some(adapter), false) => InputKind::AdaptedModel {
                                        adapter: self.recipe.dir.join(adapter),
                                    },
                                    _ => InputKind::Model,
                                },
                            ),
                            None => (
                                None,
                                InputKind::FreshModel {
                                    spec: model.spec.clone(),
                                    tokenizer: self.tokenizer_of(entry, from)?,
                                },
                            ),
                        },
                        (NodeBody::Stage(stage), part) => {
                            self.check_input(entry, &keyed.key, &from.name)?;
                            let dir = self.store.object_dir(&keyed.key);
                            let produces = if part.is_some() {
                                Produces::Files(Vec::new())
                            } else {
                                stage.spec.produces()
                            };
                            let chosen = match output {
                                Some(o) => produces.outputs().iter().find(|(name, _)| name == o),
                                None => produces
                                    .outputs()
                                    .first()
                                    .filter(|_| matches!(produces, Produces::Datasets(_))),
                            };
                            match chosen {
                                Some((_, file)) => {
                                    let format = DataFormat::from_path(file);
                                    let kind = match format {
                                        Some(format) => InputKind::Dataset {
                                            format,
                                            columns: BTreeMap::new(),
                                        },
                                        None => InputKind::Artifact {
                                            kind: keyed.entry.kind.clone(),
                                        },
                                    };
                                    (Some(dir.join(file)), kind)
                                }
                                None => (
                                    Some(dir),
                                    InputKind::Artifact {
                                        kind: keyed.entry.kind.clone(),
                                    },
                                ),
                            }
                        }
                    };
                    StageInput {
                        role: input.role.clone(),
                        node: from.name.clone(),
                        key: keyed.key,
                        path,
                        kind,
                    }
                }
            };
            inputs.push(stage_input);
        }
        Ok(inputs)
    }

    /// Where a fresh model's tokenizer is: its tokenizer input's file, or the artifact of the
    /// tokenizer stage it names.
    fn tokenizer_of(
        &self,
        entry: &PlanEntry,
        model: &crate::graph::Vertex,
    ) -> Result<Option<PathBuf>, EngineError> {
        let Some(input) = model.inputs.iter().find(|i| i.role == "tokenizer") else {
            return Ok(None);
        };
        match &input.source {
            Source::File(path) => Ok(Some(path.clone())),
            Source::Vertex { index, .. } => {
                let key = self.plan.keyed[index].key;
                self.check_input(entry, &key, &self.graph.vertex(*index).name)?;
                Ok(Some(self.store.object_dir(&key)))
            }
        }
    }

    /// Before a job is carried out elsewhere (a Slurm job): moves the artifact of `entry` to
    /// quarantine if the plan found it corrupted and it still is, under the key's lock, so that
    /// the job builds it again rather than finding it in the store.
    pub fn quarantine_corrupted(&self, entry: &PlanEntry) -> Result<(), EngineError> {
        if !is_corrupted(entry) {
            return Ok(());
        }
        let _key_lock = self.store.lock_key(&entry.key, |holder| {
            self.observer.waiting_for_key(entry, holder.as_deref());
        })?;
        self.quarantine_if_corrupted(&entry.key, &entry.name)
    }

    /// Moves the artifact `key` to quarantine if it does not match its manifest. The caller
    /// holds the key's lock.
    fn quarantine_if_corrupted(&self, key: &Key, node: &str) -> Result<(), EngineError> {
        if let Health::Corrupted(problems) = self.store.check(key, self.verify) {
            let place = self.store.quarantine(key, &problems)?;
            self.observer.quarantined(node, &place, &problems);
        }
        Ok(())
    }

    /// Checks the artifact of an input before `entry` reads it: a corrupted one is moved to
    /// quarantine and fails the stage, and the next run builds it again.
    fn check_input(&self, entry: &PlanEntry, key: &Key, node: &str) -> Result<(), EngineError> {
        let fail = |message: String| EngineError::StageFailed {
            node: entry.name.clone(),
            kind: entry.kind.clone(),
            message,
        };
        let missing = || fail(format!("input `{node}` is not in the store"));
        match self.store.check(key, self.verify) {
            Health::Intact => Ok(()),
            Health::Missing => Err(missing()),
            Health::Corrupted(_) => {
                // Stages reading the same input at once quarantine it once: under its key's
                // lock, checked again (another run may have rebuilt it meanwhile).
                let _key_lock = self.store.lock_key(key, |_| {})?;
                let problems = match self.store.check(key, self.verify) {
                    Health::Intact => return Ok(()),
                    Health::Missing => return Err(missing()),
                    Health::Corrupted(problems) => problems,
                };
                let place = self.store.quarantine(key, &problems)?;
                self.observer.quarantined(node, &place, &problems);
                let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
                Err(fail(format!(
                    "input `{node}` is corrupted ({}); it was moved to {} and is not read: run again to rebuild it",
                    shown.join(", "),
                    place.display()
                )))
            }
        }
    }

    /// The lockfile after a run: every vertex whose artifact is now in the store (and every
    /// source); other vertices keep their previous entries.
    fn write_lockfile(&self, previous: &Lockfile) -> Result<(), EngineError> {
        let mut nodes: Vec<LockEntry> = Vec::new();
        for &index in &self.graph.order {
            let keyed = &self.plan.keyed[&index];
            let mut entry = keyed.entry.clone();
            if keyed.is_source {
                nodes.push(entry);
                continue;
            }
            match self.store.manifest(&keyed.key)? {
                Some(manifest) => {
                    entry.outputs = manifest
                        .files
                        .into_iter()
                        .map(|f| (f.name, f.blake3))
                        .collect();
                    nodes.push(entry);
                }
                None => {
                    if let Some(old) = previous.entry(&entry.name) {
                        nodes.push(old.clone());
                    }
                }
            }
        }
        let lockfile = Lockfile {
            version: LOCKFILE_VERSION,
            recipe: self.recipe.name.clone(),
            nodes,
        };
        lockfile.write(&self.recipe.lockfile_path())
    }

    fn record_run(
        &self,
        report: &RunReport,
        started: SystemTime,
        failure: Option<&EngineError>,
    ) -> Result<(), EngineError> {
        let plan = self.plan;
        let record = json!({
            "recipe": std::path::absolute(&self.recipe.file).unwrap_or_else(|_| self.recipe.file.clone()).display().to_string(),
            "lockfile": std::path::absolute(self.recipe.lockfile_path()).unwrap_or_else(|_| self.recipe.lockfile_path()).display().to_string(),
            "started": humantime::format_rfc3339_seconds(started).to_string(),
            "ran": report.ran.iter().map(|(name, seconds)| json!({"name": name, "key": plan.entries.iter().find(|e| &e.name == name).map(|e| e.key.to_hex()), "seconds": seconds})).collect::<Vec<_>>(),
            "cached": report.cached,
            "outcome": match failure { None => "success".to_owned(), Some(e) => e.to_string() },
        });
        let stamp = started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let path = self
            .store
            .runs_dir()
            .join(format!("{stamp}-{}.json", std::process::id()));
        crate::fsutil::write_atomic(
            &path,
            serde_json::to_string_pretty(&record)
                .expect("record serialises")
                .as_bytes(),
        )
    }
}

/// Whether the plan found the artifact of `entry` corrupted.
fn is_corrupted(entry: &PlanEntry) -> bool {
    entry
        .reasons
        .iter()
        .any(|r| matches!(r, Reason::Corrupted(_)))
}
