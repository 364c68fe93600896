//! `--set KEY=VALUE`: an override written into the parsed tree before it is loaded, with a span
//! of its own so that an error in it points at the command line.

use serde_json::Value;

use super::Override;
use crate::diagnostic::{Diagnostic, Loc};
use crate::source::{Sources, SpanMap, Spans, ValuePath, parse_override_value};

pub(super) fn apply_override(
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
