//! Running one stage kind as the engine does, for the stage tests: the registered runner, a
//! throw-away work directory, the cpu backend in fp32 on one thread.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use rudder_engine::runner::{NoProgress, StageContext, StageInput, StageResult};
use rudder_engine::{Key, Registry};
use rudder_schema::kinds::StageSpec;
use rudder_schema::{Backend, Precision};

/// Runs the stage `name` of `kind` with `spec` and `inputs` into `out`; `interrupted` as if
/// Ctrl-C had been pressed before it started.
pub fn run_stage(
    name: &str,
    kind: &str,
    spec: &dyn StageSpec,
    inputs: Vec<StageInput>,
    out: &Path,
    seed: u64,
    interrupted: bool,
) -> StageResult {
    let mut registry = Registry::new();
    rudder_stages::register(&mut registry);
    let runner = registry.get(kind).expect("registered").clone();
    let work = tempfile::tempdir().unwrap();
    let flag = AtomicBool::new(interrupted);
    let ctx = StageContext {
        name,
        kind,
        key: Key::from_hex(&"1".repeat(64)).unwrap(),
        spec,
        part: None,
        inputs,
        out_dir: out,
        work_dir: work.path(),
        recipe_dir: out,
        seed,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        progress: &NoProgress,
        interrupted: &flag,
    };
    runner.run(&ctx)
}
