//! How `rudder report` draws the engine's report model: one self-contained HTML page (inline
//! CSS and SVG, no script, nothing fetched when it is viewed) from `report.html`, a minijinja
//! template with HTML escaping, and a plain-text summary. What the report holds is the engine's
//! (`rudder_engine::report`); this module only formats and lays it out.

mod dag;
mod plot;
mod text;

use std::collections::BTreeMap;

use rudder_engine::report::{Change, Comparison, NodeState, Report};
use serde_json::{Value, json};

pub use text::text;

const TEMPLATE: &str = include_str!("report.html");

/// The report as one HTML page.
pub fn html(report: &Report, comparison: Option<&Comparison>) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    let context = context(report, comparison)?;
    Ok(env
        .get_template("report.html")?
        .render(minijinja::value::Serde(&context))?)
}

fn context(report: &Report, comparison: Option<&Comparison>) -> anyhow::Result<Value> {
    let nodes: Vec<Value> = report
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "anchor": anchor(&n.name),
                "kind": n.kind,
                "key": n.key,
                "short": &n.key[..12],
                "state": state_label(n.state, n.ran_last),
                "fill": dag::fill(n.state, n.ran_last),
                "reasons": n.reasons.join("; "),
                "inputs": n.inputs.iter().map(|(role, from)| format!("{role}: {from}")).collect::<Vec<_>>().join(", "),
                "time": n.built.as_ref().map_or(String::new(), |b| seconds(b.seconds)),
                "size": n.built.as_ref().map_or(String::new(), |b| bytes(b.bytes)),
                "started": n.built.as_ref().map_or(String::new(), |b| b.started.clone()),
            })
        })
        .collect();
    let state_legend = [
        (dag::RAN_LAST, "built by the last run"),
        (dag::CACHED, "built earlier (cached)"),
        (dag::NOT_BUILT, "not built"),
        (dag::SOURCE, "source (dataset or model)"),
    ]
    .map(|(color, label)| json!({"color": color, "label": label}));

    // Series keep one colour across a group's charts: by the node's place in its group.
    let mut groups: Vec<(String, Vec<String>, Vec<Value>)> = Vec::new();
    for chart in &report.charts {
        if groups.last().is_none_or(|g| g.0 != chart.group) {
            groups.push((chart.group.clone(), Vec::new(), Vec::new()));
        }
        let group = groups.last_mut().expect("just pushed");
        for s in &chart.series {
            if !group.1.contains(&s.node) {
                group.1.push(s.node.clone());
            }
        }
        let colors: Vec<&str> = chart
            .series
            .iter()
            .map(|s| color(group.1.iter().position(|n| *n == s.node).unwrap_or(0)))
            .collect();
        let svg = plot::svg(chart, &colors).map_err(anyhow::Error::msg)?;
        group.2.push(json!({
            "metric": chart.metric,
            "svg": svg,
            "series": chart.series.iter().zip(&colors).map(|(s, c)| json!({"node": s.node, "color": c})).collect::<Vec<_>>(),
        }));
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(name, series, charts)| {
            json!({
                "name": name,
                "series": series.iter().enumerate().map(|(i, n)| json!({"node": n, "color": color(i)})).collect::<Vec<_>>(),
                "nodes": series.join(", "),
                "charts": charts,
            })
        })
        .collect();

    let evaluations: Vec<Value> = report
        .evaluations
        .iter()
        .map(|e| {
            json!({
                "node": e.node,
                "judge": e.judge.clone().unwrap_or_default(),
                "baseline": e.baseline,
                "reference": e.reference,
                "columns": e.columns,
                "rows": e.rows.iter().map(|(model, metrics)| json!({
                    "model": model,
                    "cells": e.columns.iter().map(|c| metrics.get(c).map_or(String::new(), |v| format!("{v:.4}"))).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "samples": e.samples.iter().map(|s| json!({
                    "prompt": s.prompt,
                    "completions": s.completions.iter().map(|c| json!({
                        "model": c.model,
                        "text": c.completion,
                        "score": c.score.map_or("-".to_owned(), |v| format!("{v:.4}")),
                        "finish": c.finish_reason,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();

    let stages: Vec<Value> = report
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Source)
        .map(|n| {
            json!({
                "name": n.name,
                "anchor": anchor(&n.name),
                "kind": n.kind,
                "short": &n.key[..12],
                "state": state_label(n.state, n.ran_last),
                "open": !n.is_part,
                "seed": n.seed,
                "backend": n.backend,
                "precision": n.precision,
                "inputs": n.inputs.iter().map(|(role, from)| format!("{role}: {from}")).collect::<Vec<_>>().join(", "),
                // What the recipe sets or differs from the default first; the rest folded away.
                "params": n.params.iter().filter(|p| !at_default(p)).map(|p| json!({
                    "name": p.name,
                    "value": toml_like(&p.value),
                    "default": p.default.as_ref().map_or(String::new(), toml_like),
                    "origin": match p.origin {
                        rudder_engine::report::Origin::Recipe => "recipe",
                        rudder_engine::report::Origin::Override => "--set",
                        rudder_engine::report::Origin::Default => "default",
                    },
                    "differs": p.differs(),
                })).collect::<Vec<_>>(),
                "defaults": n.params.iter().filter(|p| at_default(p)).map(|p| json!({
                    "name": p.name,
                    "value": toml_like(&p.value),
                })).collect::<Vec<_>>(),
                "summary": n.built.as_ref().map(|b| b.summary.iter().map(|(k, v)| json!({"name": k, "value": number(*v)})).collect::<Vec<_>>()).unwrap_or_default(),
                "files": n.built.as_ref().map(|b| b.files.iter().map(|f| json!({"name": f.name, "size": bytes(f.size)})).collect::<Vec<_>>()).unwrap_or_default(),
            })
        })
        .collect();

    // Each artifact once (identical stages share one), largest first.
    let mut seen = std::collections::BTreeSet::new();
    let mut sized: Vec<(&str, &str, usize, u64)> = report
        .nodes
        .iter()
        .filter_map(|n| {
            let b = n.built.as_ref()?;
            seen.insert(n.key.clone()).then_some((
                n.name.as_str(),
                n.kind.as_str(),
                b.files.len(),
                b.bytes,
            ))
        })
        .collect();
    sized.sort_by(|a, b| b.3.cmp(&a.3).then(a.0.cmp(b.0)));
    let total = report.store_bytes.max(1) as f64;
    let sizes: Vec<Value> = sized
        .iter()
        .map(|(name, kind, files, size)| {
            json!({
                "name": name, "kind": kind, "files": files, "size": bytes(*size),
                "share": format!("{:.1}%", 100.0 * *size as f64 / total),
            })
        })
        .collect();

    let last_run = report.last_run.as_ref().map(|r| {
        json!({
            "started": r.started,
            "outcome": r.outcome,
            "ran": r.ran.len(),
            "cached": r.cached,
            "seconds": seconds(r.ran.iter().map(|s| s.seconds).sum()),
        })
    });

    let (dag_svg, dag_width) = dag::svg(report);
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "recipe": report.recipe,
        "file": report.file.display().to_string(),
        "store": report.store.display().to_string(),
        "store_size": bytes(report.store_bytes),
        "generated": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "last_run": last_run,
        "state_legend": state_legend,
        "dag_svg": dag_svg,
        // Shrunk to fit the page, but never so far that its labels cannot be read.
        "dag_width": dag_width.round(),
        "dag_min_width": (dag_width * 0.6).round(),
        "nodes": nodes,
        "groups": groups,
        "evaluations": evaluations,
        "stages": stages,
        "sizes": sizes,
        "comparison": comparison.map(comparison_context),
    }))
}

fn comparison_context(c: &Comparison) -> Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &c.nodes {
        *counts.entry(change_label(n.change)).or_default() += 1;
    }
    let counts = ["changed", "added", "removed", "unchanged"]
        .iter()
        .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
        .collect::<Vec<_>>()
        .join(", ");
    let shown: Vec<Value> = c
        .nodes
        .iter()
        .filter(|n| n.change != Change::Same)
        .map(|n| {
            json!({
                "name": n.name,
                "kind": n.kind,
                "change": change_label(n.change),
                "old_key": n.old_key.as_deref().map_or("(none)", short),
                "new_key": n.new_key.as_deref().map_or("(none)", short),
                "params": n.params.iter().map(|p| json!({
                    "name": p.name,
                    "old": p.old.clone().unwrap_or_else(|| "(default)".into()),
                    "new": p.new.clone().unwrap_or_else(|| "(default)".into()),
                })).collect::<Vec<_>>(),
                "inputs": n.inputs,
                "metrics": n.metrics.iter().map(|m| {
                    let delta = m.delta();
                    json!({
                        "name": m.name,
                        "old": m.old.map_or("-".to_owned(), number),
                        "new": m.new.map_or("-".to_owned(), number),
                        "delta": delta.map_or(String::new(), signed),
                        "class": match delta {
                            Some(d) if d > 0.0 => "delta-up",
                            Some(d) if d < 0.0 => "delta-down",
                            _ => "",
                        },
                    })
                }).collect::<Vec<_>>(),
                "no_metrics": if n.metrics.is_empty() && n.kind != "dataset" && n.kind != "model" {
                    "neither artifact is in the store, or neither has summary metrics"
                } else { "" },
            })
        })
        .collect();
    let same: Vec<&str> = c
        .nodes
        .iter()
        .filter(|n| n.change == Change::Same)
        .map(|n| n.name.as_str())
        .collect();
    json!({
        "other": c.other,
        "counts": counts,
        "nodes": shown,
        "same": same.join(", "),
    })
}

/// A parameter left at its kind's default (parts' parameters have none: always shown).
fn at_default(p: &rudder_engine::report::Param) -> bool {
    p.origin == rudder_engine::report::Origin::Default && p.default.as_ref() == Some(&p.value)
}

fn change_label(change: Change) -> &'static str {
    match change {
        Change::Same => "unchanged",
        Change::Changed => "changed",
        Change::Added => "added",
        Change::Removed => "removed",
    }
}

fn state_label(state: NodeState, ran_last: bool) -> &'static str {
    match (state, ran_last) {
        (NodeState::Source, _) => "source",
        (NodeState::Built, true) => "ran",
        (NodeState::Built, false) => "cached",
        (NodeState::NotBuilt, _) => "not built",
    }
}

fn color(i: usize) -> &'static str {
    plot::PALETTE[i % plot::PALETTE.len()]
}

/// An HTML id for a node name (`dpo/ref_logps` -> `dpo-ref_logps`).
fn anchor(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A parameter as a recipe writes it.
fn toml_like(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

/// Counts as integers, tiny or huge values in scientific notation, the rest with 4 decimals.
pub(crate) fn number(v: f64) -> String {
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        format!("{v:.0}")
    } else if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn signed(v: f64) -> String {
    if v > 0.0 {
        format!("+{}", number(v))
    } else {
        number(v)
    }
}

pub(crate) fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_sizes_and_names_read_well() {
        assert_eq!(number(38.0), "38");
        assert_eq!(number(0.60291), "0.6029");
        assert_eq!(number(2.1e-5), "2.100e-5");
        assert_eq!(signed(0.25), "+0.2500");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 1024 * 512), "3.5 MiB");
        assert_eq!(seconds(95.0), "1m35s");
        assert_eq!(anchor("dpo/ref_logps"), "dpo-ref_logps");
        assert_eq!(toml_like(&json!("sigmoid")), "\"sigmoid\"");
        assert_eq!(toml_like(&json!(["a", 1])), "[\"a\",1]");
    }
}
