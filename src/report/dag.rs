//! The pipeline's DAG as an SVG string, laid out by the `layout-rs` crate (a Sugiyama-style
//! layered layout, as Graphviz's dot): one box per node with its name, kind, short key and build
//! time, coloured by state; data edges solid, ordering-only edges dashed.

use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::render::get_shape_size;
use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
use layout::topo::layout::VisualGraph;
use rudder_engine::report::{NodeState, Report};

/// Fill colours by state; the page's legend uses the same.
pub const SOURCE: &str = "#eeeeee";
pub const RAN_LAST: &str = "#c8e6c9";
pub const CACHED: &str = "#dbeafe";
pub const NOT_BUILT: &str = "#ffe0b2";

const FONT_SIZE: usize = 12;

pub fn fill(state: NodeState, ran_last: bool) -> &'static str {
    match (state, ran_last) {
        (NodeState::Source, _) => SOURCE,
        (NodeState::Built, true) => RAN_LAST,
        (NodeState::Built, false) => CACHED,
        (NodeState::NotBuilt, _) => NOT_BUILT,
    }
}

pub fn svg(report: &Report) -> String {
    let direction = Orientation::LeftToRight;
    let mut graph = VisualGraph::new(direction);
    let handles: Vec<_> = report
        .nodes
        .iter()
        .map(|node| {
            let mut label = format!("{}\n{} · {}", node.name, node.kind, &node.key[..8]);
            if let Some(built) = &node.built {
                label.push_str(&format!("\n{:.1}s", built.seconds));
            }
            let shape = ShapeKind::new_box(&label);
            let look = StyleAttr::new(
                Color::fast(if node.is_part { "#888888" } else { "#333333" }),
                1,
                Some(Color::fast(fill(node.state, node.ran_last))),
                if node.is_part { 12 } else { 3 },
                FONT_SIZE,
            );
            let size = get_shape_size(direction, &shape, FONT_SIZE, false);
            graph.add_node(Element::create(shape, look, direction, size))
        })
        .collect();
    for edge in &report.edges {
        let order_only = edge.role == "after";
        let arrow = Arrow::new(
            LineEndKind::None,
            LineEndKind::Arrow,
            if order_only {
                LineStyleKind::Dashed
            } else {
                LineStyleKind::Normal
            },
            "",
            &StyleAttr::new(Color::fast("#555555"), 1, None, 0, FONT_SIZE),
            &None,
            &None,
        );
        graph.add_edge(arrow, handles[edge.from], handles[edge.to]);
    }
    let mut writer = SVGWriter::new();
    graph.do_it(false, false, false, &mut writer);
    let svg = writer.finalize();
    // Inline in HTML, an XML declaration is noise.
    match svg.find("<svg") {
        Some(start) => svg[start..].to_owned(),
        None => svg,
    }
}
