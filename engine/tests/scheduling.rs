//! The local executor's scheduling, with a runner that records what runs at once: never more
//! than `jobs` stages, never two on a GPU backend, never a stage before its inputs, every
//! stage given its share of the cores.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rudder_engine::executor::{Observer, Run};
use rudder_engine::local::LocalExecutor;
use rudder_engine::plan::PlanEntry;
use rudder_engine::runner::{NoProgress, Progress, Runner, StageContext, StageResult};
use rudder_engine::{Project, Registry, Selection, StageOutcome};
use rudder_schema::kinds::CommandParams;

/// Four independent stages (two on CUDA), and one that reads all of them.
const RECIPE: &str = r#"
[stages.a]
kind = "command"
cmd = "a"
outputs = { out = "a.txt" }

[stages.b]
kind = "command"
cmd = "b"
outputs = { out = "b.txt" }
backend = "cuda"

[stages.c]
kind = "command"
cmd = "c"
outputs = { out = "c.txt" }
backend = "cuda"

[stages.d]
kind = "command"
cmd = "d"
outputs = { out = "d.txt" }

[stages.all]
kind = "command"
inputs = ["a.out", "b.out", "c.out", "d.out"]
cmd = "all"
outputs = { out = "all.txt" }
"#;

#[derive(Default)]
struct Record {
    running: Vec<String>,
    most_at_once: usize,
    most_on_gpu: usize,
    /// `(stage, stages finished before it started, its thread budget)`.
    starts: Vec<(String, Vec<String>, usize)>,
    finished: Vec<String>,
}

/// Stands in for the `command` kind: writes its outputs after a short while, and records.
struct Recorder(Mutex<Record>);

impl Runner for Recorder {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        let params: &CommandParams = ctx.params().expect("command parameters");
        {
            let mut record = self.0.lock().unwrap();
            record.running.push(ctx.name.to_owned());
            let finished = record.finished.clone();
            record
                .starts
                .push((ctx.name.to_owned(), finished, ctx.threads));
            record.most_at_once = record.most_at_once.max(record.running.len());
            let on_gpu = record
                .running
                .iter()
                .filter(|n| matches!(n.as_str(), "b" | "c"))
                .count();
            record.most_on_gpu = record.most_on_gpu.max(on_gpu);
        }
        std::thread::sleep(Duration::from_millis(100));
        for file in params.outputs.values() {
            std::fs::write(ctx.out_dir.join(file), ctx.name)?;
        }
        let mut record = self.0.lock().unwrap();
        record.running.retain(|n| n != ctx.name);
        record.finished.push(ctx.name.to_owned());
        Ok(StageOutcome::default())
    }
}

struct Silent;

impl Observer for Silent {
    fn waiting_for_lock(&self, _: Option<u32>) {}
    fn stage_started(&self, _: &PlanEntry, _: usize, _: usize) -> Box<dyn Progress> {
        Box::new(NoProgress)
    }
    fn stage_finished(&self, _: &PlanEntry, _: Result<&StageOutcome, &str>, _: f64) {}
}

fn run(jobs: usize, cores: usize) -> Record {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recipe.toml");
    std::fs::write(&file, RECIPE).unwrap();
    let project = Project::open(&file, &[], None).unwrap();
    let recorder = std::sync::Arc::new(Recorder(Mutex::new(Record::default())));
    let mut registry = Registry::new();
    registry.register(ArcRunner(recorder.clone()));
    project.store.init().unwrap();
    let _lock = project.store.lock(|_| {}).unwrap();
    let plan = project
        .plan(&registry, &Selection::default(), None)
        .unwrap();
    let interrupted = AtomicBool::new(false);
    let run = Run::new(
        &project.recipe,
        &project.graph,
        &registry,
        &project.store,
        &plan,
        &Silent,
        &interrupted,
        false,
        project.verify,
    );
    let local = LocalExecutor {
        jobs,
        gpus: 1,
        cores,
    };
    let report = run.run(&project.lockfile().unwrap(), &local).unwrap();
    assert_eq!(report.ran.len(), 5);
    assert!(!interrupted.load(Ordering::Relaxed));
    std::mem::take(&mut *recorder.0.lock().unwrap())
}

/// Registers a shared recorder.
struct ArcRunner(std::sync::Arc<Recorder>);

impl Runner for ArcRunner {
    fn kind(&self) -> &str {
        self.0.kind()
    }
    fn version(&self) -> u32 {
        self.0.version()
    }
    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        self.0.run(ctx)
    }
}

#[test]
fn stages_run_at_once_within_the_limits_and_after_their_inputs() {
    let record = run(3, 12);
    assert_eq!(record.most_at_once, 3);
    assert_eq!(record.most_on_gpu, 1, "two stages shared the GPU");
    let starts: BTreeMap<&str, (&Vec<String>, usize)> = record
        .starts
        .iter()
        .map(|(name, before, threads)| (name.as_str(), (before, *threads)))
        .collect();
    // `all` started after the four it reads.
    assert_eq!(starts["all"].0.len(), 4, "{:?}", record.starts);
    // Twelve cores among three stages at once.
    assert!(starts.values().all(|(_, threads)| *threads == 4));
}

#[test]
fn one_job_runs_the_plan_in_order_with_every_core() {
    let record = run(1, 12);
    assert_eq!(record.most_at_once, 1);
    let order: Vec<&str> = record.starts.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "d", "all"]);
    assert!(record.starts.iter().all(|s| s.2 == 12));
}
