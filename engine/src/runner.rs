//! The interface between the engine and the code that runs stage kinds: a [`Runner`] per kind,
//! looked up in a [`Registry`], called with a [`StageContext`] that holds everything the stage
//! may read (its parameters, inputs with their paths and keys, where to write) and reports
//! [`Progress`] through.
//!
//! The engine owns no kind here: `command.rs` registers the one built into the engine, and the
//! `stages` crate registers the machine-learning kinds. Running a plan is `executor.rs`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rudder_schema::kinds::{PartSpec, StageSpec};
use rudder_schema::{Backend, DataFormat, ModelSpec, Precision};

use crate::key::Key;

/// Progress of one stage, shown as a bar on a terminal.
pub trait Progress: Send + Sync {
    fn set_length(&self, length: u64);
    fn set_position(&self, position: u64);
    fn set_message(&self, message: String);
    /// A line of output that should not break the bar.
    fn println(&self, line: &str);
}

/// Progress that goes nowhere (tests, `--quiet`).
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: String) {}
    fn println(&self, _: &str) {}
}

/// What an input is, beyond its path.
#[derive(Debug, Clone)]
// A fresh architecture's spec makes one variant larger than the others; an input is built once
// per stage run, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum InputKind {
    /// A plain file named in the recipe.
    File,
    /// A data file, with the format and column renames to read it with.
    Dataset {
        format: DataFormat,
        columns: BTreeMap<String, String>,
    },
    /// A Hugging Face model directory from `models.X.hf`.
    Model,
    /// A Hugging Face model directory with a PEFT LoRA adapter to apply (`models.X.adapter`).
    AdaptedModel { adapter: PathBuf },
    /// A fresh architecture: there is no directory, only the configuration and the model's
    /// tokenizer (a tokenizer stage's artifact directory, or a tokenizer.json file).
    FreshModel {
        spec: ModelSpec,
        tokenizer: Option<PathBuf>,
    },
    /// Another stage's artifact directory (or one of its output files).
    Artifact { kind: String },
}

#[derive(Debug, Clone)]
pub struct StageInput {
    pub role: String,
    /// The node (or part) it comes from.
    pub node: String,
    pub key: Key,
    /// The file or directory to read; `None` for a fresh model.
    pub path: Option<PathBuf>,
    pub kind: InputKind,
}

/// Everything a stage receives.
pub struct StageContext<'a> {
    /// The vertex name: `stage` or `stage/part`.
    pub name: &'a str,
    /// The kind being run: the stage's, or the part's (`dpo/ref_logps`).
    pub kind: &'a str,
    pub key: Key,
    /// The stage's parameters (for parts too: a part belongs to its stage).
    pub spec: &'a dyn StageSpec,
    pub part: Option<&'a PartSpec>,
    pub inputs: Vec<StageInput>,
    /// Where the artifact's files go; it becomes the artifact when the stage succeeds.
    pub out_dir: &'a Path,
    /// Persistent across attempts: checkpoints to resume from.
    pub work_dir: &'a Path,
    pub recipe_dir: &'a Path,
    pub seed: u64,
    pub backend: Backend,
    pub precision: Precision,
    /// How many threads the stage may use: the executor's share of the cores for it (at least
    /// 1). Never part of a key: a stage's result must not depend on it.
    pub threads: usize,
    pub progress: &'a dyn Progress,
    /// Set on Ctrl-C: checkpoint and return.
    pub interrupted: &'a AtomicBool,
}

impl StageContext<'_> {
    pub fn input(&self, role: &str) -> Option<&StageInput> {
        self.inputs.iter().find(|i| i.role == role)
    }

    /// The stage's typed parameters.
    pub fn params<T: 'static>(&self) -> Option<&T> {
        self.spec.as_any().downcast_ref::<T>()
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }
}

/// What a successful stage reports: summary metrics for the manifest and `rudder metrics`.
#[derive(Debug, Clone, Default)]
pub struct StageOutcome {
    pub summary: BTreeMap<String, f64>,
}

pub type StageResult = Result<StageOutcome, Box<dyn std::error::Error + Send + Sync>>;

/// What the engine records in an artifact's manifest about how its stage ran, beyond the
/// outcome: for now, how its process was confined.
#[derive(Debug, Clone, Default)]
pub struct RunNotes {
    pub sandbox: Option<crate::sandbox::SandboxRecord>,
}

/// A stage kind's implementation.
pub trait Runner: Send + Sync {
    /// The kind it runs: a stage kind (`sft`) or a part kind (`dpo/ref_logps`).
    fn kind(&self) -> &str;
    /// Bumped whenever the implementation changes what it produces: part of every key.
    fn version(&self) -> u32;
    fn run(&self, ctx: &StageContext<'_>) -> StageResult;
    /// [`Runner::run`], with notes for the manifest; the executor calls this one. Kinds that
    /// confine their processes override it.
    fn run_noted(
        &self,
        ctx: &StageContext<'_>,
    ) -> Result<(StageOutcome, RunNotes), Box<dyn std::error::Error + Send + Sync>> {
        self.run(ctx).map(|outcome| (outcome, RunNotes::default()))
    }
}

/// The runners of this build, by kind.
#[derive(Default, Clone)]
pub struct Registry {
    runners: BTreeMap<String, Arc<dyn Runner>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a runner; a second runner of the same kind replaces the first.
    pub fn register(&mut self, runner: impl Runner + 'static) {
        self.runners
            .insert(runner.kind().to_owned(), Arc::new(runner));
    }

    /// The kinds that have a runner, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.runners.keys().map(String::as_str)
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Runner>> {
        self.runners.get(kind)
    }

    /// The implementation version of a kind; 0 when this build has no runner for it.
    pub fn version(&self, kind: &str) -> u32 {
        self.runners.get(kind).map_or(0, |r| r.version())
    }
}
