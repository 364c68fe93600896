//! Errors of the engine, typed so that the CLI can choose the exit code and the message.

use std::path::PathBuf;

use rudder_schema::RecipeErrors;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Something in the recipe is wrong (located): exit code 2.
    #[error("{0}")]
    Recipe(#[from] RecipeErrors),

    /// A usage error that is not located in the recipe (bad selection, unknown node): exit 2.
    #[error("{0}")]
    Usage(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("store {path}: {message}")]
    Store { path: PathBuf, message: String },

    #[error("lockfile {path}: {message}")]
    Lockfile { path: PathBuf, message: String },

    /// A stage failed; nothing of it was committed.
    #[error("stage `{node}` ({kind}) failed: {message}")]
    StageFailed {
        node: String,
        kind: String,
        message: String,
    },

    /// The run was interrupted (Ctrl-C); completed stages stay committed.
    #[error("interrupted")]
    Interrupted,

    /// Several stages failed, or one did and others were not run because of it.
    #[error("{}", run_failed(failures, not_run))]
    RunFailed {
        failures: Vec<EngineError>,
        /// Stages that never started: they need a failed one, or the run stopped at a failure.
        not_run: Vec<String>,
    },
}

fn run_failed(failures: &[EngineError], not_run: &[String]) -> String {
    let mut text = match failures {
        [one] => one.to_string(),
        many => {
            let mut text = format!("{} stages failed", many.len());
            for failure in many {
                text.push_str("\n  ");
                text.push_str(&failure.to_string().replace('\n', "\n  "));
            }
            text
        }
    };
    if !not_run.is_empty() {
        text.push_str(&format!(
            "\n{} stage{} not run: {}",
            not_run.len(),
            if not_run.len() == 1 { "" } else { "s" },
            not_run.join(", ")
        ));
    }
    text
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// Errors the user fixes by changing the recipe or the command line.
    pub fn is_usage(&self) -> bool {
        matches!(self, EngineError::Recipe(_) | EngineError::Usage(_))
    }
}
