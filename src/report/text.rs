//! The report as plain text: every node's state, time, size and summary metrics, each
//! evaluation's table, and the comparison, for a terminal or a review comment.

use std::fmt::Write;

use rudder_engine::report::{Change, Comparison, Report};

use super::{bytes, number, seconds, state_label};

pub fn text(report: &Report, comparison: Option<&Comparison>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}), store {} ({})",
        report.recipe,
        report.file.display(),
        report.store.display(),
        bytes(report.store_bytes)
    );
    let width = report.nodes.iter().map(|n| n.name.len()).max().unwrap_or(4);
    let kinds = report.nodes.iter().map(|n| n.kind.len()).max().unwrap_or(4);
    for n in &report.nodes {
        let (time, size) = n
            .built
            .as_ref()
            .map_or((String::new(), String::new()), |b| {
                (seconds(b.seconds), bytes(b.bytes))
            });
        let metrics: Vec<String> = n
            .built
            .iter()
            .flat_map(|b| b.summary.iter())
            .filter(|(k, _)| FINAL_METRICS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", number(*v)))
            .collect();
        let _ = writeln!(
            out,
            "{:<9} {:<width$}  {:<kinds$}  {}  {:>7}  {:>9}  {}",
            state_label(n.state, n.ran_last),
            n.name,
            n.kind,
            &n.key[..12],
            time,
            size,
            metrics.join(" ")
        );
    }
    for e in &report.evaluations {
        let _ = writeln!(out, "\nevaluation {}:", e.node);
        let _ = write!(out, "{:<12}", "model");
        for c in &e.columns {
            let _ = write!(out, " {c:>12}");
        }
        out.push('\n');
        for (model, metrics) in &e.rows {
            let _ = write!(out, "{model:<12}");
            for c in &e.columns {
                let cell = metrics.get(c).map_or(String::new(), |v| format!("{v:.4}"));
                let _ = write!(out, " {cell:>12}");
            }
            out.push('\n');
        }
    }
    if let Some(c) = comparison {
        let _ = writeln!(out, "\ncompared with {}:", c.other);
        let mut same = Vec::new();
        for n in &c.nodes {
            let label = match n.change {
                Change::Same => {
                    same.push(n.name.as_str());
                    continue;
                }
                Change::Changed => "changed",
                Change::Added => "added",
                Change::Removed => "removed",
            };
            let _ = writeln!(out, "{label:<8} {} ({})", n.name, n.kind);
            for p in &n.params {
                let _ = writeln!(
                    out,
                    "    {}: {} -> {}",
                    p.name,
                    p.old.as_deref().unwrap_or("(default)"),
                    p.new.as_deref().unwrap_or("(default)")
                );
            }
            for line in &n.inputs {
                let _ = writeln!(out, "    {line}");
            }
            for m in &n.metrics {
                if m.old == m.new {
                    continue;
                }
                let show = |v: Option<f64>| v.map_or("-".to_owned(), number);
                let delta = m
                    .delta()
                    .map(|d| format!(" ({}{})", if d > 0.0 { "+" } else { "" }, number(d)))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "    {} {} -> {}{delta}",
                    m.name,
                    show(m.old),
                    show(m.new)
                );
            }
        }
        if !same.is_empty() {
            let _ = writeln!(out, "unchanged: {}", same.join(", "));
        }
    }
    out
}

/// Summary metrics shown per node in the text summary (the HTML shows all).
const FINAL_METRICS: &[&str] = &[
    "loss",
    "accuracy",
    "rewards/accuracies",
    "rewards/margins",
    "objective/kl",
    "objective/scores",
    "reward",
    "score",
    "steps",
];
