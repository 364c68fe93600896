use std::path::PathBuf;

use rudder_engine::Selection;
use rudder_engine::report;

use crate::ExitStatus;
use crate::cli::ReportArgs;
use crate::printer::Printer;

pub fn run(args: &ReportArgs, printer: &Printer) -> anyhow::Result<ExitStatus> {
    let project = super::open(&args.recipe, Some(&args.store))?;
    let registry = super::registry();
    let plan = project.plan(&registry, &Selection::default(), None)?;
    let gathered = report::gather(&project, &plan)?;
    let comparison = match &args.compare {
        Some(other) => {
            let (old, old_store) =
                report::other_run(other, &project.store, args.store.store.clone(), &registry)?;
            let new = report::plan_entries(&project, &plan);
            Some(report::compare(
                &other.display().to_string(),
                &old,
                &old_store,
                &new,
                &project.store,
            )?)
        }
        None => None,
    };
    if args.format == "text" {
        printer.data(crate::report::text(&gathered, comparison.as_ref()).trim_end());
        return Ok(ExitStatus::Success);
    }
    let html = crate::report::html(&gathered, comparison.as_ref())?;
    let output = args.output.clone().unwrap_or_else(|| {
        let name = project
            .recipe
            .file
            .file_stem()
            .map_or("recipe".into(), |s| s.to_string_lossy().into_owned());
        project.recipe.dir.join(format!("{name}.report.html"))
    });
    std::fs::write(&output, &html)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", output.display()))?;
    printer.status(format!(
        "wrote {} ({} KiB)",
        output.display(),
        html.len().div_ceil(1024)
    ));
    if args.open {
        open(&output)?;
    }
    Ok(ExitStatus::Success)
}

/// Opens a file with the desktop's handler for it.
fn open(path: &PathBuf) -> anyhow::Result<()> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let status = std::process::Command::new(opener)
        .arg(path)
        .status()
        .map_err(|e| anyhow::anyhow!("opening {} with {opener}: {e}", path.display()))?;
    if !status.success() {
        anyhow::bail!("{opener} {} failed ({status})", path.display());
    }
    Ok(())
}
