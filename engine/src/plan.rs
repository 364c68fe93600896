//! Keys for every vertex, and the plan: which vertices run and why.
//!
//! Keys are computed in topological order, each from its inputs' keys (see `key.rs` for what
//! goes in). A stage runs when its key is not in the store (or it is forced). The reasons are
//! found by comparing the new lockfile entry with the one from the last successful run:
//!
//! ```text
//!   beta: 0.1 -> 0.2                  a parameter changed
//!   data prefs changed (content)      an input dataset or model changed
//!   input sft will be rebuilt         an upstream stage runs in this plan
//!   implementation of dpo changed     the kind's implementation version changed
//!   not in store                      same key as before, but the artifact is gone
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use petgraph::graph::NodeIndex;
use rudder_schema::kinds::NOT_IN_KEY;
use rudder_schema::{Backend, Diagnostic, NodeBody, Recipe, RecipeErrors, ValuePath};
use serde_json::{Value, json};

use crate::digest::DigestCache;
use crate::error::EngineError;
use crate::executor::Registry;
use crate::graph::{Graph, Source};
use crate::key::{Key, KeyBuilder, canonical_params};
use crate::lockfile::{LockEntry, Lockfile};
use crate::store::Store;

/// Input keys by role, with the output selected (`prep.train`).
type InputKeys = BTreeMap<String, (Key, Option<String>)>;

/// Which vertices a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these nodes (with their parts); their inputs must already be in the store.
    pub only: Vec<String>,
    /// This node and everything it depends on.
    pub until: Option<String>,
    /// Re-run these even if cached.
    pub force: Vec<String>,
    pub force_all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Cached,
    Run,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::Run => "run",
        }
    }
}

/// Why a vertex runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    NotInStore,
    Forced,
    /// A parameter (or seed, backend, precision) changed; `None` is "unset / default".
    Param {
        name: String,
        old: Option<String>,
        new: Option<String>,
    },
    /// An input dataset, model or file changed: what changed ("content" or "settings").
    InputChanged {
        role: String,
        node: String,
        what: &'static str,
    },
    /// An upstream stage runs in this plan.
    InputRebuilt {
        role: String,
        node: String,
    },
    /// An upstream stage's key changed, but its artifact is already in the store.
    InputSwitched {
        role: String,
        node: String,
    },
    InputAdded {
        role: String,
    },
    InputRemoved {
        role: String,
    },
    DepChanged {
        path: String,
    },
    ImplementationChanged {
        kind: String,
        old: u32,
        new: u32,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(default)".into());
        match self {
            Reason::NotInStore => write!(f, "not in store"),
            Reason::Forced => write!(f, "forced"),
            Reason::Param { name, old, new } => write!(f, "{name}: {} -> {}", show(old), show(new)),
            Reason::InputChanged { role, node, what } => {
                write!(f, "{role} {node} changed ({what})")
            }
            Reason::InputRebuilt { node, .. } => write!(f, "input {node} will be rebuilt"),
            Reason::InputSwitched { node, .. } => write!(f, "input {node} changed"),
            Reason::InputAdded { role } => write!(f, "input {role} added"),
            Reason::InputRemoved { role } => write!(f, "input {role} removed"),
            Reason::DepChanged { path } => write!(f, "dependency {path} changed (content)"),
            Reason::ImplementationChanged { kind, old, new } => {
                write!(f, "implementation of {kind} changed (v{old} -> v{new})")
            }
        }
    }
}

/// A vertex's key and the lockfile entry it would have after this run.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub key: Key,
    pub entry: LockEntry,
    /// Sources (datasets, models) are never run.
    pub is_source: bool,
    /// Seed, backend and precision the vertex runs with (stages and parts).
    pub backend: Backend,
}

#[derive(Debug, Clone)]
pub struct PlanEntry {
    pub index: NodeIndex,
    pub name: String,
    pub kind: String,
    pub key: Key,
    pub state: State,
    pub reasons: Vec<Reason>,
    pub is_source: bool,
}

#[derive(Debug)]
pub struct Plan {
    pub recipe: PathBuf,
    pub entries: Vec<PlanEntry>,
    /// Keys of every vertex of the graph (also those outside the selection).
    pub keyed: BTreeMap<NodeIndex, Keyed>,
}

impl Plan {
    pub fn to_run(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries.iter().filter(|e| e.state == State::Run)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "recipe": self.recipe.display().to_string(),
            "nodes": self.entries.iter().map(|e| json!({
                "name": e.name,
                "kind": e.kind,
                "key": e.key.to_hex(),
                "state": e.state.as_str(),
                "reasons": e.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Computes keys and plans.
pub struct Planner<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub digests: &'a DigestCache,
    /// `--backend`, which wins over the recipe.
    pub backend: Option<Backend>,
}

impl Planner<'_> {
    /// Keys of every vertex, in topological order. Missing or mismatched files are recipe
    /// errors located at the path that names them.
    pub fn keys(&self) -> Result<BTreeMap<NodeIndex, Keyed>, EngineError> {
        let mut keyed: BTreeMap<NodeIndex, Keyed> = BTreeMap::new();
        let mut errors: Vec<Diagnostic> = Vec::new();
        for &index in &self.graph.order {
            match self.key_vertex(index, &keyed) {
                Ok(Some(k)) => {
                    keyed.insert(index, k);
                }
                Ok(None) => {}
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(keyed)
        } else {
            Err(RecipeErrors::new(self.recipe.sources.clone(), errors).into())
        }
    }

    fn located(&self, path: &ValuePath, message: String, label: &str) -> Diagnostic {
        Diagnostic::new(message).with_optional_label(self.recipe.loc(path), label)
    }

    fn digest_of(
        &self,
        file: &Path,
        at: &ValuePath,
        what: &str,
    ) -> Result<String, Vec<Diagnostic>> {
        if !file.exists() {
            return Err(vec![self.located(
                at,
                format!("{what} {} does not exist", file.display()),
                "this path",
            )]);
        }
        self.digests
            .file(file)
            .map_err(|e| vec![self.located(at, format!("{what}: {e}"), "this path")])
    }

    /// `Ok(None)` only for vertices whose inputs failed (their errors are already reported).
    fn key_vertex(
        &self,
        index: NodeIndex,
        keyed: &BTreeMap<NodeIndex, Keyed>,
    ) -> Result<Option<Keyed>, Vec<Diagnostic>> {
        let vertex = self.graph.vertex(index);
        let node = &self.recipe.nodes[vertex.node];
        let dir = &self.recipe.dir;
        match &node.body {
            NodeBody::Dataset(spec) => {
                let file = dir.join(&spec.path);
                let digest = self.digest_of(
                    &file,
                    &node.path.key("path"),
                    &format!("dataset `{}`:", node.name),
                )?;
                if let Some(pin) = &spec.blake3
                    && *pin != digest
                {
                    return Err(vec![self.located(
                        &node.path.key("blake3"),
                        format!(
                            "dataset `{}`: {} has blake3 {digest}, not the pinned value",
                            node.name, spec.path
                        ),
                        "pinned here",
                    )]);
                }
                let format = spec
                    .resolved_format()
                    .expect("validated when loading")
                    .as_str();
                let columns = serde_json::to_value(&spec.columns).expect("map serialises");
                let key = KeyBuilder::new("dataset")
                    .str(format)
                    .field("columns", &columns)
                    .str(&digest)
                    .finish();
                let file_name = Path::new(&spec.path)
                    .file_name()
                    .map_or_else(|| spec.path.clone(), |n| n.to_string_lossy().into_owned());
                Ok(Some(source(
                    &node.name,
                    "dataset",
                    key,
                    canonical_params(
                        &json!({"path": spec.path, "format": format, "columns": columns}),
                        &[],
                    ),
                    BTreeMap::new(),
                    [(file_name, digest)].into(),
                )))
            }
            NodeBody::Model(model) => {
                let mut params = serde_json::to_value(&model.spec).expect("model spec serialises");
                if let Some(hf) = &model.spec.hf {
                    let files =
                        self.model_files(&dir.join(hf), &node.path.key("hf"), &node.name)?;
                    let mut builder = KeyBuilder::new("model");
                    builder.str("hf");
                    for (name, digest) in &files {
                        builder.str(name).str(digest);
                    }
                    let key = builder.finish();
                    return Ok(Some(source(
                        &node.name,
                        "model",
                        key,
                        canonical_params(&params, &["description"]),
                        BTreeMap::new(),
                        files.into_iter().collect(),
                    )));
                }
                // A fresh architecture: its key is its configuration and its tokenizer's key.
                let inputs = self.input_keys(vertex, keyed)?;
                if let Value::Object(map) = &mut params {
                    map.shift_remove("tokenizer");
                }
                let config = canonical_params(&params, &["description"]);
                let mut builder = KeyBuilder::new("model");
                builder.str("fresh").field("config", &config);
                add_inputs(&mut builder, &inputs);
                let key = builder.finish();
                Ok(Some(source(
                    &node.name,
                    "model",
                    key,
                    config,
                    render_inputs(&inputs),
                    BTreeMap::new(),
                )))
            }
            NodeBody::Stage(stage) => {
                let inputs = self.input_keys(vertex, keyed)?;
                let backend = self.backend.unwrap_or(stage.backend);
                let (kind, key_params, params, deps) = match &vertex.part {
                    Some(part) => (
                        part.kind.clone(),
                        part.params.clone(),
                        part.params.clone(),
                        BTreeMap::new(),
                    ),
                    None => {
                        let mut deps = BTreeMap::new();
                        let mut errors = Vec::new();
                        for (field, dep) in stage.spec.deps() {
                            let mut at = node.path.clone();
                            at.0.extend(field.0);
                            match self.dep_digest(&dir.join(&dep), &at) {
                                Ok(d) => {
                                    deps.insert(dep, d);
                                }
                                Err(mut e) => errors.append(&mut e),
                            }
                        }
                        if !errors.is_empty() {
                            return Err(errors);
                        }
                        (
                            stage.spec.key_kind().to_owned(),
                            stage.spec.key_params(),
                            stage.spec.params(),
                            deps,
                        )
                    }
                };
                let version = self.registry.version(&kind);
                let key_params = canonical_params(&key_params, NOT_IN_KEY);
                let mut builder = KeyBuilder::new("stage");
                builder
                    .str(&kind)
                    .u64(u64::from(version))
                    .field("params", &key_params);
                add_inputs(&mut builder, &inputs);
                for (path, digest) in &deps {
                    builder.str(path).str(digest);
                }
                builder
                    .u64(stage.seed)
                    .str(backend.as_str())
                    .str(stage.precision.as_str());
                let key = builder.finish();
                let entry_kind = match &vertex.part {
                    Some(part) => part.kind.clone(),
                    None => stage.spec.kind().to_owned(),
                };
                Ok(Some(Keyed {
                    key,
                    is_source: false,
                    backend,
                    entry: LockEntry {
                        name: vertex.name.clone(),
                        kind: entry_kind,
                        key: key.to_hex(),
                        implementation: Some(version),
                        seed: Some(stage.seed),
                        backend: Some(backend.as_str().into()),
                        precision: Some(stage.precision.as_str().into()),
                        params: canonical_params(&params, &[]),
                        inputs: render_inputs(&inputs),
                        deps,
                        outputs: BTreeMap::new(),
                    },
                }))
            }
        }
    }

    fn dep_digest(&self, path: &Path, at: &ValuePath) -> Result<String, Vec<Diagnostic>> {
        if path.is_dir() {
            let files = self
                .digests
                .tree(path)
                .map_err(|e| vec![self.located(at, e.to_string(), "this path")])?;
            let mut builder = KeyBuilder::new("tree");
            for (name, digest) in files {
                builder.str(&name).str(&digest);
            }
            Ok(builder.finish().to_hex())
        } else {
            self.digest_of(path, at, "dependency")
        }
    }

    /// Content digests of the files of a Hugging Face model directory that determine it.
    fn model_files(
        &self,
        dir: &Path,
        at: &ValuePath,
        name: &str,
    ) -> Result<Vec<(String, String)>, Vec<Diagnostic>> {
        if !dir.join("config.json").is_file() {
            return Err(vec![self.located(
                at,
                format!(
                    "model `{name}`: {} is not a Hugging Face model directory (no config.json)",
                    dir.display()
                ),
                "this path",
            )]);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| vec![self.located(at, format!("model `{name}`: {e}"), "this path")])?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_model_file(n))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let digest = self.digest_of(&dir.join(&n), at, &format!("model `{name}`:"))?;
                Ok((n, digest))
            })
            .collect()
    }

    /// Input keys by role: `(key, selected output)`.
    fn input_keys(
        &self,
        vertex: &crate::graph::Vertex,
        keyed: &BTreeMap<NodeIndex, Keyed>,
    ) -> Result<InputKeys, Vec<Diagnostic>> {
        let mut inputs = BTreeMap::new();
        let mut errors = Vec::new();
        for input in &vertex.inputs {
            match &input.source {
                Source::Vertex { index, output } => match keyed.get(index) {
                    Some(k) => {
                        inputs.insert(input.role.clone(), (k.key, output.clone()));
                    }
                    // The input failed and was reported; this vertex cannot be keyed.
                    None => return Err(Vec::new()),
                },
                Source::File(path) => {
                    let at = input.path.clone().unwrap_or_default();
                    match self.digest_of(path, &at, "file") {
                        Ok(digest) => {
                            let key = Key::from_hex(&digest).expect("BLAKE3 hex is a key");
                            inputs.insert(input.role.clone(), (key, None));
                        }
                        Err(mut e) => errors.append(&mut e),
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(inputs)
        } else {
            Err(errors)
        }
    }

    /// The plan for a selection, with reasons compared to the lockfile.
    pub fn plan(&self, selection: &Selection, lock: &Lockfile) -> Result<Plan, EngineError> {
        let keyed = self.keys()?;
        let resolve = |name: &str| -> Result<NodeIndex, EngineError> {
            self.graph.index(name).ok_or_else(|| {
                let names: Vec<&str> = self
                    .graph
                    .order
                    .iter()
                    .map(|&i| self.graph.vertex(i).name.as_str())
                    .collect();
                let hint = rudder_schema::diagnostic::did_you_mean(name, names.iter().copied())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                EngineError::Usage(format!("no node named `{name}` in the recipe{hint}"))
            })
        };
        let mut considered: BTreeSet<NodeIndex> = BTreeSet::new();
        if !selection.only.is_empty() {
            for name in &selection.only {
                considered.extend(self.graph.with_parts(resolve(name)?));
            }
        }
        if let Some(until) = &selection.until {
            considered.extend(self.graph.ancestors(resolve(until)?));
        }
        if selection.only.is_empty() && selection.until.is_none() {
            considered.extend(self.graph.order.iter().copied());
        }
        let mut forced: BTreeSet<NodeIndex> = BTreeSet::new();
        for name in &selection.force {
            forced.extend(self.graph.with_parts(resolve(name)?));
        }
        let mut entries: Vec<PlanEntry> = Vec::new();
        let mut states: BTreeMap<NodeIndex, State> = BTreeMap::new();
        for &index in &self.graph.order {
            let k = &keyed[&index];
            let in_store = k.is_source || self.store.contains(&k.key);
            let force = !k.is_source && (selection.force_all || forced.contains(&index));
            let state = if considered.contains(&index) && (force || !in_store) {
                State::Run
            } else {
                State::Cached
            };
            states.insert(index, state);
            if !considered.contains(&index) {
                continue;
            }
            let mut reasons = Vec::new();
            if state == State::Run {
                if force {
                    reasons.push(Reason::Forced);
                }
                let old = lock.entry(&k.entry.name);
                if !force || old.is_some_and(|o| o.key != k.entry.key) {
                    reasons.extend(self.reasons(index, &k.entry, old, lock, &keyed, &states));
                }
            }
            entries.push(PlanEntry {
                index,
                name: k.entry.name.clone(),
                kind: k.entry.kind.clone(),
                key: k.key,
                state,
                reasons,
                is_source: k.is_source,
            });
        }
        // A selection that leaves out an input stage needs that input's artifact already built.
        for entry in entries.iter().filter(|e| e.state == State::Run) {
            for input in &self.graph.vertex(entry.index).inputs {
                if let Source::Vertex { index, .. } = input.source
                    && !considered.contains(&index)
                    && !keyed[&index].is_source
                    && !self.store.contains(&keyed[&index].key)
                {
                    return Err(EngineError::Usage(format!(
                        "`{}` needs `{}`, which is not in the store and not selected; run it first, or use --until {}",
                        entry.name,
                        self.graph.vertex(index).name,
                        entry.name
                    )));
                }
            }
        }
        Ok(Plan {
            recipe: self.recipe.file.clone(),
            entries,
            keyed,
        })
    }

    fn reasons(
        &self,
        index: NodeIndex,
        new: &LockEntry,
        old: Option<&LockEntry>,
        lock: &Lockfile,
        keyed: &BTreeMap<NodeIndex, Keyed>,
        states: &BTreeMap<NodeIndex, State>,
    ) -> Vec<Reason> {
        let Some(old) = old else {
            return vec![Reason::NotInStore];
        };
        if old.key == new.key {
            return vec![Reason::NotInStore];
        }
        let mut reasons = Vec::new();
        if let (Some(o), Some(n)) = (old.implementation, new.implementation)
            && o != n
        {
            reasons.push(Reason::ImplementationChanged {
                kind: new.kind.clone(),
                old: o,
                new: n,
            });
        }
        diff_values("", &old.params, &new.params, &mut reasons);
        let scalar =
            |name: &str, o: Option<String>, n: Option<String>, reasons: &mut Vec<Reason>| {
                if o != n {
                    reasons.push(Reason::Param {
                        name: name.into(),
                        old: o,
                        new: n,
                    });
                }
            };
        scalar(
            "seed",
            old.seed.map(|s| s.to_string()),
            new.seed.map(|s| s.to_string()),
            &mut reasons,
        );
        scalar(
            "backend",
            old.backend.clone(),
            new.backend.clone(),
            &mut reasons,
        );
        scalar(
            "precision",
            old.precision.clone(),
            new.precision.clone(),
            &mut reasons,
        );
        let vertex = self.graph.vertex(index);
        for input in &vertex.inputs {
            let Some(new_key) = new.inputs.get(&input.role) else {
                continue;
            };
            let node_name = match &input.source {
                Source::Vertex { index, .. } => self.graph.vertex(*index).name.clone(),
                Source::File(path) => path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            match old.inputs.get(&input.role) {
                None => reasons.push(Reason::InputAdded {
                    role: input.role.clone(),
                }),
                Some(old_key) if old_key == new_key => {}
                Some(old_key) => match &input.source {
                    Source::Vertex { index: from, .. } if !keyed[from].is_source => {
                        if states.get(from) == Some(&State::Run) {
                            reasons.push(Reason::InputRebuilt {
                                role: input.role.clone(),
                                node: node_name,
                            });
                        } else {
                            reasons.push(Reason::InputSwitched {
                                role: input.role.clone(),
                                node: node_name,
                            });
                        }
                    }
                    Source::Vertex { index: from, .. } => {
                        let before = lock.by_key(old_key.split('/').next().unwrap_or(old_key));
                        let what = match before {
                            Some(b) if b.outputs == keyed[from].entry.outputs => "settings",
                            _ => "content",
                        };
                        reasons.push(Reason::InputChanged {
                            role: input.role.clone(),
                            node: node_name,
                            what,
                        });
                    }
                    Source::File(_) => reasons.push(Reason::InputChanged {
                        role: input.role.clone(),
                        node: node_name,
                        what: "content",
                    }),
                },
            }
        }
        for role in old.inputs.keys() {
            if !new.inputs.contains_key(role) {
                reasons.push(Reason::InputRemoved { role: role.clone() });
            }
        }
        for (path, digest) in &new.deps {
            if old.deps.get(path) != Some(digest) {
                reasons.push(Reason::DepChanged { path: path.clone() });
            }
        }
        if reasons.is_empty() {
            // Only settings outside the lockfile changed (e.g. the key scheme itself).
            reasons.push(Reason::NotInStore);
        }
        // Two roles can read the same upstream node (`split.train`, `split.eval`): say it once.
        let mut unique: Vec<Reason> = Vec::with_capacity(reasons.len());
        for reason in reasons {
            if !unique.iter().any(|r| r.to_string() == reason.to_string()) {
                unique.push(reason);
            }
        }
        unique
    }
}

/// A dataset's or model's vertex: sources are never run, so they carry no run settings.
fn source(
    name: &str,
    kind: &str,
    key: Key,
    params: Value,
    inputs: BTreeMap<String, String>,
    outputs: BTreeMap<String, String>,
) -> Keyed {
    Keyed {
        key,
        is_source: true,
        backend: Backend::Cpu,
        entry: LockEntry {
            name: name.to_owned(),
            kind: kind.to_owned(),
            key: key.to_hex(),
            implementation: None,
            seed: None,
            backend: None,
            precision: None,
            params,
            inputs,
            deps: BTreeMap::new(),
            outputs,
        },
    }
}

/// Input keys enter a key by role, with the output each selects.
fn add_inputs(builder: &mut KeyBuilder, inputs: &InputKeys) {
    for (role, (key, output)) in inputs {
        builder
            .str(role)
            .key(key)
            .str(output.as_deref().unwrap_or(""));
    }
}

fn render_inputs(inputs: &InputKeys) -> BTreeMap<String, String> {
    inputs
        .iter()
        .map(|(role, (key, output))| {
            let value = match output {
                Some(o) => format!("{}/{o}", key.to_hex()),
                None => key.to_hex(),
            };
            (role.clone(), value)
        })
        .collect()
}

/// The files of a Hugging Face directory that determine the model.
fn is_model_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || matches!(
            name,
            "config.json"
                | "model.safetensors.index.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
                | "generation_config.json"
                | "chat_template.jinja"
                | "tokenizer.model"
        )
}

/// Parameter differences as `a.b: old -> new`, recursing into tables.
fn diff_values(prefix: &str, old: &Value, new: &Value, reasons: &mut Vec<Reason>) {
    let name = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (key, new_value) in n {
                match o.get(key) {
                    Some(old_value) => diff_values(&name(key), old_value, new_value, reasons),
                    None => reasons.push(Reason::Param {
                        name: name(key),
                        old: None,
                        new: Some(render(new_value)),
                    }),
                }
            }
            for (key, old_value) in o {
                if !n.contains_key(key) {
                    reasons.push(Reason::Param {
                        name: name(key),
                        old: Some(render(old_value)),
                        new: None,
                    });
                }
            }
        }
        (o, n) if o != n => reasons.push(Reason::Param {
            name: prefix.to_owned(),
            old: Some(render(o)),
            new: Some(render(n)),
        }),
        _ => {}
    }
}

/// A value as the recipe would write it.
fn render(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_nested_changes() {
        let mut reasons = Vec::new();
        diff_values(
            "",
            &json!({"beta": 0.1, "env": {"A": "1"}, "gone": 3}),
            &json!({"beta": 0.2, "env": {"A": "2"}, "new": true}),
            &mut reasons,
        );
        let shown: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "beta: 0.1 -> 0.2",
                "env.A: \"1\" -> \"2\"",
                "new: (default) -> true",
                "gone: 3 -> (default)"
            ]
        );
    }
}
