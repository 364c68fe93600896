use crate::ExitStatus;
use crate::cli::RecipeArgs;
use crate::printer::Printer;

pub fn run(args: &RecipeArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(args, None)?;
    let stages = project.graph.order.len();
    printer.out(format!(
        "{}: ok ({} nodes, {stages} vertices)",
        args.recipe.display(),
        project.recipe.nodes.len()
    ));
    Ok(ExitStatus::Success)
}
