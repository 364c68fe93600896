//! The JSON Schemas of the recipe's tables, derived once from the typed specs, that loading
//! validates against and `rudder schema` prints.

use std::collections::HashMap;
use std::sync::OnceLock;

use schemars::SchemaGenerator;
use serde_json::Value;

use crate::kinds::KINDS;
use crate::nodes::{DatasetSpec, ExecutorSpec, ModelSpec, RecipeMeta, RemoteSpec, StageCommon};

/// Derived JSON Schemas of the node tables, computed once.
pub(crate) struct Schemas {
    /// Holds `$defs` for `$ref` resolution.
    pub root: Value,
    pub meta: Value,
    pub executor: Value,
    pub remote: Value,
    pub dataset: Value,
    pub model: Value,
    pub common: Value,
    pub kinds: HashMap<&'static str, Value>,
}

pub(crate) fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut generator = SchemaGenerator::new(schemars::generate::SchemaSettings::draft07());
        let meta = generator.subschema_for::<RecipeMeta>().to_value();
        let executor = generator.subschema_for::<ExecutorSpec>().to_value();
        let remote = generator.subschema_for::<RemoteSpec>().to_value();
        let dataset = generator.subschema_for::<DatasetSpec>().to_value();
        let model = generator.subschema_for::<ModelSpec>().to_value();
        let common = generator.subschema_for::<StageCommon>().to_value();
        let kinds: HashMap<&'static str, Value> = KINDS
            .iter()
            .map(|k| (k.name, (k.schema)(&mut generator).to_value()))
            .collect();
        let mut definitions: serde_json::Map<String, Value> =
            generator.take_definitions(true).into_iter().collect();
        for kind in KINDS {
            mark_required(&mut definitions, &kinds[kind.name], kind.required);
        }
        Schemas {
            root: serde_json::json!({ "definitions": definitions }),
            meta,
            executor,
            remote,
            dataset,
            model,
            common,
            kinds,
        }
    })
}

/// Mark a kind's required fields, and drop their placeholder defaults from its definition.
fn mark_required(
    definitions: &mut serde_json::Map<String, Value>,
    reference: &Value,
    required: &[&str],
) {
    let Some(name) = reference
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/definitions/"))
    else {
        return;
    };
    let Some(Value::Object(definition)) = definitions.get_mut(name) else {
        return;
    };
    if let Some(Value::Object(properties)) = definition.get_mut("properties") {
        for field in required {
            if let Some(Value::Object(property)) = properties.get_mut(*field) {
                property.remove("default");
            }
        }
    }
    definition.insert("required".into(), serde_json::json!(required));
}

/// Every property name a schema accepts at its top level, following `$ref` and `allOf`.
pub(super) fn property_names(root: &Value, schema: &Value) -> Vec<String> {
    let mut schema = schema;
    while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        match root.pointer(reference.trim_start_matches('#')) {
            Some(target) => schema = target,
            None => break,
        }
    }
    let mut names: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            names.extend(property_names(root, sub));
        }
    }
    names
}
