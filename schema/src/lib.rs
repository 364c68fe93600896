//! The recipe model of rudder: parsing TOML with source spans, `--set` overrides, the typed
//! parameters of every stage kind with their defaults and ranges, validation with diagnostics
//! that point at the recipe line, and the JSON Schema of the format.
//!
//! This crate knows nothing of graphs, stores or machine learning: the engine builds on it.

pub mod config;
pub mod diagnostic;
pub mod json_schema;
pub mod kinds;
pub mod nodes;
pub mod recipe;
pub mod source;
pub mod validate;

pub use config::UserConfig;
pub use diagnostic::{Diagnostic, Loc, RecipeErrors};
pub use kinds::{KINDS, StageSpec};
pub use recipe::{
    Backend, DataFormat, DatasetSpec, ExecutorKind, ExecutorSpec, Input, Model, ModelSpec, Node,
    NodeBody, Precision, Recipe, RemoteCache, RemoteSpec, Resources, Stage, Target,
};
pub use source::{Seg, ValuePath};
