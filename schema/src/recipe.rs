//! The recipe model: `[recipe]`, `[datasets.*]`, `[models.*]`, `[stages.*]`, loaded from TOML
//! with `--set` overrides, validated against the derived schema, with every reference resolved.
//!
//! Loading never stops at the first problem: all errors are collected with their locations.
//! Cycles are the engine's to find (it builds the graph), using [`Recipe::spans`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use schemars::SchemaGenerator;
use serde_json::Value;

use crate::diagnostic::{Diagnostic, Loc, RecipeErrors, did_you_mean};
use crate::kinds::{Expect, FieldError, InputField, KINDS, Produces, StageSpec, kind_info};
pub use crate::nodes::{
    Arch, Backend, DataFormat, DatasetSpec, ExecutorKind, ExecutorSpec, ModelSpec, Precision,
    RecipeMeta, RemoteCache, RemoteSpec, Resources, StageCommon, check_remote_url,
};
use crate::source::{Sources, SpanMap, Spans, ValuePath, parse_override_value, parse_toml};
use crate::validate::{SchemaError, validate};

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

fn apply_override(
    tree: &mut Value,
    sources: &mut Sources,
    spans: &mut SpanMap,
    raw: &str,
) -> Result<Override, Diagnostic> {
    let source = sources.add("--set", raw);
    let Some((key, value_text)) = raw.split_once('=') else {
        return Err(Diagnostic::new("`--set` takes KEY=VALUE")
            .with_label(Loc::new(source, 0..raw.len()), "no `=` here")
            .with_help("for example: --set stages.dpo.beta=0.2"));
    };
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(Diagnostic::new(format!("invalid key `{key}` in `--set`"))
            .with_label(Loc::new(source, 0..key.len()), "here"));
    }
    let value = parse_override_value(value_text.trim());
    let (last, parents) = segments
        .split_last()
        .expect("split yields at least one segment");
    let mut node = &mut *tree;
    for (i, segment) in parents.iter().enumerate() {
        let Value::Object(map) = node else {
            return Err(not_a_table(key, &segments[..i], source));
        };
        node = map
            .entry((*segment).to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    let Value::Object(map) = node else {
        return Err(not_a_table(key, parents, source));
    };
    map.insert((*last).to_owned(), value.clone());
    let path = segments.iter().fold(ValuePath::root(), |p, s| p.key(s));
    spans.insert(
        path,
        Spans {
            key: Some(Loc::new(source, 0..key.len())),
            value: Loc::new(source, key.len() + 1..raw.len()),
        },
    );
    Ok(Override {
        key: key.to_owned(),
        value,
    })
}

fn not_a_table(key: &str, prefix: &[&str], source: usize) -> Diagnostic {
    Diagnostic::new(format!(
        "`--set {key}`: `{}` is not a table",
        prefix.join(".")
    ))
    .with_label(Loc::new(source, 0..key.len()), "here")
}

/// Derived JSON Schemas of the node tables, computed once.
pub(crate) struct Schemas {
    /// Holds `$defs` for `$ref` resolution.
    pub root: Value,
    pub meta: Value,
    pub executor: Value,
    pub remote: Value,
    pub dataset: Value,
    pub model: Value,
    pub common: Value,
    pub kinds: HashMap<&'static str, Value>,
}

pub(crate) fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut generator = SchemaGenerator::new(schemars::generate::SchemaSettings::draft07());
        let meta = generator.subschema_for::<RecipeMeta>().to_value();
        let executor = generator.subschema_for::<ExecutorSpec>().to_value();
        let remote = generator.subschema_for::<RemoteSpec>().to_value();
        let dataset = generator.subschema_for::<DatasetSpec>().to_value();
        let model = generator.subschema_for::<ModelSpec>().to_value();
        let common = generator.subschema_for::<StageCommon>().to_value();
        let kinds: HashMap<&'static str, Value> = KINDS
            .iter()
            .map(|k| (k.name, (k.schema)(&mut generator).to_value()))
            .collect();
        let mut definitions: serde_json::Map<String, Value> =
            generator.take_definitions(true).into_iter().collect();
        for kind in KINDS {
            mark_required(&mut definitions, &kinds[kind.name], kind.required);
        }
        Schemas {
            root: serde_json::json!({ "definitions": definitions }),
            meta,
            executor,
            remote,
            dataset,
            model,
            common,
            kinds,
        }
    })
}

/// Mark a kind's required fields, and drop their placeholder defaults from its definition.
fn mark_required(
    definitions: &mut serde_json::Map<String, Value>,
    reference: &Value,
    required: &[&str],
) {
    let Some(name) = reference
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/definitions/"))
    else {
        return;
    };
    let Some(Value::Object(definition)) = definitions.get_mut(name) else {
        return;
    };
    if let Some(Value::Object(properties)) = definition.get_mut("properties") {
        for field in required {
            if let Some(Value::Object(property)) = properties.get_mut(*field) {
                property.remove("default");
            }
        }
    }
    definition.insert("required".into(), serde_json::json!(required));
}

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

    fn recipe(
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
        Some(Stage {
            spec,
            inputs,
            after,
            seed: common.seed.unwrap_or(meta.seed),
            backend: common.backend.unwrap_or(meta.backend),
            precision: common.precision.unwrap_or(meta.precision),
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

/// Every property name a schema accepts at its top level, following `$ref` and `allOf`.
fn property_names(root: &Value, schema: &Value) -> Vec<String> {
    let mut schema = schema;
    while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        match root.pointer(reference.trim_start_matches('#')) {
            Some(target) => schema = target,
            None => break,
        }
    }
    let mut names: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            names.extend(property_names(root, sub));
        }
    }
    names
}
