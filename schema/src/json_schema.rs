//! The JSON Schema of the whole recipe format, for editors (Taplo / Even Better TOML) and for
//! checking recipes with any standard validator. `rudder schema` prints it.

use serde_json::{Map, Value, json};

use crate::kinds::KINDS;
use crate::recipe::schemas;

/// The recipe format as a draft-07 JSON Schema.
pub fn recipe_schema() -> Value {
    let s = schemas();
    let stage_variants: Vec<Value> = KINDS
        .iter()
        .map(|kind| {
            let (mut properties, mut required) = object_parts(&s.root, &s.kinds[kind.name]);
            let (common, _) = object_parts(&s.root, &s.common);
            properties.extend(common);
            properties.insert(
                "kind".into(),
                json!({ "const": kind.name, "description": kind.summary }),
            );
            required.insert(0, Value::from("kind"));
            json!({
                "title": kind.name,
                "description": kind.summary,
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false,
            })
        })
        .collect();
    let definitions = s.root["definitions"].clone();
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "rudder recipe",
        "description": "A rudder recipe: datasets, models and a DAG of stages.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "recipe": s.meta,
            "executor": s.executor,
            "remotes": { "type": "object", "additionalProperties": s.remote },
            "datasets": { "type": "object", "additionalProperties": s.dataset },
            "models": { "type": "object", "additionalProperties": s.model },
            "stages": { "type": "object", "additionalProperties": { "oneOf": stage_variants } },
        },
        "definitions": definitions,
    })
}

/// The properties and required names of an object schema, following `$ref` and `allOf`
/// (flattened parameter groups).
fn object_parts(root: &Value, schema: &Value) -> (Map<String, Value>, Vec<Value>) {
    let mut schema = schema;
    while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        match root.pointer(reference.trim_start_matches('#')) {
            Some(target) => schema = target,
            None => break,
        }
    }
    let mut properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut required = schema
        .get("required")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            let (p, r) = object_parts(root, sub);
            properties.extend(p);
            required.extend(r);
        }
    }
    (properties, required)
}
