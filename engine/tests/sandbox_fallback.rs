//! On a kernel without Landlock a command stage runs unconfined, with one warning line, and its
//! record says so. The kernel is made to look that way with the debug builds' fault hook (in a
//! file of its own: the hook is an environment variable of the whole test process).

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use rudder_engine::Key;
use rudder_engine::command::CommandRunner;
use rudder_engine::runner::{Progress, Runner, StageContext};
use rudder_engine::sandbox::landlock_abi;
use rudder_schema::kinds::CommandParams;
use rudder_schema::{Backend, Precision};

#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Progress for Lines {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: String) {}
    fn println(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
}

#[test]
fn without_landlock_the_command_runs_unconfined_and_says_so() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the fault hook exists in debug builds only");
        return;
    }
    // SAFETY: this test file has one test, so no other thread reads the environment.
    unsafe { std::env::set_var("RUDDER_FAULT", "eio@sandbox.abi") };
    assert_eq!(landlock_abi(), 0);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(dir.path().join("undeclared.txt"), "read anyway\n").unwrap();
    let params = CommandParams {
        cmd: "cat undeclared.txt > {{ out }}/out.txt".into(),
        outputs: [("out".to_string(), "out.txt".to_string())].into(),
        ..CommandParams::default()
    };
    let lines = Lines::default();
    let interrupted = AtomicBool::new(false);
    let ctx = StageContext {
        name: "prep",
        kind: "command",
        key: Key::from_hex(&"ab".repeat(32)).unwrap(),
        spec: &params,
        part: None,
        inputs: Vec::new(),
        out_dir: &out,
        work_dir: dir.path(),
        recipe_dir: dir.path(),
        seed: 0,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        progress: &lines,
        interrupted: &interrupted,
    };
    let (_, notes) = CommandRunner.run_noted(&ctx).unwrap();
    let record = notes.sandbox.unwrap();
    assert!(!record.enforced);
    assert_eq!(record.landlock_abi, 0);
    assert!(record.note.unwrap().contains("no Landlock"));
    let lines = lines.0.lock().unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("warning: stage `prep`: this kernel has no Landlock"),
        "{lines:?}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("out.txt")).unwrap(),
        "read anyway\n"
    );
}
