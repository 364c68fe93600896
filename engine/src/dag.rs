//! The pipeline graph as text, Graphviz dot, or Mermaid.

use std::fmt::Write;

use rudder_schema::Recipe;

use crate::graph::{EdgeKind, Graph, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

impl std::str::FromStr for DagFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "dot" => Ok(Self::Dot),
            "mermaid" => Ok(Self::Mermaid),
            other => Err(format!("unknown format `{other}` (text, dot or mermaid)")),
        }
    }
}

fn kind_of(recipe: &Recipe, graph: &Graph, index: petgraph::graph::NodeIndex) -> String {
    let vertex = graph.vertex(index);
    match &vertex.part {
        Some(part) => part.kind.clone(),
        None => recipe.nodes[vertex.node].kind().to_owned(),
    }
}

/// Renders the graph in topological order.
pub fn render(recipe: &Recipe, graph: &Graph, format: DagFormat) -> String {
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            for &index in &graph.order {
                let vertex = graph.vertex(index);
                let _ = write!(out, "{} ({})", vertex.name, kind_of(recipe, graph, index));
                let mut sources: Vec<String> = vertex
                    .inputs
                    .iter()
                    .map(|input| match &input.source {
                        Source::Vertex { index, output } => {
                            let name = &graph.vertex(*index).name;
                            match output {
                                Some(o) => format!("{}: {name}.{o}", input.role),
                                None => format!("{}: {name}", input.role),
                            }
                        }
                        Source::File(path) => format!("{}: {}", input.role, path.display()),
                    })
                    .collect();
                sources.extend(
                    vertex
                        .after
                        .iter()
                        .map(|&i| format!("after: {}", graph.vertex(i).name)),
                );
                if !sources.is_empty() {
                    let _ = write!(out, " <- {}", sources.join(", "));
                }
                out.push('\n');
            }
        }
        DagFormat::Dot => {
            out.push_str("digraph rudder {\n  rankdir=LR;\n");
            for &index in &graph.order {
                let vertex = graph.vertex(index);
                let shape = match recipe.nodes[vertex.node].kind() {
                    "dataset" => "cylinder",
                    "model" => "box3d",
                    _ if vertex.is_part() => "ellipse",
                    _ => "box",
                };
                let _ = writeln!(
                    out,
                    "  \"{}\" [label=\"{}\\n{}\", shape={shape}];",
                    vertex.name,
                    vertex.name,
                    kind_of(recipe, graph, index)
                );
            }
            for edge in graph.graph.edge_indices() {
                let (from, to) = graph.graph.edge_endpoints(edge).expect("edge exists");
                let style = match graph.graph[edge] {
                    EdgeKind::Data => "",
                    EdgeKind::Order => " [style=dashed]",
                };
                let _ = writeln!(
                    out,
                    "  \"{}\" -> \"{}\"{style};",
                    graph.vertex(from).name,
                    graph.vertex(to).name
                );
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            let id = |index: petgraph::graph::NodeIndex| format!("n{}", index.index());
            for &index in &graph.order {
                let vertex = graph.vertex(index);
                let label = format!("{}<br/>{}", vertex.name, kind_of(recipe, graph, index));
                let shape = match recipe.nodes[vertex.node].kind() {
                    "dataset" => format!("[(\"{label}\")]"),
                    "model" => format!("[[\"{label}\"]]"),
                    _ => format!("[\"{label}\"]"),
                };
                let _ = writeln!(out, "  {}{shape}", id(index));
            }
            for edge in graph.graph.edge_indices() {
                let (from, to) = graph.graph.edge_endpoints(edge).expect("edge exists");
                let arrow = match graph.graph[edge] {
                    EdgeKind::Data => "-->",
                    EdgeKind::Order => "-.->",
                };
                let _ = writeln!(out, "  {} {arrow} {}", id(from), id(to));
            }
        }
    }
    out
}
