//! Keys of every vertex: datasets and models from their content, stages and parts from their
//! kind, implementation version, parameters, inputs' keys by role, dependency files, seed,
//! backend and precision (the encoding itself is `key.rs`'s). Missing or mismatched files are
//! recipe errors located at the path that names them.

use std::collections::BTreeMap;
use std::path::Path;

use petgraph::graph::NodeIndex;
use rudder_schema::kinds::NOT_IN_KEY;
use rudder_schema::{Backend, Diagnostic, NodeBody, RecipeErrors, ValuePath};
use serde_json::{Value, json};

use crate::error::EngineError;
use crate::graph::Source;
use crate::key::{Key, KeyBuilder, canonical_params};
use crate::lockfile::LockEntry;
use crate::plan::Planner;

/// Input keys by role, with the output selected (`prep.train`).
pub(crate) type InputKeys = BTreeMap<String, (Key, Option<String>)>;

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
                let file_format = spec.resolved_format().expect("validated when loading");
                // A row layout joins the file format; without one the key is as it always was.
                let format = match spec.layout() {
                    Some(layout) => format!("{}+{}", file_format.as_str(), layout.as_str()),
                    None => file_format.as_str().to_owned(),
                };
                let format = format.as_str();
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
                    let mut files = files;
                    // An adapter adds its two files, by content (absent: the key is unchanged).
                    if let Some(adapter) = &model.spec.adapter {
                        let at = node.path.key("adapter");
                        builder.str("adapter");
                        for file in ["adapter_config.json", "adapter_model.safetensors"] {
                            let digest = self.digest_of(
                                &dir.join(adapter).join(file),
                                &at,
                                &format!("model `{}`: adapter", node.name),
                            )?;
                            builder.str(file).str(&digest);
                            files.push((format!("adapter/{file}"), digest));
                        }
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
                // A part reads its stage's `deps` too (an iterative stage's rounds run its
                // judge command), so their content is in every part's key as well.
                let mut deps = BTreeMap::new();
                let mut errors = Vec::new();
                for (field, dep) in stage.spec.deps() {
                    let mut at = node.path.clone();
                    at.0.extend(field.0);
                    match self.dep_digest(&dir.join(&dep), &at) {
                        Ok(d) => {
                            deps.insert(dep, d);
                        }
                        // Reported once, by the stage itself.
                        Err(mut e) if vertex.part.is_none() => errors.append(&mut e),
                        Err(_) => {}
                    }
                }
                // Files a sandboxed command may read enter by content, like `deps`, but not by
                // path: `read_paths` may be absolute, and paths never enter a key.
                let mut read = BTreeMap::new();
                for (field, path) in stage.spec.read_paths() {
                    let mut at = node.path.clone();
                    at.0.extend(field.0);
                    let full = dir.join(&path);
                    if full.is_dir() {
                        continue;
                    }
                    match self.digest_of(&full, &at, "read path") {
                        Ok(d) => {
                            read.insert(path, d);
                        }
                        Err(mut e) => errors.append(&mut e),
                    }
                }
                if !errors.is_empty() {
                    return Err(errors);
                }
                let (kind, key_params, params) = match &vertex.part {
                    Some(part) => (part.kind.clone(), part.params.clone(), part.params.clone()),
                    None => (
                        stage.spec.key_kind(),
                        stage.spec.key_params(),
                        stage.spec.params(),
                    ),
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
                if !read.is_empty() {
                    builder.str("read_paths");
                    for digest in read.values() {
                        builder.str(digest);
                    }
                }
                // The lockfile shows both, so that `plan` names a changed read path.
                deps.extend(read);
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
