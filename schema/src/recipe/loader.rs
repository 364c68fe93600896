//! Reading a parsed recipe tree into the model: each table checked against its schema and typed,
//! every error collected with its location, then every reference resolved to a node or a file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::schemas::{Schemas, property_names, schemas};
use super::{Input, Model, Node, NodeBody, Override, Recipe, Stage, Target, is_valid_name};
use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::kinds::{Expect, FieldError, InputField, KINDS, Produces, kind_info};
use crate::nodes::{
    DatasetSpec, ExecutorSpec, ModelSpec, Precision, RecipeMeta, RemoteSpec, Resources,
    StageCommon, check_remote_url,
};
use crate::source::{SpanMap, ValuePath};
use crate::validate::{SchemaError, validate};

mod inherit;

const COMMON_KEYS: &[&str] = &[
    "kind",
    "after",
    "description",
    "seed",
    "backend",
    "precision",
    "resources",
];

const TOP_LEVEL: &[&str] = &[
    "recipe", "executor", "remotes", "datasets", "models", "stages",
];

/// Keys of a `[remotes.NAME]` table.
const REMOTE_KEYS: &[&str] = &["url", "default"];

pub(crate) struct Loader<'a> {
    spans: &'a SpanMap,
    pub(crate) errors: Vec<Diagnostic>,
    schemas: &'static Schemas,
}

impl<'a> Loader<'a> {
    pub(crate) fn new(spans: &'a SpanMap, errors: Vec<Diagnostic>) -> Self {
        Loader {
            spans,
            errors,
            schemas: schemas(),
        }
    }

    /// The `[remotes.NAME]` tables at `path` (in a recipe or the user's configuration): names,
    /// URLs without credentials, at most one `default`.
    pub(crate) fn remotes(
        &mut self,
        value: &Value,
        path: &ValuePath,
    ) -> BTreeMap<String, RemoteSpec> {
        let mut remotes = BTreeMap::new();
        let Value::Object(entries) = value else {
            self.error(
                path,
                "`remotes` must be a table of named remotes: [remotes.NAME] url = \"...\"",
                "here",
            );
            return remotes;
        };
        let mut default: Option<String> = None;
        for (name, body) in entries {
            let at = path.key(name);
            let context = format!("remote `{name}`");
            if !is_valid_name(name) {
                self.key_error(
                    &at,
                    format!("invalid remote name `{name}`"),
                    Some("names use letters, digits, `_` and `-`".into()),
                );
                continue;
            }
            let Value::Object(table) = body else {
                self.error(
                    &at,
                    format!("{context} must be a table with a `url`"),
                    "here",
                );
                continue;
            };
            let mut known = serde_json::Map::new();
            for (key, field) in table {
                if REMOTE_KEYS.contains(&key.as_str()) {
                    known.insert(key.clone(), field.clone());
                    continue;
                }
                let help = if looks_like_a_credential(key) {
                    Some("credentials never go in a file: rudder reads them from the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)".to_owned())
                } else {
                    did_you_mean(key, REMOTE_KEYS.iter().copied())
                        .or_else(|| Some("a remote has `url` and `default`; endpoints and credentials come from the environment".into()))
                };
                self.key_error(
                    &at.key(key),
                    format!("{context}: unknown key `{key}`"),
                    help,
                );
            }
            let Some(spec) = self.typed::<RemoteSpec>(
                &self.schemas.remote,
                &Value::Object(known),
                &at,
                &context,
            ) else {
                continue;
            };
            if let Err(message) = check_remote_url(&spec.url) {
                self.error(&at.key("url"), format!("{context}: {message}"), "here");
                continue;
            }
            if spec.default {
                if let Some(first) = &default {
                    let loc = self.spans.value(&at.key("default"));
                    let first_loc = self.spans.value(&path.key(first).key("default"));
                    let mut diagnostic = Diagnostic::new(format!(
                        "remotes `{first}` and `{name}` are both the default"
                    ))
                    .with_optional_label(loc, "second default");
                    if let Some(first_loc) = first_loc {
                        diagnostic = diagnostic.with_label(first_loc, "first default");
                    }
                    self.errors.push(
                        diagnostic.with_help(
                            "one remote is the default; name another with --remote NAME",
                        ),
                    );
                    continue;
                }
                default = Some(name.clone());
            }
            remotes.insert(name.clone(), spec);
        }
        remotes
    }

    fn error(&mut self, path: &ValuePath, message: impl Into<String>, label: &str) {
        let loc = self.spans.value(path);
        self.errors
            .push(Diagnostic::new(message).with_optional_label(loc, label));
    }

    fn key_error(&mut self, path: &ValuePath, message: impl Into<String>, help: Option<String>) {
        let loc = self.spans.key_or_value(path);
        self.errors.push(
            Diagnostic::new(message)
                .with_optional_label(loc, "here")
                .with_optional_help(help),
        );
    }

    fn schema_errors(&mut self, errors: Vec<SchemaError>, context: &str) {
        for e in errors {
            let loc = if e.at_key {
                self.spans.key_or_value(&e.path)
            } else {
                self.spans.value(&e.path)
            };
            let label = if e.at_key { "unknown key" } else { "here" };
            self.errors.push(
                Diagnostic::new(format!("{context}: {}", e.message))
                    .with_optional_label(loc, label)
                    .with_optional_help(e.help),
            );
        }
    }

    fn field_errors(&mut self, base: &ValuePath, errors: Vec<FieldError>, context: &str) {
        for e in errors {
            let mut path = base.clone();
            path.0.extend(e.path.0);
            self.error(&path, format!("{context}: {}", e.message), "here");
        }
    }

    /// Validate against a schema, then deserialise; `None` after reporting errors.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        schema: &Value,
        value: &Value,
        path: &ValuePath,
        context: &str,
    ) -> Option<T> {
        let errors = validate(&self.schemas.root, schema, value, path);
        if !errors.is_empty() {
            self.schema_errors(errors, context);
            return None;
        }
        match serde_json::from_value(value.clone()) {
            Ok(typed) => Some(typed),
            Err(err) => {
                self.error(path, format!("{context}: {err}"), "here");
                None
            }
        }
    }

    pub(super) fn recipe(
        &mut self,
        tree: &Value,
        file: &Path,
        dir: PathBuf,
        overrides: Vec<Override>,
    ) -> Option<Recipe> {
        let root = ValuePath::root();
        let Value::Object(top) = tree else {
            return None;
        };
        for key in top.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) {
                self.key_error(
                    &root.key(key),
                    format!("unknown top-level table `{key}`"),
                    did_you_mean(key, TOP_LEVEL.iter().copied()).or_else(|| {
                        Some(
                            "a recipe has [recipe], [executor], [remotes.*], [datasets.*], [models.*] and [stages.*]"
                                .into(),
                        )
                    }),
                );
            }
        }
        let meta_value = top
            .get("recipe")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let meta: RecipeMeta = self
            .typed(
                &self.schemas.meta,
                &meta_value,
                &root.key("recipe"),
                "[recipe]",
            )
            .unwrap_or_default();
        let executor_path = root.key("executor");
        let executor: ExecutorSpec = match top.get("executor") {
            Some(value) => self
                .typed(&self.schemas.executor, value, &executor_path, "[executor]")
                .unwrap_or_default(),
            None => ExecutorSpec::default(),
        };
        self.resource_errors(
            &executor.resources,
            &executor_path.key("resources"),
            "[executor]",
        );
        let remotes = match top.get("remotes") {
            Some(value) => self.remotes(value, &root.key("remotes")),
            None => BTreeMap::new(),
        };
        let name = meta.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "recipe".into())
        });

        let mut nodes = Vec::new();
        let mut first_seen: HashMap<String, ValuePath> = HashMap::new();
        for section in ["datasets", "models", "stages"] {
            let Some(table) = top.get(section) else {
                continue;
            };
            let section_path = root.key(section);
            let Value::Object(entries) = table else {
                self.error(
                    &section_path,
                    format!("`{section}` must be a table of named nodes"),
                    "here",
                );
                continue;
            };
            for (name, body) in entries {
                let path = section_path.key(name);
                if !is_valid_name(name) {
                    self.key_error(
                        &path,
                        format!("invalid node name `{name}`"),
                        Some("names use letters, digits, `_` and `-`".into()),
                    );
                    continue;
                }
                if let Some(first) = first_seen.get(name) {
                    let first_loc = self.spans.key_or_value(first);
                    let loc = self.spans.key_or_value(&path);
                    let mut diagnostic = Diagnostic::new(format!("duplicate node name `{name}`"))
                        .with_optional_label(loc, "second definition");
                    if let Some(first_loc) = first_loc {
                        diagnostic = diagnostic.with_label(first_loc, "first defined here");
                    }
                    self.errors.push(
                        diagnostic
                            .with_help("node names are unique across datasets, models and stages"),
                    );
                    continue;
                }
                first_seen.insert(name.clone(), path.clone());
                let node_body = match section {
                    "datasets" => self.dataset(body, &path, name).map(NodeBody::Dataset),
                    "models" => self
                        .model(body, &path, name)
                        .map(|m| NodeBody::Model(Box::new(m))),
                    _ => self
                        .stage(body, &path, name, &meta, &dir)
                        .map(NodeBody::Stage),
                };
                if let Some(body) = node_body {
                    nodes.push(Node {
                        name: name.clone(),
                        path,
                        body,
                    });
                }
            }
        }
        let mut recipe = Recipe {
            file: file.to_path_buf(),
            dir,
            meta,
            executor,
            remotes,
            name,
            nodes,
            sources: Arc::default(),
            spans: SpanMap::default(),
            overrides,
        };
        self.resolve(&mut recipe);
        self.inherit_lora(&mut recipe);
        Some(recipe)
    }

    fn dataset(&mut self, body: &Value, path: &ValuePath, name: &str) -> Option<DatasetSpec> {
        let context = format!("dataset `{name}`");
        let spec: DatasetSpec = self.typed(&self.schemas.dataset, body, path, &context)?;
        if spec.resolved_format().is_none() {
            self.error(
                &path.key("path"),
                format!(
                    "{context}: cannot tell the format of `{}` from its extension",
                    spec.path
                ),
                "here",
            );
            self.errors.last_mut().expect("just pushed").help =
                Some("name it .jsonl, .json, .parquet or .txt, or set `format`".into());
        }
        Some(spec)
    }

    fn model(&mut self, body: &Value, path: &ValuePath, name: &str) -> Option<Model> {
        let context = format!("model `{name}`");
        let spec: ModelSpec = self.typed(&self.schemas.model, body, path, &context)?;
        if spec.adapter.is_some() && spec.hf.is_none() {
            self.error(
                &path.key("adapter"),
                format!("{context}: an `adapter` applies to a pretrained `hf` model"),
                "here",
            );
        }
        match (&spec.hf, &spec.arch) {
            (Some(_), Some(_)) => self.error(
                &path.key("arch"),
                format!("{context}: give either `hf` (a model directory) or `arch` (a fresh model), not both"),
                "here",
            ),
            (None, None) => self.error(
                path,
                format!("{context}: needs `hf = \"path/to/model\"` or a fresh `arch = \"llama\"`"),
                "this model",
            ),
            (None, Some(_)) => {
                for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"] {
                    if body.get(field).is_none() {
                        self.error(path, format!("{context}: a fresh architecture needs `{field}`"), "this model");
                    }
                }
                if spec.tokenizer.is_none() && spec.vocab_size.is_none() {
                    self.error(
                        path,
                        format!("{context}: a fresh architecture needs `tokenizer` (its vocab_size follows it)"),
                        "this model",
                    );
                }
                if let (Some(hidden), Some(heads)) = (spec.hidden_size, spec.num_attention_heads)
                    && spec.head_dim.is_none()
                    && hidden % heads != 0
                {
                    self.error(
                        &path.key("num_attention_heads"),
                        format!("{context}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"),
                        "here",
                    );
                }
                let head_dim = spec.head_dim.or_else(|| {
                    let (hidden, heads) = (spec.hidden_size?, spec.num_attention_heads?);
                    (hidden % heads == 0).then(|| hidden / heads)
                });
                if let Some(d) = head_dim
                    && d % 2 != 0
                {
                    self.error(
                        &path.key(if spec.head_dim.is_some() { "head_dim" } else { "hidden_size" }),
                        format!("{context}: head_dim {d} is odd; rotary embeddings rotate pairs, so it must be even"),
                        "here",
                    );
                }
                if let (Some(heads), Some(kv)) = (spec.num_attention_heads, spec.num_key_value_heads)
                    && heads % kv != 0
                {
                    self.error(
                        &path.key("num_key_value_heads"),
                        format!("{context}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"),
                        "here",
                    );
                }
            }
            (Some(_), None) => {
                let fresh_only = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "rope_theta", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "initializer_range", "tokenizer"];
                for field in fresh_only {
                    if body.get(field).is_some() {
                        self.error(
                            &path.key(field),
                            format!("{context}: `{field}` describes a fresh architecture; an `hf` model reads it from its config.json"),
                            "here",
                        );
                    }
                }
            }
        }
        let tokenizer = spec.tokenizer.clone().map(|target| Input {
            field: InputField {
                role: "tokenizer".into(),
                path: ValuePath::root().key("tokenizer"),
                target,
                expect: Expect::Tokenizer,
                may_be_path: true,
            },
            target: Target::Path(PathBuf::new()),
            path: path.key("tokenizer"),
        });
        Some(Model { spec, tokenizer })
    }

    fn stage(
        &mut self,
        body: &Value,
        path: &ValuePath,
        name: &str,
        meta: &RecipeMeta,
        _dir: &Path,
    ) -> Option<Stage> {
        let context = format!("stage `{name}`");
        let Value::Object(table) = body else {
            self.error(path, format!("{context} must be a table"), "here");
            return None;
        };
        let Some(kind_value) = table.get("kind") else {
            self.error(path, format!("{context}: missing `kind`"), "this stage");
            let kinds: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
            self.errors.last_mut().expect("just pushed").help =
                Some(format!("kinds: {}", kinds.join(", ")));
            return None;
        };
        let Some(kind_name) = kind_value.as_str() else {
            self.error(
                &path.key("kind"),
                format!("{context}: `kind` must be a string"),
                "here",
            );
            return None;
        };
        let Some(kind) = kind_info(kind_name) else {
            let loc = self.spans.value(&path.key("kind"));
            let help = did_you_mean(kind_name, KINDS.iter().map(|k| k.name)).unwrap_or_else(|| {
                let kinds: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
                format!("kinds: {}", kinds.join(", "))
            });
            self.errors.push(
                Diagnostic::new(format!("{context}: unknown kind `{kind_name}`"))
                    .with_optional_label(loc, "unknown kind")
                    .with_help(help),
            );
            return None;
        };
        let (common_part, params_part): (
            serde_json::Map<String, Value>,
            serde_json::Map<String, Value>,
        ) = table
            .clone()
            .into_iter()
            .partition(|(k, _)| COMMON_KEYS.contains(&k.as_str()));
        let common: Option<StageCommon> = self.typed(
            &self.schemas.common,
            &Value::Object(common_part),
            path,
            &context,
        );
        let kind_schema = self.schemas.kinds[kind.name].clone();
        let params_value = Value::Object(params_part);
        // Unknown keys: checked here (the kind's own schema allows flattened groups, so it
        // cannot say `additionalProperties: false` itself), with the common keys as candidates.
        let known = property_names(&self.schemas.root, &kind_schema);
        let mut unknown = false;
        for key in params_value.as_object().expect("object").keys() {
            if !known.iter().any(|k| k == key) {
                unknown = true;
                let candidates = known
                    .iter()
                    .map(String::as_str)
                    .chain(COMMON_KEYS.iter().copied());
                self.key_error(
                    &path.key(key),
                    format!("{context}: unknown key `{key}` for kind `{}`", kind.name),
                    did_you_mean(key, candidates),
                );
            }
        }
        let errors = validate(&self.schemas.root, &kind_schema, &params_value, path);
        if !errors.is_empty() {
            self.schema_errors(errors, &context);
            return None;
        }
        let common = common?;
        if unknown {
            return None;
        }
        let spec = match (kind.parse)(params_value) {
            Ok(spec) => spec,
            Err(err) => {
                self.error(path, format!("{context}: {err}"), "this stage");
                return None;
            }
        };
        let field_errors = spec.check();
        self.field_errors(path, field_errors, &context);
        let inputs = spec
            .inputs()
            .into_iter()
            .map(|field| {
                let mut full = path.clone();
                full.0.extend(field.path.0.iter().cloned());
                Input {
                    field,
                    target: Target::Path(PathBuf::new()),
                    path: full,
                }
            })
            .collect();
        let resources = common.resources.clone().unwrap_or_default();
        self.resource_errors(&resources, &path.key("resources"), &context);
        let after = common
            .after
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), path.key("after").index(i)))
            .collect();
        // The recipe's precision does not reach kinds that compute in none (so switching a
        // recipe to bf16 does not rebuild its tokenizer), and their own would mean nothing.
        let computes = crate::kinds::computes_in_a_precision(spec.kind());
        if !computes && common.precision.is_some_and(|p| p != Precision::Fp32) {
            self.error(
                &path.key("precision"),
                format!(
                    "{context}: `{}` stages compute in no precision; remove `precision`",
                    spec.kind()
                ),
                "here",
            );
        }
        let precision = match computes {
            true => common.precision.unwrap_or(meta.precision),
            false => Precision::Fp32,
        };
        Some(Stage {
            spec,
            inputs,
            after,
            seed: common.seed.unwrap_or(meta.seed),
            backend: common.backend.unwrap_or(meta.backend),
            precision,
            description: common.description,
            resources,
        })
    }

    /// Resource values that Slurm would refuse, located at the value.
    fn resource_errors(&mut self, resources: &Resources, path: &ValuePath, context: &str) {
        for (field, index, message) in resources.check() {
            let mut at = path.key(field);
            if let Some(i) = index {
                at = at.index(i);
            }
            self.error(&at, format!("{context}: {message}"), "here");
        }
    }

    /// Resolve every reference: to a node (checking what it produces) or, where allowed, a file.
    fn resolve(&mut self, recipe: &mut Recipe) {
        let produces: HashMap<String, Produces> = recipe
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.produces()))
            .collect();
        let names: Vec<String> = recipe.nodes.iter().map(|n| n.name.clone()).collect();
        let dir = recipe.dir.clone();
        for node in &mut recipe.nodes {
            let owner = node.name.clone();
            let inputs: Vec<&mut Input> = match &mut node.body {
                NodeBody::Stage(stage) => stage.inputs.iter_mut().collect(),
                NodeBody::Model(model) => model.tokenizer.iter_mut().collect(),
                NodeBody::Dataset(_) => Vec::new(),
            };
            for input in inputs {
                match self.resolve_one(&input.field, &input.path, &owner, &produces, &names, &dir) {
                    Some(target) => input.target = target,
                    None => continue,
                }
            }
            if let NodeBody::Stage(stage) = &node.body {
                for (target, path) in &stage.after {
                    if !produces.contains_key(target) {
                        self.dangling(path, target, &names);
                    } else if *target == owner {
                        self.error(
                            path,
                            format!("stage `{owner}` cannot come after itself"),
                            "here",
                        );
                    }
                }
            }
        }
    }

    fn resolve_one(
        &mut self,
        field: &InputField,
        path: &ValuePath,
        owner: &str,
        produces: &HashMap<String, Produces>,
        names: &[String],
        dir: &Path,
    ) -> Option<Target> {
        let (name, output) = match field.target.split_once('.') {
            Some((name, output)) if produces.contains_key(name) => (name, Some(output)),
            _ => (field.target.as_str(), None),
        };
        let Some(produced) = produces.get(name) else {
            if field.may_be_path {
                let file = dir.join(&field.target);
                return Some(Target::Path(file));
            }
            self.dangling(path, &field.target, names);
            return None;
        };
        if name == owner {
            self.error(path, format!("`{owner}` cannot read itself"), "here");
            return None;
        }
        if let Some(output) = output {
            let outputs = produced.outputs();
            if !outputs.iter().any(|(o, _)| o == output) {
                let available: Vec<&str> = outputs.iter().map(|(o, _)| o.as_str()).collect();
                let help = did_you_mean(output, available.iter().copied()).or_else(|| {
                    Some(if available.is_empty() {
                        format!("`{name}` has no named outputs")
                    } else {
                        format!("outputs of `{name}`: {}", available.join(", "))
                    })
                });
                let loc = self.spans.value(path);
                self.errors.push(
                    Diagnostic::new(format!("`{name}` has no output `{output}`"))
                        .with_optional_label(loc, "here")
                        .with_optional_help(help),
                );
                return None;
            }
        }
        if !produced.satisfies(field.expect) {
            self.error(
                path,
                format!(
                    "`{}` must be {}, but `{name}` produces {}",
                    field.role,
                    field.expect,
                    produced.describe()
                ),
                "here",
            );
            return None;
        }
        Some(Target::Node {
            name: name.to_owned(),
            output: output.map(str::to_owned),
        })
    }

    fn dangling(&mut self, path: &ValuePath, target: &str, names: &[String]) {
        let loc = self.spans.value(path);
        let help = did_you_mean(target, names.iter().map(String::as_str));
        self.errors.push(
            Diagnostic::new(format!("reference to unknown node `{target}`"))
                .with_optional_label(loc, "no node has this name")
                .with_optional_help(help),
        );
    }
}

/// Whether a key someone put in a remote's table is a secret (which never belongs in a file).
fn looks_like_a_credential(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "secret",
        "key",
        "token",
        "password",
        "credential",
        "sas",
        "signature",
    ]
    .iter()
    .any(|word| key.contains(word))
}
