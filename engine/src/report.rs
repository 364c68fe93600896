//! What `rudder report` shows, gathered from the recipe, its plan, the store and the run
//! records: every node with its state, key, timings and size; each stage's resolved parameters
//! against its kind's defaults; the curves of every metric its artifact logged
//! (`metrics.jsonl`, iterative DPO's `rounds.jsonl`), stages of one kind overlaid on one chart;
//! evaluation tables with a sample of completions; and, against another run (a lockfile or a
//! recipe), what changed parameter by parameter and metric by metric.
//!
//! This module only gathers and compares: it returns a typed model. Drawing it (HTML, SVG,
//! text) is the command line's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use petgraph::visit::EdgeRef;
use rudder_schema::NodeBody;
use rudder_schema::kinds::kind_info;
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::EngineError;
use crate::graph::{EdgeKind, Source};
use crate::key::canonical_params;
use crate::live::{self, RunRecord};
use crate::lockfile::LockEntry;
use crate::plan::{Plan, Reason, State, diff_values};
use crate::project::Project;
use crate::store::{FileEntry, Store};

/// Completions shown per evaluation: the first sample of this many prompts, for every model.
pub const SAMPLE_PROMPTS: usize = 5;

/// Logged fields that are coordinates, not metrics.
const COORDINATES: &[&str] = &["step", "epoch", "round"];

/// Metrics shown first, in this order; the rest follow alphabetically.
const FIRST_METRICS: &[&str] = &["score", "loss", "learning_rate", "grad_norm"];

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The recipe's name.
    pub recipe: String,
    pub file: PathBuf,
    pub store: PathBuf,
    /// Every vertex of the graph, in topological order.
    pub nodes: Vec<NodeReport>,
    pub edges: Vec<Edge>,
    /// One chart per (kind, metric): every stage of that kind that logged the metric.
    pub charts: Vec<Chart>,
    pub evaluations: Vec<Evaluation>,
    /// The newest finished run of the recipe on this store.
    pub last_run: Option<RunRecord>,
    /// Bytes of the recipe's artifacts in the store, each artifact counted once.
    pub store_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    /// `dataset`, `model`, a stage kind, or a part's kind (`dpo/ref_logps`).
    pub kind: String,
    pub key: String,
    pub state: NodeState,
    /// Why it would run (when it is not built).
    pub reasons: Vec<String>,
    /// Whether the recipe's last finished run built it.
    pub ran_last: bool,
    pub is_part: bool,
    /// `(role, node or file)`.
    pub inputs: Vec<(String, String)>,
    /// Stages and parts: every parameter (references excluded, they are `inputs`).
    pub params: Vec<Param>,
    pub seed: Option<u64>,
    pub backend: Option<String>,
    pub precision: Option<String>,
    pub built: Option<Built>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// A dataset or a model directory: read, never built.
    Source,
    /// Its artifact is in the store.
    Built,
    /// `rudder run` would build it.
    NotBuilt,
}

#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub started: String,
    pub seconds: f64,
    /// Sum of the artifact's file sizes.
    pub bytes: u64,
    pub files: Vec<FileEntry>,
    pub summary: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Param {
    pub name: String,
    pub value: Value,
    /// The kind's default (`None` for parts, whose parameters have no defaults of their own).
    pub default: Option<Value>,
    pub origin: Origin,
}

impl Param {
    /// Whether the value is not the kind's default (false when there is no default to compare).
    pub fn differs(&self) -> bool {
        self.default.as_ref().is_some_and(|d| d != &self.value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Recipe,
    /// `--set`.
    Override,
    Default,
}

#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// Indices into [`Report::nodes`].
    pub from: usize,
    pub to: usize,
    /// The input's role, or `after` for an ordering-only edge.
    pub role: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// The stage kind whose stages it overlays (`dpo`), or `iterative_dpo rounds`.
    pub group: String,
    pub metric: String,
    /// What x is: `step` or `round`.
    pub x: String,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub node: String,
    /// `(x, y)`, finite values only, in the order logged.
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub node: String,
    /// `eval.json`'s `judge`, `baseline`, `reference`.
    pub judge: Option<String>,
    pub baseline: Option<String>,
    pub reference: Option<String>,
    /// Metric names, in `eval.json`'s order.
    pub columns: Vec<String>,
    /// Per model: its metrics.
    pub rows: Vec<(String, BTreeMap<String, f64>)>,
    pub samples: Vec<SamplePrompt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SamplePrompt {
    pub prompt: String,
    /// Per model, in the table's order: the first sample's completion and its score.
    pub completions: Vec<SampleCompletion>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleCompletion {
    pub model: String,
    pub completion: String,
    pub score: Option<f64>,
    pub finish_reason: Option<String>,
}

/// Gathers the report of a planned project.
pub fn gather(project: &Project, plan: &Plan) -> Result<Report, EngineError> {
    let recipe = &project.recipe;
    let graph = &project.graph;
    let store = &project.store;
    let status = live::status(store, &recipe.file)?;
    let ran_last: BTreeSet<String> = status
        .last
        .iter()
        .flat_map(|r| r.ran.iter().filter_map(|s| s.key.clone()))
        .collect();
    let position: BTreeMap<_, usize> = plan
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.index, i))
        .collect();
    let mut nodes = Vec::with_capacity(plan.entries.len());
    let mut logs: Vec<(usize, Logged)> = Vec::new();
    let mut evaluations = Vec::new();
    let mut counted: BTreeSet<String> = BTreeSet::new();
    let mut store_bytes = 0;
    for (i, entry) in plan.entries.iter().enumerate() {
        let vertex = graph.vertex(entry.index);
        let node = &recipe.nodes[vertex.node];
        let keyed = &plan.keyed[&entry.index];
        let manifest = if entry.is_source {
            None
        } else {
            store.manifest(&entry.key)?
        };
        let state = match (entry.is_source, &manifest) {
            (true, _) => NodeState::Source,
            (false, Some(_)) => NodeState::Built,
            (false, None) => NodeState::NotBuilt,
        };
        let inputs = vertex
            .inputs
            .iter()
            .map(|input| {
                let from = match &input.source {
                    Source::Vertex { index, output } => {
                        let name = &graph.vertex(*index).name;
                        output
                            .as_ref()
                            .map_or(name.clone(), |o| format!("{name}.{o}"))
                    }
                    Source::File(path) => path.display().to_string(),
                };
                (input.role.clone(), from)
            })
            .chain(
                vertex
                    .after
                    .iter()
                    .map(|&a| ("after".to_owned(), graph.vertex(a).name.clone())),
            )
            .collect();
        let (params, seed, backend, precision) = match &node.body {
            NodeBody::Stage(stage) => {
                let params = match &vertex.part {
                    Some(part) => plain_params(&part.params),
                    None => stage_params(project, vertex.node, &keyed.entry.params),
                };
                (
                    params,
                    Some(stage.seed),
                    Some(keyed.backend.as_str().to_owned()),
                    Some(stage.precision.as_str().to_owned()),
                )
            }
            _ => (Vec::new(), None, None, None),
        };
        let built = manifest.map(|m| Built {
            started: m.started.clone(),
            seconds: m.seconds,
            bytes: Store::size_of(&m),
            files: m.files.clone(),
            summary: m.summary.clone(),
        });
        if let Some(b) = &built
            && counted.insert(entry.key.to_hex())
        {
            store_bytes += b.bytes;
        }
        if built.is_some() {
            let dir = store.object_dir(&entry.key);
            logs.push((i, read_logged(&dir)));
            if entry.kind == "evaluate"
                && let Some(evaluation) = read_evaluation(&entry.name, &dir)
            {
                evaluations.push(evaluation);
            }
        }
        nodes.push(NodeReport {
            name: entry.name.clone(),
            kind: entry.kind.clone(),
            key: entry.key.to_hex(),
            state,
            reasons: match entry.state {
                State::Run | State::Remote => {
                    entry.reasons.iter().map(ToString::to_string).collect()
                }
                State::Cached => Vec::new(),
            },
            ran_last: ran_last.contains(&entry.key.to_hex()),
            is_part: vertex.is_part(),
            inputs,
            params,
            seed,
            backend,
            precision,
            built,
        });
    }
    let edges = graph
        .graph
        .edge_references()
        .filter_map(|edge| {
            let (from, to) = (edge.source(), edge.target());
            let role = match edge.weight() {
                EdgeKind::Order => "after".to_owned(),
                EdgeKind::Data => graph
                    .vertex(to)
                    .inputs
                    .iter()
                    .filter(|i| matches!(i.source, Source::Vertex { index, .. } if index == from))
                    .map(|i| i.role.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            Some(Edge {
                from: *position.get(&from)?,
                to: *position.get(&to)?,
                role,
            })
        })
        .collect();
    let charts = charts(&nodes, &logs);
    Ok(Report {
        recipe: recipe.name.clone(),
        file: recipe.file.clone(),
        store: store.root().to_path_buf(),
        nodes,
        edges,
        charts,
        evaluations,
        last_run: status.last,
        store_bytes,
    })
}

/// A stage's parameters with the kind's defaults and where each value came from.
fn stage_params(project: &Project, node_index: usize, params: &Value) -> Vec<Param> {
    let node = &project.recipe.nodes[node_index];
    let NodeBody::Stage(stage) = &node.body else {
        return Vec::new();
    };
    // References are the node's inputs; a field holding them is not a setting.
    let references: BTreeSet<String> = stage
        .spec
        .inputs()
        .iter()
        .filter_map(|input| match input.path.0.first() {
            Some(rudder_schema::Seg::Key(k)) => Some(k.clone()),
            _ => None,
        })
        .collect();
    let defaults = kind_defaults(stage.spec.kind());
    let Value::Object(map) = params else {
        return Vec::new();
    };
    map.iter()
        .filter(|(name, _)| !references.contains(*name))
        .map(|(name, value)| Param {
            name: name.clone(),
            value: value.clone(),
            default: defaults.as_ref().and_then(|d| d.get(name).cloned()),
            origin: match project.recipe.spans.get(&node.path.key(name)) {
                Some(spans) if spans.value.source == 0 => Origin::Recipe,
                Some(_) => Origin::Override,
                None => Origin::Default,
            },
        })
        .collect()
}

/// The parameters of a kind left at its defaults, as the lockfile records parameters.
pub fn kind_defaults(kind: &str) -> Option<Value> {
    let info = kind_info(kind)?;
    // Every kind's struct defaults every field, so an empty table parses (the schema, not the
    // struct, is what requires fields).
    let spec = (info.parse)(json!({})).ok()?;
    Some(canonical_params(&spec.params(), &[]))
}

fn plain_params(params: &Value) -> Vec<Param> {
    match canonical_params(params, &[]) {
        Value::Object(map) => map
            .into_iter()
            .map(|(name, value)| Param {
                name,
                value,
                default: None,
                origin: Origin::Recipe,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What an artifact logged: `metrics.jsonl` by step, `rounds.jsonl` by round.
#[derive(Default)]
struct Logged {
    steps: BTreeMap<String, Vec<(f64, f64)>>,
    rounds: BTreeMap<String, Vec<(f64, f64)>>,
}

fn read_logged(dir: &Path) -> Logged {
    Logged {
        steps: read_series(&dir.join("metrics.jsonl"), "step"),
        rounds: read_series(&dir.join("rounds.jsonl"), "round"),
    }
}

/// Every numeric field of a JSONL file over the field `x`; unreadable lines are skipped (a
/// file of a stage that died mid-line).
fn read_series(path: &Path, x: &str) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return series;
    };
    for line in text.lines() {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(at) = fields.get(x).and_then(Value::as_f64) else {
            continue;
        };
        for (name, value) in &fields {
            if COORDINATES.contains(&name.as_str()) {
                continue;
            }
            if let Some(v) = value.as_f64().filter(|v| v.is_finite()) {
                series.entry(name.clone()).or_default().push((at, v));
            }
        }
    }
    series
}

/// One chart per (kind, metric), each with a series per stage of that kind. Parts chart with
/// their stage's kind (`idpo/round-2` beside `idpo`).
fn charts(nodes: &[NodeReport], logs: &[(usize, Logged)]) -> Vec<Chart> {
    let mut groups: Vec<String> = Vec::new();
    let mut by_chart: BTreeMap<(usize, bool, String), Vec<Series>> = BTreeMap::new();
    for (i, logged) in logs {
        let node = &nodes[*i];
        let group = node.kind.split('/').next().unwrap_or(&node.kind).to_owned();
        let g = match groups.iter().position(|x| *x == group) {
            Some(g) => g,
            None => {
                groups.push(group);
                groups.len() - 1
            }
        };
        for (metric, points) in &logged.steps {
            by_chart
                .entry((g, false, metric.clone()))
                .or_default()
                .push(Series {
                    node: node.name.clone(),
                    points: points.clone(),
                });
        }
        // Each round's `rounds.jsonl` repeats the rounds before it: one series per stage, from
        // the artifact that has the most rounds (the stage itself once it is built).
        let stage = node.name.split('/').next().unwrap_or(&node.name);
        for (metric, points) in &logged.rounds {
            let charted = by_chart.entry((g, true, metric.clone())).or_default();
            let series = Series {
                node: stage.to_owned(),
                points: points.clone(),
            };
            match charted.iter_mut().find(|s| s.node == stage) {
                Some(old) if old.points.len() < points.len() => *old = series,
                Some(_) => {}
                None => charted.push(series),
            }
        }
    }
    let rank = |metric: &str| {
        FIRST_METRICS
            .iter()
            .position(|m| *m == metric)
            .unwrap_or(FIRST_METRICS.len())
    };
    let mut keys: Vec<&(usize, bool, String)> = by_chart.keys().collect();
    keys.sort_by(|a, b| (a.0, a.1, rank(&a.2), &a.2).cmp(&(b.0, b.1, rank(&b.2), &b.2)));
    keys.into_iter()
        .map(|key| {
            let (g, rounds, metric) = key;
            Chart {
                group: if *rounds {
                    format!("{} rounds", groups[*g])
                } else {
                    groups[*g].clone()
                },
                metric: metric.clone(),
                x: if *rounds { "round" } else { "step" }.into(),
                series: by_chart[key].clone(),
            }
        })
        .collect()
}

fn read_evaluation(node: &str, dir: &Path) -> Option<Evaluation> {
    let eval: Value = serde_json::from_slice(&std::fs::read(dir.join("eval.json")).ok()?).ok()?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for model in eval["models"].as_array()? {
        let name = text(&model["model"])?;
        let mut metrics = BTreeMap::new();
        for (metric, value) in model.as_object()? {
            if matches!(metric.as_str(), "model" | "role" | "samples") {
                continue;
            }
            if let Some(v) = value.as_f64() {
                if !columns.contains(metric) {
                    columns.push(metric.clone());
                }
                metrics.insert(metric.clone(), v);
            }
        }
        rows.push((name, metrics));
    }
    let samples = read_samples(&dir.join("samples.jsonl"), &rows);
    Some(Evaluation {
        node: node.to_owned(),
        judge: text(&eval["judge"]),
        baseline: text(&eval["baseline"]),
        reference: text(&eval["reference"]),
        columns,
        rows,
        samples,
    })
}

/// The first sample of the first [`SAMPLE_PROMPTS`] prompts, each model's side by side.
fn read_samples(path: &Path, rows: &[(String, BTreeMap<String, f64>)]) -> Vec<SamplePrompt> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut prompts: BTreeMap<u64, (String, BTreeMap<String, SampleCompletion>)> = BTreeMap::new();
    for line in text.lines() {
        let Ok(sample) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if sample["sample"].as_u64() != Some(0) {
            continue;
        }
        let (Some(row), Some(model), Some(prompt)) = (
            sample["row"].as_u64(),
            sample["model"].as_str(),
            sample["prompt"].as_str(),
        ) else {
            continue;
        };
        if !prompts.contains_key(&row) && prompts.len() >= SAMPLE_PROMPTS {
            continue;
        }
        prompts
            .entry(row)
            .or_insert_with(|| (prompt.to_owned(), BTreeMap::new()))
            .1
            .insert(
                model.to_owned(),
                SampleCompletion {
                    model: model.to_owned(),
                    completion: sample["completion"].as_str().unwrap_or("").to_owned(),
                    score: sample["score"].as_f64(),
                    finish_reason: sample["finish_reason"].as_str().map(str::to_owned),
                },
            );
    }
    prompts
        .into_values()
        .map(|(prompt, mut by_model)| SamplePrompt {
            prompt,
            completions: rows
                .iter()
                .filter_map(|(model, _)| by_model.remove(model))
                .collect(),
        })
        .collect()
}

/// What changed between another run (`old`) and this one.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What the other run is: a lockfile's or a recipe's path.
    pub other: String,
    pub nodes: Vec<NodeChange>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeChange {
    pub name: String,
    pub kind: String,
    pub change: Change,
    pub old_key: Option<String>,
    pub new_key: Option<String>,
    /// `name: old -> new`, as `rudder plan` says it.
    pub params: Vec<ParamChange>,
    /// Inputs whose key changed, added or removed, and changed dependency files.
    pub inputs: Vec<String>,
    /// Summary metrics of both artifacts, where the store has them.
    pub metrics: Vec<MetricChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Same,
    Changed,
    Added,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamChange {
    pub name: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricChange {
    pub name: String,
    pub old: Option<f64>,
    pub new: Option<f64>,
}

impl MetricChange {
    pub fn delta(&self) -> Option<f64> {
        Some(self.new? - self.old?)
    }
}

/// Compares the nodes of another run (`old`, a lockfile's entries or another recipe's plan,
/// whose artifacts are in `old_store`) with this plan's (`new`, artifacts in `new_store`).
/// Nodes are matched by name.
pub fn compare(
    other: &str,
    old: &[LockEntry],
    old_store: &Store,
    new: &[LockEntry],
    new_store: &Store,
) -> Result<Comparison, EngineError> {
    let summary = |store: &Store, key: Option<&str>| -> Result<_, EngineError> {
        match key.and_then(crate::Key::from_hex) {
            Some(k) => Ok(store.manifest(&k)?.map(|m| m.summary)),
            None => Ok(None),
        }
    };
    let mut nodes = Vec::new();
    let mut names: Vec<&str> = new.iter().map(|e| e.name.as_str()).collect();
    names.extend(
        old.iter()
            .map(|e| e.name.as_str())
            .filter(|n| !new.iter().any(|e| e.name == *n)),
    );
    for name in names {
        let o = old.iter().find(|e| e.name == name);
        let n = new.iter().find(|e| e.name == name);
        let change = match (o, n) {
            (Some(o), Some(n)) if o.key == n.key => Change::Same,
            (Some(_), Some(_)) => Change::Changed,
            (None, _) => Change::Added,
            (_, None) => Change::Removed,
        };
        let mut params = Vec::new();
        let mut inputs = Vec::new();
        if let (Some(o), Some(n)) = (o, n) {
            let mut reasons = Vec::new();
            diff_values("", &o.params, &n.params, &mut reasons);
            let scalar = |name: &str, a: Option<String>, b: Option<String>| {
                (a != b).then(|| Reason::Param {
                    name: name.into(),
                    old: a,
                    new: b,
                })
            };
            reasons.extend(scalar(
                "seed",
                o.seed.map(|s| s.to_string()),
                n.seed.map(|s| s.to_string()),
            ));
            reasons.extend(scalar("backend", o.backend.clone(), n.backend.clone()));
            reasons.extend(scalar(
                "precision",
                o.precision.clone(),
                n.precision.clone(),
            ));
            reasons.extend(scalar(
                "implementation",
                o.implementation.map(|v| format!("v{v}")),
                n.implementation.map(|v| format!("v{v}")),
            ));
            for reason in reasons {
                if let Reason::Param { name, old, new } = reason {
                    params.push(ParamChange { name, old, new });
                }
            }
            for (role, key) in &n.inputs {
                match o.inputs.get(role) {
                    Some(old_key) if old_key == key => {}
                    Some(old_key) => inputs.push(format!(
                        "input {role}: {} -> {}",
                        short(old_key),
                        short(key)
                    )),
                    None => inputs.push(format!("input {role} added")),
                }
            }
            for role in o.inputs.keys().filter(|r| !n.inputs.contains_key(*r)) {
                inputs.push(format!("input {role} removed"));
            }
            for (path, digest) in &n.deps {
                if o.deps.get(path) != Some(digest) {
                    inputs.push(format!("dependency {path} changed"));
                }
            }
            if (o.kind == "dataset" || o.kind == "model") && o.outputs != n.outputs {
                inputs.push("content changed".into());
            }
        }
        let old_summary = summary(old_store, o.map(|e| e.key.as_str()))?;
        let new_summary = summary(new_store, n.map(|e| e.key.as_str()))?;
        let mut metric_names: Vec<String> = Vec::new();
        for s in [&new_summary, &old_summary].into_iter().flatten() {
            for k in s.keys() {
                if !metric_names.contains(k) {
                    metric_names.push(k.clone());
                }
            }
        }
        metric_names.sort();
        let metrics = metric_names
            .into_iter()
            .map(|name| MetricChange {
                old: old_summary.as_ref().and_then(|s| s.get(&name).copied()),
                new: new_summary.as_ref().and_then(|s| s.get(&name).copied()),
                name,
            })
            .collect();
        nodes.push(NodeChange {
            name: name.to_owned(),
            kind: n.or(o).map(|e| e.kind.clone()).unwrap_or_default(),
            change,
            old_key: o.map(|e| e.key.clone()),
            new_key: n.map(|e| e.key.clone()),
            params,
            inputs,
            metrics,
        });
    }
    Ok(Comparison {
        other: other.to_owned(),
        nodes,
    })
}

/// The other side of a comparison and the store holding its artifacts: a recipe (`.toml`),
/// planned now, with its own store (or `store_override`); or a lockfile, whose artifacts are
/// looked for in `store`.
pub fn other_run(
    path: &Path,
    store: &Store,
    store_override: Option<PathBuf>,
    registry: &crate::Registry,
) -> Result<(Vec<LockEntry>, Store), EngineError> {
    if path.extension().is_some_and(|e| e == "toml") {
        let other = Project::open(path, &[], store_override)?;
        let plan = other.plan(registry, &crate::Selection::default(), None)?;
        let entries = plan_entries(&other, &plan);
        return Ok((entries, other.store));
    }
    if !path.is_file() {
        return Err(EngineError::Usage(format!(
            "{} is neither a recipe (.toml) nor an existing lockfile",
            path.display()
        )));
    }
    let lock = crate::lockfile::Lockfile::read(path)?;
    Ok((lock.nodes, store.clone()))
}

/// This plan's nodes as lockfile entries (what the lockfile would record after a run).
pub fn plan_entries(project: &Project, plan: &Plan) -> Vec<LockEntry> {
    project
        .graph
        .order
        .iter()
        .map(|index| plan.keyed[index].entry.clone())
        .collect()
}

fn short(key: &str) -> &str {
    let key = key.split('/').next().unwrap_or(key);
    &key[..12.min(key.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn every_kind_has_defaults_to_compare_with() {
        for kind in rudder_schema::KINDS {
            let defaults = kind_defaults(kind.name)
                .unwrap_or_else(|| panic!("{} parses from an empty table", kind.name));
            assert!(defaults.is_object(), "{}", kind.name);
        }
        let dpo = kind_defaults("dpo").unwrap();
        assert_eq!(dpo["beta"], 0.1);
        assert_eq!(dpo["loss_type"], "sigmoid");
        // Unset optional parameters are absent, as in lockfiles.
        assert!(dpo.get("max_steps").is_none());
        assert!(kind_defaults("no_such_kind").is_none());
    }

    #[test]
    fn a_param_differs_only_from_a_default_it_has() {
        let param = |value: Value, default: Option<Value>| Param {
            name: "beta".into(),
            value,
            default,
            origin: Origin::Recipe,
        };
        assert!(param(json!(0.2), Some(json!(0.1))).differs());
        assert!(!param(json!(0.1), Some(json!(0.1))).differs());
        assert!(!param(json!(0.1), None).differs());
    }

    #[test]
    fn series_skip_coordinates_non_finite_values_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"epoch\":0.5,\"loss\":2.0,\"rewards/chosen\":0.1}\n\
             {\"step\":2,\"epoch\":1.0,\"loss\":null,\"rewards/chosen\":0.3}\n\
             {\"step\":3,\"lo",
        )
        .unwrap();
        let series = read_series(&path, "step");
        assert_eq!(
            series.keys().collect::<Vec<_>>(),
            ["loss", "rewards/chosen"]
        );
        assert_eq!(series["loss"], [(1.0, 2.0)]);
        assert_eq!(series["rewards/chosen"], [(1.0, 0.1), (2.0, 0.3)]);
    }

    fn node(name: &str, kind: &str) -> NodeReport {
        NodeReport {
            name: name.into(),
            kind: kind.into(),
            key: String::new(),
            state: NodeState::Built,
            reasons: Vec::new(),
            ran_last: false,
            is_part: kind.contains('/'),
            inputs: Vec::new(),
            params: Vec::new(),
            seed: None,
            backend: None,
            precision: None,
            built: None,
        }
    }

    fn logged(metrics: &[&str]) -> Logged {
        Logged {
            steps: metrics
                .iter()
                .map(|m| (m.to_string(), vec![(1.0, 1.0), (2.0, 0.5)]))
                .collect(),
            rounds: BTreeMap::new(),
        }
    }

    #[test]
    fn stages_of_one_kind_share_a_chart_per_metric() {
        let nodes = [
            node("sft", "sft"),
            node("sigmoid", "dpo"),
            node("ipo", "dpo"),
            node("idpo/round-1", "iterative_dpo/round"),
            node("idpo", "iterative_dpo"),
        ];
        let logs = vec![
            (0, logged(&["mean_token_accuracy", "loss"])),
            (1, logged(&["rewards/margins", "loss", "grad_norm"])),
            (2, logged(&["loss", "rewards/margins", "grad_norm"])),
            (
                3,
                Logged {
                    rounds: [("score".to_string(), vec![(1.0, 0.2)])].into(),
                    ..logged(&["loss"])
                },
            ),
            (
                4,
                Logged {
                    rounds: [("score".to_string(), vec![(1.0, 0.2), (2.0, 0.6)])].into(),
                    ..logged(&["loss"])
                },
            ),
        ];
        let charts = charts(&nodes, &logs);
        let shown: Vec<(String, String, Vec<String>)> = charts
            .iter()
            .map(|c| {
                (
                    c.group.clone(),
                    c.metric.clone(),
                    c.series.iter().map(|s| s.node.clone()).collect(),
                )
            })
            .collect();
        let s = |x: &str| x.to_owned();
        assert_eq!(
            shown,
            [
                (s("sft"), s("loss"), vec![s("sft")]),
                (s("sft"), s("mean_token_accuracy"), vec![s("sft")]),
                (s("dpo"), s("loss"), vec![s("sigmoid"), s("ipo")]),
                (s("dpo"), s("grad_norm"), vec![s("sigmoid"), s("ipo")]),
                (s("dpo"), s("rewards/margins"), vec![s("sigmoid"), s("ipo")]),
                (
                    s("iterative_dpo"),
                    s("loss"),
                    vec![s("idpo/round-1"), s("idpo")]
                ),
                (s("iterative_dpo rounds"), s("score"), vec![s("idpo")]),
            ]
        );
        // The stage's rounds.jsonl holds every round: the round's own is not charted again.
        let rounds = charts.last().unwrap();
        assert_eq!(rounds.x, "round");
        assert_eq!(rounds.series[0].points.len(), 2);
    }

    fn entry(name: &str, key: &str, params: Value, inputs: &[(&str, &str)]) -> LockEntry {
        LockEntry {
            name: name.into(),
            kind: "dpo".into(),
            key: key.into(),
            implementation: Some(1),
            seed: Some(1),
            backend: Some("cpu".into()),
            precision: Some("fp32".into()),
            params,
            inputs: inputs
                .iter()
                .map(|(r, k)| (r.to_string(), k.to_string()))
                .collect(),
            deps: BTreeMap::new(),
            outputs: BTreeMap::new(),
        }
    }

    #[test]
    fn a_comparison_names_each_changed_parameter_input_and_metric() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join(".rudder"));
        store.init().unwrap();
        let key = |s: &str| crate::key::KeyBuilder::new("test").str(s).finish();
        let (old_key, new_key) = (key("old"), key("new"));
        for (k, loss) in [(old_key, 0.6), (new_key, 0.4)] {
            let pending = store.begin(&k).unwrap();
            let manifest = crate::store::Manifest {
                layout: crate::store::LAYOUT_VERSION,
                key: k.to_hex(),
                kind: "dpo".into(),
                name: "dpo".into(),
                implementation_version: 1,
                params: Value::Null,
                inputs: BTreeMap::new(),
                seed: 1,
                backend: "cpu".into(),
                precision: "fp32".into(),
                files: Vec::new(),
                summary: [("loss".to_string(), loss)].into(),
                sandbox: None,
                rudder_version: "test".into(),
                started: String::new(),
                seconds: 1.0,
                peak_memory: None,
            };
            store.commit(pending, &manifest).unwrap();
        }
        let old = [
            entry("sft", "s1", json!({"epochs": 2}), &[]),
            entry(
                "dpo",
                &old_key.to_hex(),
                json!({"beta": 0.1, "loss_type": "sigmoid"}),
                &[("model", "s1")],
            ),
            entry("gone", "g1", json!({}), &[]),
        ];
        let new = [
            entry("sft", "s1", json!({"epochs": 2}), &[]),
            entry(
                "dpo",
                &new_key.to_hex(),
                json!({"beta": 0.2, "loss_type": "sigmoid", "rpo_alpha": 1.0}),
                &[("model", "s2")],
            ),
            entry("kto", "k1", json!({}), &[]),
        ];
        let c = compare("old.lock", &old, &store, &new, &store).unwrap();
        let changes: Vec<(&str, Change)> = c
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.change))
            .collect();
        assert_eq!(
            changes,
            [
                ("sft", Change::Same),
                ("dpo", Change::Changed),
                ("kto", Change::Added),
                ("gone", Change::Removed)
            ]
        );
        let dpo = &c.nodes[1];
        assert_eq!(
            dpo.params,
            [
                ParamChange {
                    name: "beta".into(),
                    old: Some("0.1".into()),
                    new: Some("0.2".into())
                },
                ParamChange {
                    name: "rpo_alpha".into(),
                    old: None,
                    new: Some("1.0".into())
                },
            ]
        );
        assert_eq!(dpo.inputs, ["input model: s1 -> s2"]);
        assert_eq!(dpo.metrics.len(), 1);
        assert_eq!(
            (dpo.metrics[0].old, dpo.metrics[0].new),
            (Some(0.6), Some(0.4))
        );
        assert!((dpo.metrics[0].delta().unwrap() + 0.2).abs() < 1e-12);
        // Artifacts not in the store have no metrics to compare.
        assert!(c.nodes[2].metrics.is_empty());
    }
}
