//! The `rudder` command line: parse, set up logging, dispatch, map the outcome to an exit code.

mod cli;
mod commands;
mod printer;
mod progress;
mod render;
mod report;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use rudder_engine::EngineError;

use crate::cli::{Cli, Command};
use crate::printer::Printer;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc to keep freed memory for reuse rather than return it to the kernel after its
/// purge delay: a training step frees and reallocates the same large buffers, and each return
/// costs a page fault per page on the next use (a SmolLM2-135M SFT step took 4.2 s with
/// mimalloc's default delay, 6-7 s with 10 ms, 3.5-3.8 s without purging, at a peak 10% higher
/// than with it). A `MIMALLOC_PURGE_DELAY` in the environment wins.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // `mi_option_purge_delay` in mimalloc 3's `mimalloc.h`; other major versions number their
    // options differently, so they keep their defaults.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: both are plain calls into the linked allocator, valid at any time.
    unsafe {
        if (30_000..40_000).contains(&libmimalloc_sys::mi_version()) {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

/// Exit codes: 0 success, 1 a stage failed (or the asked-for thing is absent), 2 a recipe or
/// usage error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success,
    Failure,
    Usage,
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(match status {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
        })
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let printer = Printer::new(cli.quiet);
    let result = match cli.command {
        Command::Validate(args) => commands::validate::run(&args, &printer),
        Command::Plan(args) => commands::plan::run(&args, &printer),
        Command::Run(args) => commands::run::run(&args, &printer),
        Command::Exec(args) => commands::exec::run(&args, &printer),
        Command::Dag { recipe, format } => commands::dag::run(&recipe, &format, &printer),
        Command::Show {
            recipe,
            node,
            store,
            path,
        } => commands::show::run(&recipe, &node, &store, path, &printer),
        Command::Metrics {
            recipe,
            store,
            json,
        } => commands::metrics::run(&recipe, &store, json, &printer),
        Command::Status {
            recipe,
            store,
            json,
        } => commands::status::run(&recipe, &store, json, &printer),
        Command::Report(args) => commands::report::run(&args, &printer),
        Command::Generate(args) => commands::generate::run(&args, &printer),
        Command::Bench(args) => commands::bench::run(&args, &printer),
        Command::Export {
            recipe,
            stage,
            dir,
            store,
        } => commands::export::run(&recipe, &stage, &dir, &store, &printer),
        Command::Push(args) => commands::push::run(&args, &printer),
        Command::Pull(args) => commands::pull::run(&args, &printer),
        Command::Gc(args) => commands::gc::run(&args, &printer),
        Command::Verify {
            recipe,
            all,
            set,
            store,
        } => commands::verify::run(recipe.as_deref(), all, &set, store, &printer),
        Command::Schema => commands::schema::run(&printer),
    };
    match result {
        Ok(status) => status.into(),
        Err(err) => report(&err).into(),
    }
}

/// Prints an error and chooses its exit status.
fn report(err: &anyhow::Error) -> ExitStatus {
    if let Some(engine) = err.downcast_ref::<EngineError>() {
        match engine {
            EngineError::Recipe(errors) => {
                eprint!(
                    "{}",
                    render::recipe_errors(errors, std::io::stderr().is_terminal())
                );
                return ExitStatus::Usage;
            }
            EngineError::Usage(message) => {
                eprintln!("error: {message}");
                return ExitStatus::Usage;
            }
            _ => {}
        }
    }
    if let Some(errors) = err.downcast_ref::<rudder_schema::RecipeErrors>() {
        eprint!(
            "{}",
            render::recipe_errors(errors, std::io::stderr().is_terminal())
        );
        return ExitStatus::Usage;
    }
    eprintln!("error: {err:#}");
    ExitStatus::Failure
}
