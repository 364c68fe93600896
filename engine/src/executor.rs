//! Running a plan: the loop that runs each stage of the plan into a pending artifact, commits
//! it on success, discards it on failure, and records the run and, after a successful run, the
//! lockfile. What a stage is given and how a kind plugs in is `runner.rs`'s.
//!
//! Every artifact is checked against its manifest just before a stage reads it; a corrupted
//! one is moved to quarantine, never read (the plan already sends corrupted artifacts it finds
//! to be rebuilt; this catches those that changed since).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use rudder_schema::kinds::Produces;
use rudder_schema::{DataFormat, NodeBody, Recipe};
use serde_json::json;

use crate::error::EngineError;
use crate::graph::{Graph, Source};
use crate::integrity::{Problem, VerifyMode};
use crate::key::Key;
use crate::lockfile::{LOCKFILE_VERSION, LockEntry, Lockfile};
use crate::plan::{Plan, PlanEntry, State};
use crate::runner::{InputKind, Progress, Registry, StageContext, StageInput, StageOutcome};
use crate::store::{Health, LAYOUT_VERSION, Manifest, Store};

/// Callbacks for the user interface.
pub trait Observer: Send + Sync {
    fn waiting_for_lock(&self, holder: Option<u32>);
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
}

pub struct Executor<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub observer: &'a dyn Observer,
    pub interrupted: &'a AtomicBool,
    /// How inputs are checked before a stage reads them.
    pub verify: VerifyMode,
}

impl Executor<'_> {
    /// Runs every `run` entry of the plan in order. The caller holds the store lock.
    pub fn run(&self, plan: &Plan, lock: &Lockfile) -> Result<RunReport, EngineError> {
        let started = SystemTime::now();
        let mut report = RunReport::default();
        let total = plan.to_run().count();
        let mut outputs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut failure = None;
        for (position, entry) in plan.to_run().enumerate() {
            if self.interrupted.load(Ordering::Relaxed) {
                failure = Some(EngineError::Interrupted);
                break;
            }
            // Two vertices with one key (identical stages under two names) build it once;
            // forced stages and stages whose outputs outside the store are gone run regardless.
            let rerun = entry.reasons.iter().any(|r| {
                matches!(
                    r,
                    crate::plan::Reason::Forced | crate::plan::Reason::ExternalMissing(_)
                )
            });
            if entry
                .reasons
                .iter()
                .any(|r| matches!(r, crate::plan::Reason::Corrupted(_)))
                && let Err(err) = self.quarantine_if_corrupted(&entry.key, &entry.name)
            {
                failure = Some(err);
                break;
            }
            if !rerun && self.store.contains(&entry.key) {
                continue;
            }
            let clock = Instant::now();
            let progress = self.observer.stage_started(entry, position + 1, total);
            let result = self.run_one(plan, entry, progress.as_ref());
            let seconds = clock.elapsed().as_secs_f64();
            match result {
                Ok((outcome, files)) => {
                    self.observer.stage_finished(entry, Ok(&outcome), seconds);
                    report.ran.push((entry.name.clone(), seconds));
                    outputs.insert(entry.name.clone(), files);
                }
                Err(err) => {
                    self.observer
                        .stage_finished(entry, Err(&err.to_string()), seconds);
                    failure = Some(err);
                    break;
                }
            }
        }
        report.cached = plan
            .entries
            .iter()
            .filter(|e| e.state == State::Cached && !e.is_source)
            .count();
        self.record_run(plan, &report, started, failure.as_ref())?;
        if let Some(err) = failure {
            return Err(err);
        }
        self.write_lockfile(plan, lock)?;
        Ok(report)
    }

    fn run_one(
        &self,
        plan: &Plan,
        entry: &PlanEntry,
        progress: &dyn Progress,
    ) -> Result<(StageOutcome, BTreeMap<String, String>), EngineError> {
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
        let inputs = self.inputs(plan, entry)?;
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
            progress,
            interrupted: self.interrupted,
        };
        let result = runner.run_noted(&ctx);
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
            files: files.clone(),
            summary: outcome.summary.clone(),
            sandbox: notes.sandbox,
            rudder_version: env!("CARGO_PKG_VERSION").into(),
            started: humantime::format_rfc3339_seconds(started).to_string(),
            seconds: clock.elapsed().as_secs_f64(),
        };
        self.store.commit(pending, &manifest)?;
        let _ = std::fs::remove_dir_all(&work_dir);
        let digests = files.into_iter().map(|f| (f.name, f.blake3)).collect();
        Ok((outcome, digests))
    }

    /// Each input's path and description.
    fn inputs(&self, plan: &Plan, entry: &PlanEntry) -> Result<Vec<StageInput>, EngineError> {
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
                                format: spec.resolved_format().expect("validated when loading"),
                                columns: spec.columns.clone(),
                            },
                        ),
                        (NodeBody::Model(model), _) => match &model.spec.hf {
                            Some(hf) => (Some(self.recipe.dir.join(hf)), InputKind::Model),
                            None => (
                                None,
                                InputKind::FreshModel {
                                    spec: model.spec.clone(),
                                    tokenizer: self.tokenizer_of(plan, entry, from)?,
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
        plan: &Plan,
        entry: &PlanEntry,
        model: &crate::graph::Vertex,
    ) -> Result<Option<PathBuf>, EngineError> {
        let Some(input) = model.inputs.iter().find(|i| i.role == "tokenizer") else {
            return Ok(None);
        };
        match &input.source {
            Source::File(path) => Ok(Some(path.clone())),
            Source::Vertex { index, .. } => {
                let key = plan.keyed[index].key;
                self.check_input(entry, &key, &self.graph.vertex(*index).name)?;
                Ok(Some(self.store.object_dir(&key)))
            }
        }
    }

    /// Moves the artifact `key` to quarantine if it does not match its manifest.
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
        match self.store.check(key, self.verify) {
            Health::Intact => Ok(()),
            Health::Missing => Err(fail(format!("input `{node}` is not in the store"))),
            Health::Corrupted(problems) => {
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

    /// The lockfile after a successful run: every vertex whose artifact is now in the store
    /// (and every source); vertices outside the selection keep their previous entries.
    fn write_lockfile(&self, plan: &Plan, previous: &Lockfile) -> Result<(), EngineError> {
        let mut nodes: Vec<LockEntry> = Vec::new();
        for &index in &self.graph.order {
            let keyed = &plan.keyed[&index];
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
        plan: &Plan,
        report: &RunReport,
        started: SystemTime,
        failure: Option<&EngineError>,
    ) -> Result<(), EngineError> {
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
