use crate::ExitStatus;
use crate::printer::Printer;

pub fn run(printer: &Printer) -> anyhow::Result<ExitStatus> {
    printer.data(serde_json::to_string_pretty(
        &rudder_schema::json_schema::recipe_schema(),
    )?);
    Ok(ExitStatus::Success)
}
