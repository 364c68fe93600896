//! The recipe model: `[recipe]`, `[datasets.*]`, `[models.*]`, `[stages.*]`, loaded from TOML
//! with `--set` overrides, validated against the derived schema, with every reference resolved.
//!
//! Loading never stops at the first problem: all errors are collected with their locations.
//! Cycles are the engine's to find (it builds the graph), using [`Recipe::spans`].
//!
//! This module holds the model; [`loader`] reads a parsed tree into it, [`overrides`] applies
//! `--set`, and [`schemas`] derives the JSON Schemas both check against.

mod loader;
mod overrides;
mod schemas;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::diagnostic::{Diagnostic, Loc, RecipeErrors};
use crate::kinds::{InputField, Produces, StageSpec};
pub use crate::nodes::{
    Arch, Backend, DataFormat, DatasetSpec, ExecutorKind, ExecutorSpec, ModelSpec, Precision,
    RecipeMeta, RemoteCache, RemoteSpec, Resources, StageCommon, check_remote_url,
};
use crate::source::{Sources, SpanMap, ValuePath, parse_toml};
pub(crate) use loader::Loader;
use overrides::apply_override;
pub(crate) use schemas::schemas;

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A node, optionally one named output of it (`prep.train`).
    Node {
        name: String,
        output: Option<String>,
    },
    /// A plain file, for fields that accept one; absolute.
    Path(PathBuf),
}

/// A reference field with its resolution.
#[derive(Debug, Clone)]
pub struct Input {
    pub field: InputField,
    pub target: Target,
    /// Path of the field from the recipe root, for locating errors.
    pub path: ValuePath,
}

#[derive(Debug)]
pub struct Stage {
    pub spec: Box<dyn StageSpec>,
    pub inputs: Vec<Input>,
    /// Ordering-only edges, with the path of each entry.
    pub after: Vec<(String, ValuePath)>,
    pub seed: u64,
    pub backend: Backend,
    pub precision: Precision,
    pub description: Option<String>,
    /// What its Slurm job asks for, as written (the executor's defaults are not merged in).
    pub resources: Resources,
}

#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    /// The tokenizer of a fresh architecture.
    pub tokenizer: Option<Input>,
}

#[derive(Debug)]
pub enum NodeBody {
    Dataset(DatasetSpec),
    Model(Box<Model>),
    Stage(Stage),
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// `datasets.x`, `models.x` or `stages.x`.
    pub path: ValuePath,
    pub body: NodeBody,
}

impl Node {
    pub fn kind(&self) -> &str {
        match &self.body {
            NodeBody::Dataset(_) => "dataset",
            NodeBody::Model(_) => "model",
            NodeBody::Stage(stage) => stage.spec.kind(),
        }
    }

    pub fn produces(&self) -> Produces {
        match &self.body {
            NodeBody::Dataset(spec) => Produces::Datasets(vec![(String::new(), spec.path.clone())]),
            NodeBody::Model(_) => Produces::Model,
            NodeBody::Stage(stage) => stage.spec.produces(),
        }
    }

    pub fn inputs(&self) -> &[Input] {
        match &self.body {
            NodeBody::Stage(stage) => &stage.inputs,
            NodeBody::Model(model) => model.tokenizer.as_slice(),
            NodeBody::Dataset(_) => &[],
        }
    }
}

/// One `--set KEY=VALUE`.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: String,
    pub value: Value,
}

/// A loaded, validated recipe.
#[derive(Debug)]
pub struct Recipe {
    /// The recipe file as given.
    pub file: PathBuf,
    /// Its directory, absolute: relative paths in the recipe start here.
    pub dir: PathBuf,
    pub meta: RecipeMeta,
    /// The `[executor]` table.
    pub executor: ExecutorSpec,
    /// The `[remotes.NAME]` tables, by name.
    pub remotes: BTreeMap<String, RemoteSpec>,
    pub name: String,
    /// Datasets, then models, then stages, each in the order written.
    pub nodes: Vec<Node>,
    pub sources: Arc<Sources>,
    pub spans: SpanMap,
    pub overrides: Vec<Override>,
}

impl Recipe {
    /// Runs every stage that computes in a precision in `precision`, whatever the recipe says
    /// (the CLI's `--precision`).
    pub fn force_precision(&mut self, precision: Precision) {
        self.meta.precision = precision;
        for node in &mut self.nodes {
            if let NodeBody::Stage(stage) = &mut node.body
                && crate::kinds::computes_in_a_precision(stage.spec.kind())
            {
                stage.precision = precision;
            }
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The location of a value, for errors raised after loading (data, cycles, pins).
    pub fn loc(&self, path: &ValuePath) -> Option<Loc> {
        self.spans.value(path)
    }

    pub fn error_at(
        &self,
        path: &ValuePath,
        message: impl Into<String>,
        label: &str,
    ) -> RecipeErrors {
        RecipeErrors::single(
            self.sources.clone(),
            Diagnostic::new(message).with_optional_label(self.loc(path), label),
        )
    }

    /// The lockfile beside the recipe: `NAME.lock` for `NAME.toml`.
    pub fn lockfile_path(&self) -> PathBuf {
        self.file.with_extension("lock")
    }

    /// Load a recipe file, apply `--set` overrides (`key=value`), validate and resolve it.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Recipe, RecipeErrors> {
        let mut sources = Sources::default();
        let text = std::fs::read_to_string(file).map_err(|err| {
            RecipeErrors::single(
                Arc::new(Sources::default()),
                Diagnostic::new(format!("cannot read recipe {}: {err}", file.display())),
            )
        })?;
        let source = sources.add(file.display().to_string(), text.as_str());
        let mut spans = SpanMap::default();
        let tree = parse_toml(&text, source, &ValuePath::root(), &mut spans);
        let mut tree = match tree {
            Ok(tree) => tree,
            Err(err) => return Err(RecipeErrors::single(Arc::new(sources), err.into())),
        };
        let mut errors = Vec::new();
        let mut applied = Vec::new();
        for raw in overrides {
            match apply_override(&mut tree, &mut sources, &mut spans, raw) {
                Ok(o) => applied.push(o),
                Err(e) => errors.push(e),
            }
        }
        let dir = file
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut loader = Loader::new(&spans, errors);
        let recipe = loader.recipe(&tree, file, dir, applied);
        let sources = Arc::new(sources);
        match recipe {
            Some(mut recipe) if loader.errors.is_empty() => {
                recipe.sources = sources;
                recipe.spans = spans;
                Ok(recipe)
            }
            _ => {
                // One bad value can be read through two roles (`reference` defaults to
                // `model`): report it once.
                let mut errors: Vec<Diagnostic> = Vec::new();
                for e in loader.errors {
                    let seen = errors.iter().any(|d| {
                        d.message == e.message
                            && d.labels.first().map(|l| &l.loc) == e.labels.first().map(|l| &l.loc)
                    });
                    if !seen {
                        errors.push(e);
                    }
                }
                Err(RecipeErrors::new(sources, errors))
            }
        }
    }
}

/// Node names: letters, digits, `_` and `-` (dots select outputs, slashes name parts).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
