//! The rudder engine: the pipeline graph, content keys, the artifact store, lockfiles, plans
//! and the executor. It knows no machine learning: stage kinds plug in through
//! [`runner::Runner`], and only the `command` kind is built in ([`command::register`]). Stages
//! run on threads of this process ([`local`]) or as Slurm jobs ([`slurm`]), behind
//! [`executor::Executor`]. Artifacts are shared through remote stores ([`remote`]).

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
pub mod live;
pub mod local;
pub mod lockfile;
pub mod memory;
pub mod peak;
pub mod plan;
pub mod project;
pub mod remote;
pub mod report;
pub mod runner;
pub mod sandbox;
pub mod slurm;
pub mod store;
pub mod tfevents;

pub use error::EngineError;
pub use executor::{Executor, Run};
pub use integrity::VerifyMode;
pub use key::Key;
pub use plan::{Plan, Selection};
pub use project::Project;
pub use runner::{Registry, Runner, StageContext, StageOutcome};
pub use store::Store;
