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

const FONT_SIZE: usize = 14;

pub fn fill(state: NodeState, ran_last: bool) -> &'static str {
    match (state, ran_last) {
        (NodeState::Source, _) => SOURCE,
        (NodeState::Built, true) => RAN_LAST,
        (NodeState::Built, false) => CACHED,
        (NodeState::NotBuilt, _) => NOT_BUILT,
    }
}

/// The SVG and its natural width in pixels.
pub fn svg(report: &Report) -> (String, f64) {
    let direction = Orientation::TopToBottom;
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
    let svg = match svg.find("<svg") {
        Some(start) => svg[start..].to_owned(),
        None => svg,
    };
    let attribute = |tag: &str, name: &str| -> Option<f64> {
        let (_, rest) = tag.split_once(&format!(" {name}=\""))?;
        rest.split('"').next()?.parse().ok()
    };
    let header = &svg[..svg.find('>').unwrap_or(0)];
    let width = attribute(header, "width").unwrap_or(800.0);
    let height = attribute(header, "height").unwrap_or(600.0);
    // layout-rs grows the canvas downwards by each label's length; the boxes end higher.
    let bottom = svg
        .match_indices("<rect")
        .filter_map(|(at, _)| {
            let tag = &svg[at..at + svg[at..].find('>')?];
            Some(attribute(tag, "y")? + attribute(tag, "height")?)
        })
        .fold(0.0, f64::max);
    let svg = if bottom > 0.0 && bottom + 20.0 < height {
        let trimmed = bottom + 20.0;
        svg.replacen(
            &format!("height=\"{height}\" viewBox=\"0 0 {width} {height}\""),
            &format!("height=\"{trimmed}\" viewBox=\"0 0 {width} {trimmed}\""),
            1,
        )
    } else {
        svg
    };
    (svg, width)
}
