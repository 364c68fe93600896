//! The pipeline as a graph: one vertex per dataset, model, stage and internal part, one edge
//! per reference (data flows along it) or `after` entry (ordering only).
//!
//! ```text
//!   prefs ──data──┐
//!   base ──model──► sft ──model──► dpo/ref_logps ──► dpo
//!   prefs ─────────────────data──► dpo/ref_logps
//! ```
//!
//! A stage kind may expand into internal parts (`dpo/ref_logps`, `idpo/round-2`); they are
//! vertices like any other, placed just before their stage. The order is topological with ties
//! broken by the order nodes were written, so that plans and lockfiles are stable.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use rudder_schema::kinds::{
    ADAPTER_BASE_ROLE, LoraArgs, PREVIOUS_ROUND_ROLE, PartInput, PartSpec, ROUND_PART,
    continues_adapter_of, continues_adapters, part_kind,
};
use rudder_schema::{Diagnostic, Node, NodeBody, Recipe, RecipeErrors, Target, ValuePath};

use crate::error::EngineError;

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Another vertex, optionally one of its named outputs.
    Vertex {
        index: NodeIndex,
        output: Option<String>,
    },
    /// A plain file (a tokenizer.json path, a principles file).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Input {
    pub role: String,
    pub source: Source,
    /// Where the reference was written, for error messages.
    pub path: Option<ValuePath>,
    /// A model node's `hf` directory without its `adapter` (the base that adapter was trained
    /// on, which a stage continuing the adapter reads).
    pub bare: bool,
}

/// One vertex of the graph.
#[derive(Debug, Clone)]
pub struct Vertex {
    /// `stage`, or `stage/part` for internal parts.
    pub name: String,
    /// Index of the recipe node it belongs to.
    pub node: usize,
    /// Set for internal parts.
    pub part: Option<PartSpec>,
    pub inputs: Vec<Input>,
    /// Ordering-only predecessors.
    pub after: Vec<NodeIndex>,
}

impl Vertex {
    pub fn is_part(&self) -> bool {
        self.part.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    Data,
    Order,
}

#[derive(Debug)]
pub struct Graph {
    pub graph: DiGraph<Vertex, EdgeKind>,
    /// Every vertex, topologically sorted.
    pub order: Vec<NodeIndex>,
    by_name: HashMap<String, NodeIndex>,
}

impl Graph {
    pub fn build(recipe: &Recipe) -> Result<Graph, EngineError> {
        let mut graph = DiGraph::new();
        let mut by_name = HashMap::new();
        // Vertices first (parts before their stage), so edges can refer to any of them.
        for (node_index, node) in recipe.nodes.iter().enumerate() {
            if let NodeBody::Stage(stage) = &node.body {
                for part in stage.spec.expand().parts {
                    let name = format!("{}/{}", node.name, part.name);
                    let index = graph.add_node(Vertex {
                        name: name.clone(),
                        node: node_index,
                        part: Some(part),
                        inputs: Vec::new(),
                        after: Vec::new(),
                    });
                    by_name.insert(name, index);
                }
            }
            let index = graph.add_node(Vertex {
                name: node.name.clone(),
                node: node_index,
                part: None,
                inputs: Vec::new(),
                after: Vec::new(),
            });
            by_name.insert(node.name.clone(), index);
        }
        let resolve = |target: &Target| match target {
            Target::Node { name, output } => Source::Vertex {
                index: by_name[name],
                output: output.clone(),
            },
            Target::Path(path) => Source::File(path.clone()),
        };
        let mut wiring: Vec<(NodeIndex, Vec<Input>, Vec<NodeIndex>)> = Vec::new();
        let mut lora_errors: Vec<Diagnostic> = Vec::new();
        for node in &recipe.nodes {
            let stage_index = by_name[&node.name];
            let own_inputs: Vec<Input> = node
                .inputs()
                .iter()
                .map(|input| Input {
                    role: input.field.role.clone(),
                    source: resolve(&input.target),
                    path: Some(input.path.clone()),
                    bare: false,
                })
                .collect();
            let NodeBody::Stage(stage) = &node.body else {
                wiring.push((stage_index, own_inputs, Vec::new()));
                continue;
            };
            let after: Vec<NodeIndex> = stage.after.iter().map(|(name, _)| by_name[name]).collect();
            let expansion = stage.spec.expand();
            let role_source = |role: &str| own_inputs.iter().find(|i| i.role == role).cloned();
            let continuation = match adapter_bases(recipe, node) {
                Ok(bases) => bases,
                Err(diagnostic) => {
                    lora_errors.push(diagnostic);
                    AdapterBases::default()
                }
            };
            let round_kind = part_kind(stage.spec.kind(), ROUND_PART);
            for part in &expansion.parts {
                let part_index = by_name[&format!("{}/{}", node.name, part.name)];
                let mut inputs: Vec<Input> = part
                    .inputs
                    .iter()
                    .filter_map(|(role, from)| match from {
                        PartInput::Role(stage_role) => role_source(stage_role).map(|i| Input {
                            role: role.clone(),
                            ..i
                        }),
                        PartInput::Part(sibling) => Some(Input {
                            role: role.clone(),
                            source: Source::Vertex {
                                index: by_name[&format!("{}/{}", node.name, sibling)],
                                output: None,
                            },
                            path: None,
                            bare: false,
                        }),
                    })
                    .collect();
                if part.kind == round_kind {
                    let later = part.inputs.iter().any(|(r, _)| r == PREVIOUS_ROUND_ROLE);
                    inputs.extend(continuation.input(later, &resolve));
                }
                wiring.push((part_index, inputs, after.clone()));
            }
            let mut inputs = own_inputs.clone();
            for (role, part) in &expansion.stage_inputs {
                inputs.push(Input {
                    role: role.clone(),
                    source: Source::Vertex {
                        index: by_name[&format!("{}/{}", node.name, part)],
                        output: None,
                    },
                    path: None,
                    bare: false,
                });
            }
            let later = expansion
                .stage_inputs
                .iter()
                .any(|(r, _)| r == PREVIOUS_ROUND_ROLE);
            inputs.extend(continuation.input(later, &resolve));
            wiring.push((stage_index, inputs, after));
        }
        if !lora_errors.is_empty() {
            return Err(RecipeErrors::new(recipe.sources.clone(), lora_errors).into());
        }
        for (index, inputs, after) in wiring {
            for input in &inputs {
                if let Source::Vertex { index: from, .. } = input.source {
                    graph.update_edge(from, index, EdgeKind::Data);
                }
            }
            for &from in &after {
                graph.update_edge(from, index, EdgeKind::Order);
            }
            let vertex = &mut graph[index];
            vertex.inputs = inputs;
            vertex.after = after;
        }
        let order =
            topological_order(&graph).map_err(|cycle| cycle_error(recipe, &graph, &cycle))?;
        Ok(Graph {
            graph,
            order,
            by_name,
        })
    }

    pub fn index(&self, name: &str) -> Option<NodeIndex> {
        self.by_name.get(name).copied()
    }

    pub fn vertex(&self, index: NodeIndex) -> &Vertex {
        &self.graph[index]
    }

    /// `index` and every vertex it depends on, transitively.
    pub fn ancestors(&self, index: NodeIndex) -> BTreeSet<NodeIndex> {
        self.closure(index, Direction::Incoming)
    }

    /// `index` and every vertex that depends on it, transitively.
    pub fn descendants(&self, index: NodeIndex) -> BTreeSet<NodeIndex> {
        self.closure(index, Direction::Outgoing)
    }

    fn closure(&self, start: NodeIndex, direction: Direction) -> BTreeSet<NodeIndex> {
        let mut seen = BTreeSet::from([start]);
        let mut stack = vec![start];
        while let Some(index) = stack.pop() {
            for next in self.graph.neighbors_directed(index, direction) {
                if seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// A stage's vertex and those of its internal parts.
    pub fn with_parts(&self, index: NodeIndex) -> Vec<NodeIndex> {
        let node = self.graph[index].node;
        self.order
            .iter()
            .copied()
            .filter(|&i| self.graph[i].node == node)
            .collect()
    }
}

/// The [`ADAPTER_BASE_ROLE`] input of a stage that continues an incoming adapter, with the
/// reference it resolves to.
#[derive(Clone)]
struct AdapterBase {
    input: Input,
    target: Target,
}

/// The adapter bases of a `lora` stage's training vertices: `first` for the stage (or its
/// first round) when it continues the adapter of its `model`, and `rounds` for the rounds of an
/// `iterative_dpo` stage after the first, which continue the previous round's adapter on the
/// base the first round trained on.
#[derive(Default)]
struct AdapterBases {
    first: Option<AdapterBase>,
    rounds: Option<AdapterBase>,
}

impl AdapterBases {
    /// The [`ADAPTER_BASE_ROLE`] input of a training vertex: of a round after the first when
    /// `later`.
    fn input(&self, later: bool, resolve: &impl Fn(&Target) -> Source) -> Option<Input> {
        let base = match later {
            true => self.rounds.as_ref(),
            false => self.first.as_ref(),
        }?;
        Some(Input {
            source: resolve(&base.target),
            ..base.input.clone()
        })
    }
}

/// [`AdapterBases`] of `node`. Also refuses `merge_adapter = true` where the `model` carries
/// no adapter to merge (it would silently mean nothing).
fn adapter_bases(recipe: &Recipe, node: &Node) -> Result<AdapterBases, Diagnostic> {
    let first = adapter_base(recipe, node, recipe.nodes.len())?;
    let NodeBody::Stage(stage) = &node.body else {
        return Ok(AdapterBases::default());
    };
    let Some(train) = stage.spec.train_args() else {
        return Ok(AdapterBases::default());
    };
    let model = node.inputs().iter().find(|i| i.field.role == "model");
    if train.merge_adapter
        && let Some(model) = model
        && let Target::Node { name, .. } = &model.target
        && let Some(from) = recipe.nodes.iter().find(|n| &n.name == name)
        && !carries_adapter(from)
    {
        let at = node.path.key("merge_adapter");
        return Err(Diagnostic::new(format!(
            "`merge_adapter = true` merges the LoRA adapter of the stage's model into its base, but `{}` carries no adapter ({}); remove `merge_adapter`",
            from.name,
            match &from.body {
                NodeBody::Model(_) => "a model node without `adapter`",
                _ => "a stage trained without `lora`",
            }
        ))
        .with_optional_label(recipe.loc(&at), "nothing to merge"));
    }
    // The rounds after the first continue the first round's adapter: on the base it continued,
    // or on the stage's model, which the first round trained a fresh adapter on.
    let has_rounds = stage
        .spec
        .expand()
        .stage_inputs
        .iter()
        .any(|(r, _)| r == PREVIOUS_ROUND_ROLE);
    let rounds = match (&train.lora, model) {
        (Some(_), Some(model)) if has_rounds => Some(first.clone().unwrap_or(AdapterBase {
            input: Input {
                role: ADAPTER_BASE_ROLE.to_owned(),
                source: Source::File(PathBuf::new()),
                path: Some(model.path.clone()),
                bare: false,
            },
            target: model.target.clone(),
        })),
        _ => None,
    };
    Ok(AdapterBases { first, rounds })
}

/// Whether the model `node` is base + adapter: a model node with `adapter`, or a stage trained
/// with `lora` (its artifact holds the adapter beside the merged model).
fn carries_adapter(node: &Node) -> bool {
    match &node.body {
        NodeBody::Model(m) => m.spec.adapter.is_some(),
        NodeBody::Stage(stage) => stage.spec.train_args().is_some_and(|t| t.lora.is_some()),
        _ => true,
    }
}

/// When `node` is a `lora` stage of a kind that continues adapters, without `merge_adapter`,
/// and its `model` is base + adapter (a model with `adapter`, or a `lora` stage whose adapter
/// this kind continues, [`continues_adapter_of`]), the base that adapter was trained on: the
/// model's `hf` directory, or, through a chain of stages continuing one adapter, the model the
/// first of them started from. The stage's `lora` must agree with the incoming adapter's:
/// otherwise the error names the setting that differs. `depth` bounds the walk (a cycle is
/// reported elsewhere).
fn adapter_base(
    recipe: &Recipe,
    node: &Node,
    depth: usize,
) -> Result<Option<AdapterBase>, Diagnostic> {
    let NodeBody::Stage(stage) = &node.body else {
        return Ok(None);
    };
    let Some(train) = stage.spec.train_args() else {
        return Ok(None);
    };
    let (Some(lora), false) = (&train.lora, train.merge_adapter) else {
        return Ok(None);
    };
    if depth == 0 || !continues_adapters(stage.spec.kind()) {
        return Ok(None);
    }
    let Some(model) = node.inputs().iter().find(|i| i.field.role == "model") else {
        return Ok(None);
    };
    let Target::Node { name, .. } = &model.target else {
        return Ok(None);
    };
    let Some(from) = recipe.nodes.iter().find(|n| &n.name == name) else {
        return Ok(None);
    };
    // A reward model trains `score` in full whatever its `lora` says (PEFT's SEQ_CLS task), so
    // both sides are compared as a reward model trains them.
    let reward = stage.spec.kind() == "reward";
    let as_trained = |l: &LoraArgs| match reward {
        true => l.for_reward_model(),
        false => l.clone(),
    };
    let base = |target: Target, bare: bool| AdapterBase {
        input: Input {
            role: ADAPTER_BASE_ROLE.to_owned(),
            source: Source::File(PathBuf::new()),
            path: Some(model.path.clone()),
            bare,
        },
        target,
    };
    match &from.body {
        NodeBody::Model(m) if m.spec.adapter.is_some() => {
            Ok(Some(base(model.target.clone(), true)))
        }
        NodeBody::Stage(upstream)
            if continues_adapter_of(stage.spec.kind(), upstream.spec.kind()) =>
        {
            let Some(incoming) = upstream.spec.train_args().and_then(|t| t.lora.as_ref()) else {
                return Ok(None);
            };
            if let Some((setting, ours, theirs)) =
                as_trained(lora).differs_from(&as_trained(incoming))
            {
                let at = node.path.key("lora");
                let loc = recipe.loc(&at.key(setting)).or_else(|| recipe.loc(&at));
                return Err(Diagnostic::new(format!(
                    "stage `{}` continues the LoRA adapter that `{}` trained, but their `lora` tables differ: `{setting}` is {ours} here and {theirs} there; make them agree, or set `merge_adapter = true` to merge that adapter into its base and train a fresh one",
                    node.name, from.name
                ))
                .with_optional_label(loc, "this adapter"));
            }
            match adapter_base(recipe, from, depth - 1)? {
                Some(continued) => Ok(Some(continued)),
                None => {
                    let Some(start) = from.inputs().iter().find(|i| i.field.role == "model") else {
                        return Ok(None);
                    };
                    Ok(Some(base(start.target.clone(), false)))
                }
            }
        }
        _ => Ok(None),
    }
}

/// Kahn's algorithm, always taking the earliest-written ready vertex: deterministic and
/// close to the order a reader of the recipe expects. On a cycle, returns the vertices left.
fn topological_order(graph: &DiGraph<Vertex, EdgeKind>) -> Result<Vec<NodeIndex>, Vec<NodeIndex>> {
    let mut remaining: HashMap<NodeIndex, usize> = graph
        .node_indices()
        .map(|i| (i, graph.neighbors_directed(i, Direction::Incoming).count()))
        .collect();
    let mut ready: BTreeSet<NodeIndex> = remaining
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(i, _)| *i)
        .collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(index) = ready.pop_first() {
        order.push(index);
        remaining.remove(&index);
        for next in graph.neighbors_directed(index, Direction::Outgoing) {
            let count = remaining.get_mut(&next).expect("unvisited successor");
            *count -= 1;
            if *count == 0 {
                ready.insert(next);
            }
        }
    }
    if remaining.is_empty() {
        Ok(order)
    } else {
        let mut left: Vec<NodeIndex> = remaining.into_keys().collect();
        left.sort();
        Err(left)
    }
}

/// A recipe error naming the nodes of one cycle and pointing at the references that close it.
fn cycle_error(
    recipe: &Recipe,
    graph: &DiGraph<Vertex, EdgeKind>,
    left: &[NodeIndex],
) -> RecipeErrors {
    let components = petgraph::algo::tarjan_scc(graph);
    let cycle: Vec<NodeIndex> = components
        .into_iter()
        .filter(|c| c.iter().all(|i| left.contains(i)))
        .find(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]))
        .unwrap_or_else(|| left.to_vec());
    let mut names: Vec<String> = cycle.iter().map(|&i| graph[i].name.clone()).collect();
    names.sort();
    names.dedup();
    let mut diagnostic = Diagnostic::new(format!(
        "dependency cycle between {}",
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for &index in &cycle {
        let vertex = &graph[index];
        for input in &vertex.inputs {
            if let Source::Vertex { index: from, .. } = input.source
                && cycle.contains(&from)
                && let Some(loc) = input.path.as_ref().and_then(|p| recipe.loc(p))
            {
                diagnostic = diagnostic.with_label(
                    loc,
                    format!("`{}` reads `{}`", vertex.name, graph[from].name),
                );
            }
        }
        if let NodeBody::Stage(stage) = &recipe.nodes[vertex.node].body {
            for (name, path) in &stage.after {
                if cycle.iter().any(|&i| graph[i].name == *name)
                    && let Some(loc) = recipe.loc(path)
                {
                    diagnostic = diagnostic
                        .with_label(loc, format!("`{}` comes after `{name}`", vertex.name));
                }
            }
        }
    }
    RecipeErrors::single(
        recipe.sources.clone(),
        diagnostic.with_help("a stage cannot depend on its own output, directly or through others"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
[models.base]
hf = "model"

[datasets.prompts]
path = "prompts.jsonl"

[datasets.prefs]
path = "prefs.jsonl"

[stages.sft]
kind = "sft"
model = "base"
data = "prompts"
learning_rate = 1e-3
lora = { r = 4, alpha = 8 }

[stages.online]
kind = "iterative_dpo"
model = "sft"
data = "prompts"
judge = { rule = "length", target = 20 }
rounds = 3
learning_rate = 1e-3
lora = { r = 4, alpha = 8 }

[stages.rm]
kind = "reward"
model = "base"
data = "prefs"
learning_rate = 1e-3
lora = { r = 2, alpha = 4 }

[stages.rm_more]
kind = "reward"
model = "rm"
data = "prefs"
learning_rate = 1e-3
lora = { r = 2, alpha = 4, modules_to_save = ["score"] }

[stages.rm_from_sft]
kind = "reward"
model = "sft"
data = "prefs"
learning_rate = 1e-3
lora = { r = 4, alpha = 8 }
"#;

    fn build(text: &str) -> Result<(Graph, Recipe), String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("model")).unwrap();
        let path = dir.path().join("recipe.toml");
        std::fs::write(&path, text).unwrap();
        let recipe = Recipe::load(&path, &[]).map_err(|e| e.to_string())?;
        let graph = Graph::build(&recipe).map_err(|e| e.to_string())?;
        Ok((graph, recipe))
    }

    /// The vertex that `name`'s `adapter_base` input reads, if it has one.
    fn adapter_base_of(graph: &Graph, name: &str) -> Option<String> {
        let vertex = graph.vertex(graph.index(name).unwrap());
        vertex
            .inputs
            .iter()
            .find(|i| i.role == ADAPTER_BASE_ROLE)
            .map(|i| match i.source {
                Source::Vertex { index, .. } => graph.vertex(index).name.clone(),
                Source::File(_) => panic!("a base is a vertex"),
            })
    }

    #[test]
    fn every_round_of_iterative_dpo_continues_the_adapter_on_the_first_base() {
        let (graph, _) = build(RECIPE).unwrap();
        for vertex in ["online/round-1", "online/round-2", "online"] {
            assert_eq!(adapter_base_of(&graph, vertex).as_deref(), Some("base"));
        }
        // Over a plain model, the first round trains a fresh adapter; the later ones continue
        // it on that model.
        let (graph, _) = build(&RECIPE.replacen("model = \"sft\"", "model = \"base\"", 1)).unwrap();
        assert_eq!(adapter_base_of(&graph, "online/round-1"), None);
        for vertex in ["online/round-2", "online"] {
            assert_eq!(adapter_base_of(&graph, vertex).as_deref(), Some("base"));
        }
        // With `merge_adapter`, the first round trains on the merged SFT model, which is then
        // the base of the later rounds.
        let merged = RECIPE.replacen("rounds = 3\n", "rounds = 3\nmerge_adapter = true\n", 1);
        let (graph, _) = build(&merged).unwrap();
        assert_eq!(adapter_base_of(&graph, "online/round-1"), None);
        assert_eq!(adapter_base_of(&graph, "online").as_deref(), Some("sft"));
        // A single round is the stage itself.
        let (graph, _) = build(&RECIPE.replace("rounds = 3", "rounds = 1")).unwrap();
        assert_eq!(adapter_base_of(&graph, "online").as_deref(), Some("base"));
    }

    #[test]
    fn a_reward_stage_continues_a_reward_or_language_model_adapter() {
        let (graph, _) = build(RECIPE).unwrap();
        assert_eq!(adapter_base_of(&graph, "rm"), None);
        // `score` is trained whether `modules_to_save` names it or not.
        assert_eq!(adapter_base_of(&graph, "rm_more").as_deref(), Some("base"));
        assert_eq!(
            adapter_base_of(&graph, "rm_from_sft").as_deref(),
            Some("base")
        );
    }

    #[test]
    fn a_continued_adapter_with_other_settings_is_a_located_error() {
        let text = RECIPE.replace(
            "model = \"rm\"\ndata = \"prefs\"\nlearning_rate = 1e-3\nlora = { r = 2,",
            "model = \"rm\"\ndata = \"prefs\"\nlearning_rate = 1e-3\nlora = { r = 3,",
        );
        let err = build(&text).unwrap_err();
        assert!(
            err.contains("stage `rm_more` continues the LoRA adapter that `rm` trained"),
            "{err}"
        );
        assert!(err.contains("`r` is 3 here and 2 there"), "{err}");
        let line = text.lines().position(|l| l.contains("r = 3")).unwrap() + 1;
        assert!(err.contains(&format!("recipe.toml:{line}:")), "{err}");

        let text = RECIPE.replacen(
            "rounds = 3\nlearning_rate = 1e-3\nlora = { r = 4, alpha = 8 }",
            "rounds = 3\nlearning_rate = 1e-3\nlora = { r = 4, alpha = 16 }",
            1,
        );
        let err = build(&text).unwrap_err();
        assert!(err.contains("`alpha` is 16 here and 8 there"), "{err}");
    }

    #[test]
    fn merge_adapter_without_an_incoming_adapter_is_a_located_error() {
        let text = RECIPE.replacen(
            "model = \"base\"\ndata = \"prefs\"\n",
            "model = \"base\"\ndata = \"prefs\"\nmerge_adapter = true\n",
            1,
        );
        let err = build(&text).unwrap_err();
        assert!(
            err.contains("`merge_adapter = true` merges the LoRA adapter of the stage's model"),
            "{err}"
        );
        assert!(err.contains("`base` carries no adapter"), "{err}");
        let line = text
            .lines()
            .position(|l| l.contains("merge_adapter"))
            .unwrap()
            + 1;
        assert!(err.contains(&format!("recipe.toml:{line}:")), "{err}");
        // Over a LoRA stage's artifact it is meaningful.
        let text = RECIPE.replacen("rounds = 3\n", "rounds = 3\nmerge_adapter = true\n", 1);
        assert!(build(&text).is_ok());
    }
}
