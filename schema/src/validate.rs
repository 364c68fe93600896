//! Checks a value tree against the JSON Schema derived from the parameter structs, producing
//! errors phrased for recipe authors ("expected a number, found a string", "unknown key `bta`",
//! "must be at most 1") with the path of the offending value.
//!
//! Only the subset of JSON Schema that `schemars` emits for our structs is interpreted:
//! `$ref`, `allOf`, `anyOf`/`oneOf`, `type`, `enum`, `const`, numeric bounds, `properties`,
//! `required`, `additionalProperties` and `items`. Exported schemas are checked against a full
//! validator in the tests.

use serde_json::{Map, Value};

use crate::diagnostic::did_you_mean;
use crate::source::ValuePath;

/// One schema violation.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError {
    pub path: ValuePath,
    pub message: String,
    pub help: Option<String>,
    /// Points at the key rather than the value (unknown keys).
    pub at_key: bool,
}

impl SchemaError {
    fn new(path: &ValuePath, message: impl Into<String>) -> Self {
        Self {
            path: path.clone(),
            message: message.into(),
            help: None,
            at_key: false,
        }
    }
}

/// Validates `instance` (found at `path`) against `schema`, resolving `$ref`s in `root`.
pub fn validate(
    root: &Value,
    schema: &Value,
    instance: &Value,
    path: &ValuePath,
) -> Vec<SchemaError> {
    let mut errors = Vec::new();
    Validator { root }.check(schema, instance, path, &mut errors);
    errors
}

struct Validator<'a> {
    root: &'a Value,
}

impl<'a> Validator<'a> {
    fn resolve(&self, schema: &'a Value) -> &'a Value {
        let mut schema = schema;
        // Bounded: a ref cycle in a derived schema would be a bug, never hang on it.
        for _ in 0..32 {
            match schema.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    let pointer = reference.trim_start_matches('#');
                    match self.root.pointer(pointer) {
                        Some(target) => schema = target,
                        None => return schema,
                    }
                }
                None => return schema,
            }
        }
        schema
    }

    fn check(
        &self,
        schema: &'a Value,
        instance: &Value,
        path: &ValuePath,
        errors: &mut Vec<SchemaError>,
    ) {
        let schema = self.resolve(schema);
        let Some(obj) = schema.as_object() else {
            if schema == &Value::Bool(false) {
                errors.push(SchemaError::new(path, "no value is allowed here"));
            }
            return;
        };
        if let Some(all) = obj.get("allOf").and_then(Value::as_array) {
            for sub in all {
                self.check(sub, instance, path, errors);
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alternatives) = obj.get(key).and_then(Value::as_array) {
                self.check_alternatives(alternatives, instance, path, errors);
            }
        }
        if let Some(expected) = obj.get("type")
            && !type_matches(expected, instance)
        {
            errors.push(SchemaError::new(
                path,
                format!(
                    "expected {}, found {}",
                    describe_types(expected),
                    describe_value(instance)
                ),
            ));
            return;
        }
        if let Some(options) = obj.get("enum").and_then(Value::as_array)
            && !options.contains(instance)
        {
            errors.push(enum_error(path, options, instance));
            return;
        }
        if let Some(constant) = obj.get("const")
            && constant != instance
        {
            errors.push(SchemaError::new(
                path,
                format!("expected {constant}, found {instance}"),
            ));
            return;
        }
        if let Some(number) = instance.as_f64() {
            check_bounds(obj, number, path, errors);
        }
        match instance {
            Value::Object(map) => self.check_object(obj, map, path, errors),
            Value::Array(items) => {
                if let Some(item_schema) = obj.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &path.index(i), errors);
                    }
                }
            }
            _ => {}
        }
    }

    fn check_alternatives(
        &self,
        alternatives: &'a [Value],
        instance: &Value,
        path: &ValuePath,
        errors: &mut Vec<SchemaError>,
    ) {
        let mut best: Option<Vec<SchemaError>> = None;
        for alternative in alternatives {
            let mut found = Vec::new();
            self.check(alternative, instance, path, &mut found);
            if found.is_empty() {
                return;
            }
            // Prefer the alternative of the instance's own type: its errors say what is wrong
            // inside the value rather than that the value has another type.
            let resolved = self.resolve(alternative);
            let same_type = resolved
                .get("type")
                .is_some_and(|t| type_matches(t, instance));
            if same_type
                && best
                    .as_ref()
                    .is_none_or(|b| b.iter().any(|e| e.path == *path))
            {
                best = Some(found);
            }
        }
        match best {
            Some(found) => errors.extend(found),
            None => {
                let described: Vec<String> = alternatives
                    .iter()
                    .map(|a| describe_schema(self.resolve(a)))
                    .collect();
                errors.push(SchemaError::new(
                    path,
                    format!(
                        "expected {}, found {}",
                        join_or(&described),
                        describe_value(instance)
                    ),
                ));
            }
        }
    }

    fn check_object(
        &self,
        schema: &'a Map<String, Value>,
        map: &Map<String, Value>,
        path: &ValuePath,
        errors: &mut Vec<SchemaError>,
    ) {
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    errors.push(SchemaError::new(
                        path,
                        format!("missing required key `{name}`"),
                    ));
                }
            }
        }
        let additional = schema.get("additionalProperties");
        for (key, value) in map {
            let child = path.key(key);
            if let Some(property) = properties.get(key) {
                self.check(property, value, &child, errors);
            } else {
                match additional {
                    Some(Value::Bool(false)) => errors.push(SchemaError {
                        help: did_you_mean(key, properties.keys().map(String::as_str)),
                        at_key: true,
                        ..SchemaError::new(&child, format!("unknown key `{key}`"))
                    }),
                    Some(extra @ Value::Object(_)) => self.check(extra, value, &child, errors),
                    _ => {}
                }
            }
        }
    }
}

fn check_bounds(
    schema: &Map<String, Value>,
    number: f64,
    path: &ValuePath,
    errors: &mut Vec<SchemaError>,
) {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    let show = |key: &str| schema.get(key).map(Value::to_string).unwrap_or_default();
    if bound("minimum").is_some_and(|min| number < min) {
        errors.push(SchemaError::new(
            path,
            format!("must be at least {}", show("minimum")),
        ));
    }
    if bound("maximum").is_some_and(|max| number > max) {
        errors.push(SchemaError::new(
            path,
            format!("must be at most {}", show("maximum")),
        ));
    }
    if bound("exclusiveMinimum").is_some_and(|min| number <= min) {
        errors.push(SchemaError::new(
            path,
            format!("must be greater than {}", show("exclusiveMinimum")),
        ));
    }
    if bound("exclusiveMaximum").is_some_and(|max| number >= max) {
        errors.push(SchemaError::new(
            path,
            format!("must be less than {}", show("exclusiveMaximum")),
        ));
    }
}

fn enum_error(path: &ValuePath, options: &[Value], instance: &Value) -> SchemaError {
    let names: Vec<String> = options.iter().map(show_value).collect();
    let help = instance
        .as_str()
        .and_then(|s| did_you_mean(s, options.iter().filter_map(Value::as_str)));
    SchemaError {
        help,
        ..SchemaError::new(
            path,
            format!(
                "expected one of {}, found {}",
                names.join(", "),
                show_value(instance)
            ),
        )
    }
}

fn show_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn type_matches(expected: &Value, instance: &Value) -> bool {
    match expected {
        Value::String(t) => single_type_matches(t, instance),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .any(|t| single_type_matches(t, instance)),
        _ => true,
    }
}

fn single_type_matches(expected: &str, instance: &Value) -> bool {
    match expected {
        "null" => instance.is_null(),
        "boolean" => instance.is_boolean(),
        "string" => instance.is_string(),
        "array" => instance.is_array(),
        "object" => instance.is_object(),
        "number" => instance.is_number(),
        "integer" => instance.is_i64() || instance.is_u64(),
        _ => true,
    }
}

fn describe_type(t: &str) -> &'static str {
    match t {
        "null" => "nothing",
        "boolean" => "a boolean",
        "string" => "a string",
        "array" => "a list",
        "object" => "a table",
        "number" => "a number",
        "integer" => "an integer",
        _ => "a value",
    }
}

fn describe_types(expected: &Value) -> String {
    match expected {
        Value::String(t) => describe_type(t).to_owned(),
        Value::Array(types) => {
            // `null` is how an optional value is typed; leaving it out reads better.
            let described: Vec<String> = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .map(|t| describe_type(t).to_owned())
                .collect();
            join_or(&described)
        }
        _ => "a value".to_owned(),
    }
}

fn describe_schema(schema: &Value) -> String {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        let names: Vec<String> = options.iter().map(show_value).collect();
        return format!("one of {}", names.join(", "));
    }
    match schema.get("type") {
        Some(t) => describe_types(t),
        None => "a value".to_owned(),
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("float `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a table".to_owned(),
    }
}

fn join_or(items: &[String]) -> String {
    let mut items: Vec<&String> = items.iter().collect();
    items.dedup();
    match items.as_slice() {
        [] => "a value".to_owned(),
        [one] => (*one).clone(),
        [init @ .., last] => format!(
            "{} or {last}",
            init.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(schema: Value, instance: Value) -> Vec<SchemaError> {
        validate(&schema, &schema, &instance, &ValuePath::root())
    }

    #[test]
    fn type_errors_name_both_types() {
        let errors = run(
            json!({"type": "object", "properties": {"beta": {"type": "number"}}}),
            json!({"beta": "high"}),
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].message,
            "expected a number, found string \"high\""
        );
        assert_eq!(errors[0].path.to_string(), "beta");
    }

    #[test]
    fn unknown_keys_get_a_hint() {
        let errors = run(
            json!({"type": "object", "additionalProperties": false,
                   "properties": {"beta": {"type": "number"}}}),
            json!({"bta": 0.1}),
        );
        assert_eq!(errors[0].message, "unknown key `bta`");
        assert_eq!(errors[0].help.as_deref(), Some("did you mean `beta`?"));
        assert!(errors[0].at_key);
    }

    #[test]
    fn bounds() {
        let schema = json!({"type": "number", "minimum": 0.0, "maximum": 1.0});
        assert!(run(schema.clone(), json!(0.5)).is_empty());
        assert_eq!(
            run(schema.clone(), json!(1.5))[0].message,
            "must be at most 1.0"
        );
        let exclusive = json!({"type": "number", "exclusiveMinimum": 0.0});
        assert_eq!(
            run(exclusive, json!(0))[0].message,
            "must be greater than 0.0"
        );
    }

    #[test]
    fn integers_reject_fractions() {
        let errors = run(json!({"type": "integer"}), json!(1.5));
        assert_eq!(errors[0].message, "expected an integer, found float `1.5`");
    }

    #[test]
    fn enums_suggest_the_nearest_option() {
        let errors = run(json!({"enum": ["sigmoid", "hinge"]}), json!("sigmoi"));
        assert_eq!(errors[0].help.as_deref(), Some("did you mean `sigmoid`?"));
    }

    #[test]
    fn alternatives_report_the_matching_type() {
        let schema = json!({"$defs": {"L": {"enum": ["a", "b"]}},
            "anyOf": [{"$ref": "#/$defs/L"}, {"type": "array", "items": {"$ref": "#/$defs/L"}}]});
        assert!(run(schema.clone(), json!("a")).is_empty());
        assert!(run(schema.clone(), json!(["a", "b"])).is_empty());
        let errors = run(schema.clone(), json!(["a", "c"]));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path.to_string(), "[1]");
        let errors = run(schema, json!(3));
        assert!(
            errors[0]
                .message
                .starts_with("expected one of `a`, `b` or a list"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn required_keys() {
        let errors = run(json!({"type": "object", "required": ["model"]}), json!({}));
        assert_eq!(errors[0].message, "missing required key `model`");
    }
}
