//! Export (`export`): copies a model artifact (a Hugging Face directory) to `out`, a directory
//! outside the store, relative to the recipe; for a LoRA stage's artifact, its merged model, or
//! with `merge = false` its PEFT adapter. Files are written to a temporary name and renamed
//! into place one by one, writable by their owner (the store's copies are read-only); nothing
//! else in `out` is touched. The store keeps a record of what was written (`export.json`), and
//! the engine runs the stage again when `out` is gone.

use std::path::{Path, PathBuf};

use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::ExportParams;
use serde_json::json;

use crate::artifacts::ADAPTER_DIR;
use crate::kind::{HostKind, Stage};
use crate::train::TrainError;

/// The record an export leaves in the store.
pub const EXPORT_FILE: &str = "export.json";

pub struct Export;

impl HostKind for Export {
    type Params = ExportParams;
    const VERSION: u32 = 1;

    fn run(stage: &Stage<'_, ExportParams>) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let model_dir = stage.inputs.model_dir("model")?;
        let adapter_dir = model_dir.join(ADAPTER_DIR);
        let source = if p.merge {
            model_dir
        } else if adapter_dir.is_dir() {
            adapter_dir
        } else {
            return Err(TrainError::Input(format!(
                "`merge = false` exports a LoRA adapter, but model `{}` was not trained with `lora`",
                stage.inputs.node("model")?
            )));
        };
        let target = stage.recipe_dir().join(&p.out);
        if target.exists() && !target.is_dir() {
            return Err(TrainError::Input(format!(
                "export destination {} exists and is not a directory",
                target.display()
            )));
        }
        let mut files = files(&source)?;
        // The merged model: the adapter it was merged from is not part of it.
        files.retain(|f| !f.starts_with(ADAPTER_DIR));
        let mut bytes = 0u64;
        for file in &files {
            let to = target.join(file);
            let parent = to.parent().unwrap_or(&target);
            std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
            let name = to.file_name().unwrap_or_default().to_string_lossy();
            let partial = to.with_file_name(format!("{name}.partial"));
            // A copy left by an interrupted export may be read-only: copy cannot open it.
            let _ = std::fs::remove_file(&partial);
            bytes +=
                std::fs::copy(source.join(file), &partial).map_err(|e| TrainError::io(&to, e))?;
            user_writable(&partial).map_err(|e| TrainError::io(&to, e))?;
            std::fs::rename(&partial, &to).map_err(|e| TrainError::io(&to, e))?;
        }
        let record = json!({
            "destination": p.out,
            "files": files.iter().map(|f| f.to_string_lossy()).collect::<Vec<_>>(),
        });
        let path = stage.out_dir().join(EXPORT_FILE);
        let text = serde_json::to_string_pretty(&record).expect("the record serialises") + "\n";
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        stage.progress().println(&format!(
            "exported {} files to {}",
            files.len(),
            target.display()
        ));
        let summary = [
            ("files".to_string(), files.len() as f64),
            ("bytes".to_string(), bytes as f64),
        ]
        .into_iter()
        .collect();
        Ok(StageOutcome { summary })
    }
}

/// Gives the owner write access: `std::fs::copy` keeps the mode of the store's read-only file,
/// and an exported model is the user's to change.
fn user_writable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path)?.permissions();
    permissions.set_mode(permissions.mode() | 0o200);
    std::fs::set_permissions(path, permissions)
}

/// Every file under `dir`, relative to it, but the store's own manifest.
fn files(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let here = dir.join(&relative);
        let entries = std::fs::read_dir(&here).map_err(|e| TrainError::io(&here, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&here, e))?;
            let path = relative.join(entry.file_name());
            if entry.path().is_dir() {
                pending.push(path);
            } else if path != Path::new("manifest.json") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
