//! The user's configuration file: remotes declared once for every recipe of that user, in the
//! same `[remotes.NAME]` tables a recipe has. It holds no credentials either.
//!
//! ```text
//! $RUDDER_CONFIG                         when set: this file
//! $XDG_CONFIG_HOME/rudder/config.toml    else, when XDG_CONFIG_HOME is set
//! ~/.config/rudder/config.toml           else
//! ```
//!
//! Resolving which remote a command uses (the recipe's, these, a URL) is the engine's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::diagnostic::{Diagnostic, RecipeErrors, did_you_mean};
use crate::nodes::RemoteSpec;
use crate::recipe::Loader;
use crate::source::{Sources, SpanMap, ValuePath, parse_toml};

const TOP_LEVEL: &[&str] = &["remotes"];

/// A loaded configuration file.
#[derive(Debug, Clone, Default)]
pub struct UserConfig {
    /// The file it was read from (`None`: no file).
    pub file: Option<PathBuf>,
    /// Plain-path remotes are relative to this directory (the file's).
    pub dir: PathBuf,
    pub remotes: BTreeMap<String, RemoteSpec>,
}

impl UserConfig {
    /// Where the configuration file is (it may not exist).
    pub fn default_path() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("RUDDER_CONFIG").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(path));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|p| !p.is_empty())
                    .map(|home| PathBuf::from(home).join(".config"))
            })?;
        Some(base.join("rudder").join("config.toml"))
    }

    /// The configuration at [`UserConfig::default_path`]; empty when there is no file.
    pub fn load_default() -> Result<UserConfig, RecipeErrors> {
        match Self::default_path() {
            Some(path) => Self::load(&path),
            None => Ok(UserConfig::default()),
        }
    }

    /// Reads a configuration file, reporting every error with its location; a missing file is
    /// an empty configuration.
    pub fn load(path: &Path) -> Result<UserConfig, RecipeErrors> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(UserConfig::default());
            }
            Err(err) => {
                return Err(RecipeErrors::single(
                    Arc::new(Sources::default()),
                    Diagnostic::new(format!("cannot read {}: {err}", path.display())),
                ));
            }
        };
        let mut sources = Sources::default();
        let source = sources.add(path.display().to_string(), text.as_str());
        let mut spans = SpanMap::default();
        let root = ValuePath::root();
        let tree = match parse_toml(&text, source, &root, &mut spans) {
            Ok(tree) => tree,
            Err(err) => return Err(RecipeErrors::single(Arc::new(sources), err.into())),
        };
        let mut loader = Loader::new(&spans, Vec::new());
        let mut remotes = BTreeMap::new();
        if let Value::Object(top) = &tree {
            for key in top.keys() {
                if !TOP_LEVEL.contains(&key.as_str()) {
                    let loc = spans.key_or_value(&root.key(key));
                    loader.errors.push(
                        Diagnostic::new(format!("unknown table `{key}` in the configuration"))
                            .with_optional_label(loc, "here")
                            .with_optional_help(
                                did_you_mean(key, TOP_LEVEL.iter().copied()).or_else(|| {
                                    Some("the configuration has [remotes.NAME] tables".into())
                                }),
                            ),
                    );
                }
            }
            if let Some(value) = top.get("remotes") {
                remotes = loader.remotes(value, &root.key("remotes"));
            }
        }
        if !loader.errors.is_empty() {
            return Err(RecipeErrors::new(Arc::new(sources), loader.errors));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        Ok(UserConfig {
            file: Some(path.to_path_buf()),
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            remotes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<UserConfig, RecipeErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        UserConfig::load(&path)
    }

    #[test]
    fn remotes_load_with_their_default() {
        let config = load(
            "[remotes.team]\nurl = \"s3://bucket/rudder\"\ndefault = true\n\n[remotes.nfs]\nurl = \"/shared/rudder\"\n",
        )
        .unwrap();
        assert_eq!(config.remotes.len(), 2);
        assert!(config.remotes["team"].default);
        assert_eq!(config.remotes["nfs"].url, "/shared/rudder");
    }

    #[test]
    fn a_missing_file_is_empty() {
        let config = UserConfig::load(Path::new("/nonexistent/rudder/config.toml")).unwrap();
        assert!(config.remotes.is_empty());
        assert!(config.file.is_none());
    }

    #[test]
    fn credentials_are_refused_with_their_location() {
        let err = load("[remotes.team]\nurl = \"s3://b/p\"\nsecret_access_key = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.toml:3:1"), "{err}");
        assert!(err.contains("unknown key `secret_access_key`"), "{err}");
        assert!(err.contains("from the environment"), "{err}");
        let err = load("[remotes.team]\nurl = \"s3://AKIA:secret@bucket/p\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds credentials"), "{err}");
    }

    #[test]
    fn unknown_tables_are_errors() {
        let err = load("[remote.team]\nurl = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown table `remote`"), "{err}");
        assert!(err.contains("did you mean `remotes`"), "{err}");
    }
}
