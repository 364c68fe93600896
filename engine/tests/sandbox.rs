//! The `command` kind's sandbox, through the runner itself: declared reads work, undeclared
//! reads and writes fail naming the path, `recipe-dir`, `read_paths`, `sandbox = false`, the
//! private `$TMPDIR` and the network switch. Skipped, with a message, on a kernel without
//! Landlock.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rudder_engine::runner::{InputKind, NoProgress, RunNotes, Runner, StageContext, StageInput};
use rudder_engine::sandbox::landlock_abi;
use rudder_engine::{Key, command::CommandRunner};
use rudder_schema::kinds::{CommandParams, SandboxMode, SandboxSetting};
use rudder_schema::{Backend, Precision};

struct Bench {
    _dir: tempfile::TempDir,
    recipe: PathBuf,
    out: PathBuf,
    work: PathBuf,
    /// A directory outside the recipe's.
    outside: PathBuf,
}

fn bench() -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("recipe");
    let out = dir.path().join("store/tmp/out");
    let work = dir.path().join("store/work/k");
    let outside = dir.path().join("elsewhere");
    for d in [&recipe, &out, &work, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(recipe.join("data.txt"), "declared data\n").unwrap();
    std::fs::write(recipe.join("script.sh"), "cat \"$1\" > \"$2\"\n").unwrap();
    std::fs::write(recipe.join("undeclared.txt"), "secret\n").unwrap();
    std::fs::write(outside.join("extra.txt"), "extra\n").unwrap();
    Bench {
        _dir: dir,
        recipe,
        out,
        work,
        outside,
    }
}

fn params(cmd: &str) -> CommandParams {
    CommandParams {
        inputs: vec!["data".into()],
        deps: vec!["script.sh".into()],
        cmd: cmd.into(),
        outputs: [("out".to_string(), "out.txt".to_string())].into(),
        ..CommandParams::default()
    }
}

fn run(
    bench: &Bench,
    params: &CommandParams,
) -> Result<RunNotes, Box<dyn std::error::Error + Send + Sync>> {
    let interrupted = AtomicBool::new(false);
    let ctx = StageContext {
        name: "prep",
        kind: "command",
        key: Key::from_hex(&"ab".repeat(32)).unwrap(),
        spec: params,
        part: None,
        inputs: vec![StageInput {
            role: "inputs[0]".into(),
            node: "data".into(),
            key: Key::from_hex(&"cd".repeat(32)).unwrap(),
            path: Some(bench.recipe.join("data.txt")),
            kind: InputKind::File,
        }],
        out_dir: &bench.out,
        work_dir: &bench.work,
        recipe_dir: &bench.recipe,
        seed: 0,
        backend: Backend::Cpu,
        precision: Precision::Fp32,
        threads: 1,
        progress: &NoProgress,
        interrupted: &interrupted,
    };
    CommandRunner.run_noted(&ctx).map(|(_, notes)| notes)
}

/// Whether this kernel can sandbox; prints why the test is skipped when not.
fn can_sandbox(abi: i32) -> bool {
    let have = landlock_abi();
    if have < abi {
        eprintln!(
            "skipped: this kernel's Landlock ABI is {have}, the test needs {abi} (Linux 5.13+ for files, 6.7+ for the network)"
        );
        return false;
    }
    true
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn declared_reads_work_and_the_manifest_records_the_sandbox() {
    if !can_sandbox(1) {
        return;
    }
    let b = bench();
    let notes = run(
        &b,
        &params("sh script.sh {{ inputs.data }} {{ out }}/out.txt"),
    )
    .unwrap();
    assert_eq!(read(&b.out.join("out.txt")), "declared data\n");
    let record = notes.sandbox.unwrap();
    assert!(record.enforced);
    assert_eq!(record.mode, "on");
    assert!(!record.network || record.landlock_abi < 4);
}

#[test]
fn an_undeclared_read_fails_naming_the_path() {
    if !can_sandbox(1) {
        return;
    }
    let b = bench();
    let err = run(&b, &params("cat undeclared.txt > {{ out }}/out.txt"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the sandbox denied access to undeclared.txt")
            && err.contains("add it to `deps`"),
        "{err}"
    );
    // Outside the recipe's directory, by absolute path, from Python: `read_paths` is the advice.
    let extra = b.outside.join("extra.txt");
    let cmd = format!(
        "python3 -c \"open('{}').read()\" && touch {{{{ out }}}}/out.txt",
        extra.display()
    );
    let err = run(&b, &params(&cmd)).unwrap_err().to_string();
    assert!(
        err.contains(&format!("denied access to {}", extra.display()))
            && err.contains("`read_paths`"),
        "{err}"
    );
    // Declared, the same read works.
    let mut declared = params(&cmd);
    declared.read_paths = vec![extra.display().to_string()];
    run(&b, &declared).unwrap();
}

#[test]
fn writes_go_only_to_out_work_and_tmpdir() {
    if !can_sandbox(1) {
        return;
    }
    let b = bench();
    let err = run(
        &b,
        &params("echo x > written.txt && touch {{ out }}/out.txt"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("written.txt"), "{err}");
    assert!(!b.recipe.join("written.txt").exists());
    run(
        &b,
        &params("echo tmp > \"$TMPDIR/t\" && cp \"$TMPDIR/t\" {{ out }}/out.txt && echo w > ../store/work/k/w"),
    )
    .unwrap();
    assert_eq!(read(&b.out.join("out.txt")), "tmp\n");
}

#[test]
fn recipe_dir_and_opting_out() {
    if !can_sandbox(1) {
        return;
    }
    let b = bench();
    let mut loose = params("cat undeclared.txt > {{ out }}/out.txt");
    loose.sandbox = SandboxSetting::Mode(SandboxMode::RecipeDir);
    let notes = run(&b, &loose).unwrap();
    assert_eq!(read(&b.out.join("out.txt")), "secret\n");
    assert_eq!(notes.sandbox.unwrap().mode, "recipe-dir");
    // recipe-dir still confines reads outside the recipe's directory.
    let outside = format!(
        "cat {} > {{{{ out }}}}/out.txt",
        b.outside.join("extra.txt").display()
    );
    loose.cmd = outside.clone();
    assert!(run(&b, &loose).is_err());
    let mut off = params(&outside);
    off.sandbox = SandboxSetting::Enabled(false);
    let record = run(&b, &off).unwrap().sandbox.unwrap();
    assert!(!record.enforced);
    assert_eq!(record.mode, "off");
    assert_eq!(read(&b.out.join("out.txt")), "extra\n");
}

#[test]
fn the_network_is_off_unless_allowed() {
    if !can_sandbox(4) {
        return;
    }
    let b = bench();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect =
        format!("bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && touch {{{{ out }}}}/out.txt");
    let err = run(&b, &params(&connect)).unwrap_err().to_string();
    assert!(err.contains("network = true"), "{err}");
    assert!(!err.contains("denied access to /dev/tcp"), "{err}");
    let mut allowed = params(&connect);
    allowed.network = true;
    let record = run(&b, &allowed).unwrap().sandbox.unwrap();
    assert!(record.network);
}
