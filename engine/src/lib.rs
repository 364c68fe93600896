//! The rudder engine: the pipeline graph, content keys, the artifact store, lockfiles, plans
//! and the executor. It knows no machine learning: stage kinds plug in through
//! [`runner::Runner`], and only the `command` kind is built in ([`command::register`]).

pub mod command;
pub mod dag;
pub mod digest;
pub mod error;
pub mod executor;
pub mod fault;
pub mod fsutil;
pub mod graph;
pub mod integrity;
pub mod key;
pub mod keying;
pub mod lockfile;
pub mod plan;
pub mod project;
pub mod runner;
pub mod sandbox;
pub mod store;

pub use error::EngineError;
pub use integrity::VerifyMode;
pub use key::Key;
pub use plan::{Plan, Selection};
pub use project::Project;
pub use runner::{Registry, Runner, StageContext, StageOutcome};
pub use store::Store;
