use rudder_engine::dag::{DagFormat, render};

use crate::ExitStatus;
use crate::cli::RecipeArgs;
use crate::printer::Printer;

pub fn run(recipe: &RecipeArgs, format: &str, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(recipe, None)?;
    let format: DagFormat = format.parse().map_err(rudder_engine::EngineError::Usage)?;
    printer.data(render(&project.recipe, &project.graph, format).trim_end());
    Ok(ExitStatus::Success)
}
