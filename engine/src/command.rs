//! The `command` stage kind: renders `cmd` with its inputs' paths and `{{ out }}`, runs it with
//! `sh -c` in the recipe's directory, and fails (committing nothing) on a non-zero exit or a
//! missing declared output. The last lines of its stderr go into the error.
//!
//! Unless the stage says `sandbox = false`, the command runs confined (`sandbox.rs`): it reads
//! only what its key covers (its inputs, `deps` and `read_paths`, with the system's read-only
//! locations and the prefixes of the programs it names) and writes only `{{ out }}`, its work
//! directory and a private `$TMPDIR`. A read it did not declare fails with `EACCES`; the error
//! then names the path when the program's message does, and says how to declare it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rudder_schema::kinds::{CommandParams, SandboxMode, SandboxSetting};

use crate::runner::{Registry, RunNotes, Runner, StageContext, StageOutcome, StageResult};
use crate::sandbox::{self, Policy, Prepared, SandboxRecord};

/// How many stderr lines a failure shows.
const STDERR_TAIL: usize = 20;

/// How many stderr lines mentioning a denied access are kept to find the paths in.
const DENIED_LINES: usize = 50;

type RunError = Box<dyn std::error::Error + Send + Sync>;

pub struct CommandRunner;

/// Adds the engine's own kind, `command`, to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(CommandRunner);
}

impl Runner for CommandRunner {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        self.run_noted(ctx).map(|(outcome, _)| outcome)
    }

    fn run_noted(&self, ctx: &StageContext<'_>) -> Result<(StageOutcome, RunNotes), RunError> {
        let params: &CommandParams = ctx
            .params()
            .ok_or("a command stage's parameters are not command parameters")?;
        let paths: Vec<String> = ctx
            .inputs
            .iter()
            .map(|i| {
                i.path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .ok_or_else(|| {
                        format!(
                            "input `{}` has no path (a fresh model has no files yet)",
                            i.node
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let out = ctx.out_dir.display().to_string();
        let cmd = params.render(&paths, &out)?;
        ctx.progress.set_message(truncate(&cmd, 60));
        let log_path = ctx.work_dir.join("command.log");
        let mut log = std::fs::File::create(&log_path)?;
        writeln!(log, "$ {cmd}")?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&cmd)
            .current_dir(ctx.recipe_dir)
            .envs(&params.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(Stdio::piped());
        let confinement = if params.sandbox == SandboxSetting::Enabled(false) {
            None
        } else {
            Some(Confinement::new(ctx, params, &cmd)?)
        };
        let record = match &confinement {
            None => SandboxRecord {
                mode: params.sandbox.as_str().into(),
                enforced: false,
                network: true,
                landlock_abi: sandbox::landlock_abi(),
                note: Some("sandbox = false in the recipe".into()),
            },
            Some(c) => {
                c.apply(&mut command);
                if !c.prepared.record.enforced || c.prepared.record.note.is_some() {
                    ctx.progress.println(&format!(
                        "warning: stage `{}`: {}; the manifest records it",
                        ctx.name,
                        c.prepared.record.note.as_deref().unwrap_or("not confined")
                    ));
                }
                c.prepared.record.clone()
            }
        };
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start `sh`: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut log_for_stderr = log.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut tail = VecDeque::with_capacity(STDERR_TAIL);
            let mut denied = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log_for_stderr, "{line}");
                let lower = line.to_lowercase();
                if denied.len() < DENIED_LINES
                    && (lower.contains("permission denied") || lower.contains("errno 13"))
                {
                    denied.push(line.clone());
                }
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            (tail, denied)
        });
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if ctx.interrupted.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (tail, denied) = reader.join().unwrap_or_default();
        let tail: Vec<String> = tail.into();
        if !status.success() {
            let code = status
                .code()
                .map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"));
            let mut message = format!("command failed with {code}: {cmd}");
            if let Some(c) = confinement.as_ref().filter(|c| c.prepared.record.enforced) {
                message.push_str(&c.explain(&denied, ctx.recipe_dir));
            }
            if !tail.is_empty() {
                message.push_str("\n--- last lines of its stderr ---\n");
                message.push_str(&tail.join("\n"));
            }
            return Err(message.into());
        }
        Ok((
            StageOutcome::default(),
            RunNotes {
                sandbox: Some(record),
            },
        ))
    }
}

/// The sandbox of one command: its policy, the rules built from it, and its private `$TMPDIR`
/// (removed when the command is done).
struct Confinement {
    policy: Policy,
    prepared: Prepared,
    tmp: tempfile::TempDir,
}

impl Confinement {
    fn new(ctx: &StageContext<'_>, params: &CommandParams, cmd: &str) -> Result<Self, RunError> {
        let tmp = tempfile::Builder::new()
            .prefix("rudder-command-")
            .tempdir()
            .map_err(|e| format!("creating the command's temporary directory: {e}"))?;
        let mut read: Vec<PathBuf> = ctx.inputs.iter().filter_map(|i| i.path.clone()).collect();
        read.extend(params.deps.iter().map(|d| ctx.recipe_dir.join(d)));
        read.extend(params.read_paths.iter().map(|p| ctx.recipe_dir.join(p)));
        if params.sandbox == SandboxSetting::Mode(SandboxMode::RecipeDir) {
            read.push(ctx.recipe_dir.to_path_buf());
        }
        let path = params
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        read.extend(sandbox::program_prefixes(cmd, &path, home.as_deref()));
        let policy = Policy {
            read,
            write: vec![
                ctx.out_dir.to_path_buf(),
                ctx.work_dir.to_path_buf(),
                tmp.path().to_path_buf(),
            ],
            network: params.network,
        };
        let prepared = sandbox::prepare(&policy, params.sandbox.as_str())?;
        Ok(Confinement {
            policy,
            prepared,
            tmp,
        })
    }

    fn apply(&self, command: &mut Command) {
        for var in ["TMPDIR", "TMP", "TEMP"] {
            command.env(var, self.tmp.path());
        }
        self.prepared.apply(command);
    }

    /// What to tell the user about a failure that the sandbox may have caused.
    fn explain(&self, denied: &[String], cwd: &Path) -> String {
        if denied.is_empty() {
            return String::new();
        }
        // bash's `/dev/tcp/HOST/PORT` is a connection, not a file.
        let (sockets, paths): (Vec<String>, Vec<String>) =
            sandbox::denied_paths(denied, cwd, &self.policy)
                .into_iter()
                .partition(|p| p.starts_with("/dev/tcp/") || p.starts_with("/dev/udp/"));
        let mut message = String::new();
        let connecting =
            !sockets.is_empty() || denied.iter().any(|l| l.to_lowercase().contains("connect"));
        if connecting && !self.policy.network {
            message.push_str(
                "\nthe sandbox denied a network connection: set `network = true` to allow TCP connections",
            );
        }
        if paths.is_empty() && message.is_empty() {
            let network = if self.policy.network {
                ""
            } else {
                ", or opened a TCP connection (set `network = true` to allow it)"
            };
            return format!(
                "\nthe sandbox may have denied it: the command read a path it does not declare{network}; declare what it reads in `deps` or `read_paths`, or set `sandbox = false`"
            );
        }
        for path in paths {
            let exists = cwd.join(&path).exists();
            let advice = if !exists {
                "a command writes only into `{{ out }}`, its work directory and $TMPDIR"
            } else if cwd.join(&path).starts_with(cwd) && !Path::new(&path).is_absolute() {
                "add it to `deps` (its content then enters the key)"
            } else {
                "add it to `read_paths` (a file's content then enters the key) or `deps`"
            };
            message.push_str(&format!(
                "\nthe sandbox denied access to {path}, which the stage does not declare: {advice}, or set `sandbox = false`"
            ));
        }
        message
    }
}

fn truncate(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}
