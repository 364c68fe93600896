//! The `command` stage kind: renders `cmd` with its inputs' paths and `{{ out }}`, runs it with
//! `sh -c` in the recipe's directory, and fails (committing nothing) on a non-zero exit or a
//! missing declared output. The last lines of its stderr go into the error.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rudder_schema::kinds::CommandParams;

use crate::runner::{Registry, Runner, StageContext, StageOutcome, StageResult};

/// How many stderr lines a failure shows.
const STDERR_TAIL: usize = 20;

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
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .current_dir(ctx.recipe_dir)
            .envs(&params.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `sh`: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut log_for_stderr = log.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut tail = VecDeque::with_capacity(STDERR_TAIL);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log_for_stderr, "{line}");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail
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
        let tail: Vec<String> = reader.join().unwrap_or_default().into();
        if !status.success() {
            let code = status
                .code()
                .map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"));
            let mut message = format!("command failed with {code}: {cmd}");
            if !tail.is_empty() {
                message.push_str("\n--- last lines of its stderr ---\n");
                message.push_str(&tail.join("\n"));
            }
            return Err(message.into());
        }
        Ok(StageOutcome::default())
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
