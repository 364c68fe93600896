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
use rudder_schema::kinds::{ADAPTER_BASE_ROLE, CONTINUES_ADAPTERS, PartInput, PartSpec};
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
            for part in &expansion.parts {
                let part_index = by_name[&format!("{}/{}", node.name, part.name)];
                let inputs = part
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
            match adapter_base(recipe, node, recipe.nodes.len()) {
                Ok(Some(base)) => inputs.push(Input {
                    source: resolve(&base.target),
                    ..base.input
                }),
                Ok(None) => {}
                Err(diagnostic) => lora_errors.push(diagnostic),
            }
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
struct AdapterBase {
    input: Input,
    target: Target,
}

/// When `node` is a `lora` stage of a kind that continues adapters, without `merge_adapter`,
/// and its `model` is base + adapter (a model with `adapter`, or a `lora` stage of such a
/// kind), the base that adapter was trained on: the model's `hf` directory, or, through a
/// chain of stages continuing one adapter, the model the first of them started from. The
/// stage's `lora` must agree with the incoming adapter's: otherwise the error names the
/// setting that differs. `depth` bounds the walk (a cycle is reported elsewhere).
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
    if depth == 0 || !CONTINUES_ADAPTERS.contains(&stage.spec.kind()) {
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
        NodeBody::Stage(upstream) if CONTINUES_ADAPTERS.contains(&upstream.spec.kind()) => {
            let Some(incoming) = upstream.spec.train_args().and_then(|t| t.lora.as_ref()) else {
                return Ok(None);
            };
            if let Some((setting, ours, theirs)) = lora.differs_from(incoming) {
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
