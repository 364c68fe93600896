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
