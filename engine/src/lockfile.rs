//! `NAME.lock` beside `NAME.toml`: every node's key, resolved parameters, input keys and
//! output digests after the last successful run. It is TOML with nodes in the plan's
//! (topological, then written) order and fields in a fixed order, so that its diffs review well.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EngineError;
use crate::fsutil::write_atomic;

/// Version of the lockfile format.
pub const LOCKFILE_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lockfile {
    pub version: u32,
    pub recipe: String,
    #[serde(default, rename = "node")]
    pub nodes: Vec<LockEntry>,
}

/// One node of the lockfile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub name: String,
    pub kind: String,
    pub key: String,
    /// Version of the stage kind's implementation (stages only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implementation: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Every parameter, defaults filled in.
    #[serde(default, skip_serializing_if = "is_empty_object")]
    pub params: Value,
    /// Input keys by role (`KEY` or `KEY/OUTPUT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
    /// Digests of plain files the stage reads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deps: BTreeMap<String, String>,
    /// Digests of the node's files: a dataset's file, a model's files, an artifact's files.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
}

fn is_empty_object(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

impl Lockfile {
    /// Reads a lockfile; a missing one is empty.
    pub fn read(path: &Path) -> Result<Lockfile, EngineError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lockfile::default()),
            Err(e) => return Err(EngineError::io(format!("reading {}", path.display()), e)),
        };
        let lockfile: Lockfile = toml::from_str(&text).map_err(|e| EngineError::Lockfile {
            path: path.to_path_buf(),
            message: e.message().to_owned(),
        })?;
        if lockfile.version > LOCKFILE_VERSION {
            return Err(EngineError::Lockfile {
                path: path.to_path_buf(),
                message: format!(
                    "format version {} is newer than this rudder's {LOCKFILE_VERSION}",
                    lockfile.version
                ),
            });
        }
        Ok(lockfile)
    }

    pub fn write(&self, path: &Path) -> Result<(), EngineError> {
        let body = toml::to_string(self).map_err(|e| EngineError::Lockfile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let text = format!(
            "# Written by `rudder run`: the key, parameters, inputs and output digests of every node\n# after the last successful run. Commit it with the recipe.\n\n{body}"
        );
        write_atomic(path, text.as_bytes())
    }

    pub fn entry(&self, name: &str) -> Option<&LockEntry> {
        self.nodes.iter().find(|e| e.name == name)
    }

    pub fn by_key(&self, key: &str) -> Option<&LockEntry> {
        self.nodes.iter().find(|e| e.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_order_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let lock = Lockfile {
            version: LOCKFILE_VERSION,
            recipe: "r".into(),
            nodes: vec![
                LockEntry {
                    name: "zeta".into(),
                    kind: "dataset".into(),
                    key: "aa".into(),
                    implementation: None,
                    seed: None,
                    backend: None,
                    precision: None,
                    params: json!({"path": "p.jsonl", "columns": {"prompt": "q"}}),
                    inputs: BTreeMap::new(),
                    deps: BTreeMap::new(),
                    outputs: [("p.jsonl".to_string(), "dd".to_string())].into(),
                },
                LockEntry {
                    name: "alpha".into(),
                    kind: "dpo".into(),
                    key: "bb".into(),
                    implementation: Some(1),
                    seed: Some(3),
                    backend: Some("cpu".into()),
                    precision: Some("fp32".into()),
                    params: json!({"beta": 0.1, "epochs": 3, "loss_type": ["sigmoid", "sft"]}),
                    inputs: [("data".to_string(), "aa".to_string())].into(),
                    deps: BTreeMap::new(),
                    outputs: BTreeMap::new(),
                },
            ],
        };
        lock.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.find("zeta").unwrap() < text.find("alpha").unwrap());
        let read = Lockfile::read(&path).unwrap();
        assert_eq!(read, lock);
        assert!(read.nodes[1].params["beta"].is_f64());
        assert!(read.nodes[1].params["epochs"].is_i64());
    }

    #[test]
    fn missing_lockfile_is_empty() {
        let lock = Lockfile::read(Path::new("/nonexistent/x.lock")).unwrap();
        assert!(lock.nodes.is_empty());
    }
}
