//! Which remote a command uses. Remotes are declared by name in the recipe (`[remotes.NAME]`)
//! and in the user's configuration file (`rudder_schema::UserConfig`); `--remote NAME_OR_URL`
//! (or `RUDDER_REMOTE`) names one or gives a URL or a path; otherwise the `default = true`
//! one is used, the recipe's before the configuration's.
//!
//! ```text
//!   --remote / RUDDER_REMOTE ─┬─ a declared name ─► that remote (the recipe's if both declare it)
//!                             └─ s3://…, file://…, a path ─► that URL
//!   neither ─► the recipe's default ─► the configuration's default ─► none
//! ```
//!
//! Credentials never appear here: `object_store` reads them from the environment.

use std::fmt;
use std::path::{Path, PathBuf};

use rudder_schema::{Recipe, RemoteSpec, UserConfig};

use crate::error::EngineError;

/// A remote chosen for a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// The declared name; `None` for a URL given on the command line.
    pub name: Option<String>,
    /// The URL, or an absolute directory for a shared filesystem.
    url: String,
    /// Where it was declared or given, for messages.
    pub origin: String,
}

/// Where a remote's objects are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Directory(PathBuf),
    Url(String),
}

impl RemoteTarget {
    /// A remote at `url` (a URL or a path, relative to `dir`).
    pub fn new(name: Option<String>, url: &str, dir: &Path, origin: String) -> RemoteTarget {
        let url = match url.split_once("://") {
            Some(_) => url.to_owned(),
            None => {
                let path = expand_home(url);
                let path = if path.is_absolute() {
                    path
                } else {
                    dir.join(path)
                };
                normalize(&path).display().to_string()
            }
        };
        RemoteTarget { name, url, origin }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> Location {
        match self.url.strip_prefix("file://") {
            Some(path) => Location::Directory(PathBuf::from(path)),
            None if !self.url.contains("://") => Location::Directory(PathBuf::from(&self.url)),
            None => Location::Url(self.url.clone()),
        }
    }
}

impl fmt::Display for RemoteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// One declared remote.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    spec: RemoteSpec,
    /// Plain paths are relative to this directory.
    dir: PathBuf,
    origin: String,
}

/// The remotes a command can use: the recipe's, then the user's configuration's.
#[derive(Debug, Clone, Default)]
pub struct Remotes {
    declared: Vec<Declared>,
}

impl Remotes {
    /// The remotes of `recipes` (in order) and of the user's configuration file.
    pub fn load(recipes: &[&Recipe]) -> Result<Remotes, EngineError> {
        let config = UserConfig::load_default()?;
        Ok(Self::from_parts(recipes, &config))
    }

    pub fn from_parts(recipes: &[&Recipe], config: &UserConfig) -> Remotes {
        let mut declared = Vec::new();
        for recipe in recipes {
            for (name, spec) in &recipe.remotes {
                declared.push(Declared {
                    name: name.clone(),
                    spec: spec.clone(),
                    dir: recipe.dir.clone(),
                    origin: recipe.file.display().to_string(),
                });
            }
        }
        if let Some(file) = &config.file {
            for (name, spec) in &config.remotes {
                declared.push(Declared {
                    name: name.clone(),
                    spec: spec.clone(),
                    dir: config.dir.clone(),
                    origin: file.display().to_string(),
                });
            }
        }
        Remotes { declared }
    }

    fn target(declared: &Declared) -> RemoteTarget {
        RemoteTarget::new(
            Some(declared.name.clone()),
            &declared.spec.url,
            &declared.dir,
            declared.origin.clone(),
        )
    }

    /// The remote `asked` names (a declared name, a URL or a path), else the default one.
    pub fn choose(&self, asked: Option<&str>) -> Result<Option<RemoteTarget>, EngineError> {
        let Some(asked) = asked.map(str::trim).filter(|a| !a.is_empty()) else {
            return Ok(self
                .declared
                .iter()
                .find(|d| d.spec.default)
                .map(Self::target));
        };
        if let Some(declared) = self.declared.iter().find(|d| d.name == asked) {
            return Ok(Some(Self::target(declared)));
        }
        let is_location = asked.contains("://")
            || asked.contains('/')
            || asked.starts_with('.')
            || asked.starts_with('~');
        if is_location {
            rudder_schema::recipe::check_remote_url(asked)
                .map_err(|message| EngineError::Usage(format!("--remote {asked}: {message}")))?;
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            return Ok(Some(RemoteTarget::new(
                None,
                asked,
                &cwd,
                "the command line".into(),
            )));
        }
        let names: Vec<&str> = self.declared.iter().map(|d| d.name.as_str()).collect();
        let hint = rudder_schema::diagnostic::did_you_mean(asked, names.iter().copied())
            .map(|h| format!(" ({h})"))
            .unwrap_or_else(|| {
                if names.is_empty() {
                    " (no remote is declared: add [remotes.NAME] url = \"...\" to the recipe or to the configuration file, or give a URL)".to_owned()
                } else {
                    format!(" (declared: {})", names.join(", "))
                }
            });
        Err(EngineError::Usage(format!(
            "no remote named `{asked}`{hint}"
        )))
    }

    /// [`Remotes::choose`], where a command cannot go on without a remote.
    pub fn require(&self, asked: Option<&str>) -> Result<RemoteTarget, EngineError> {
        self.choose(asked)?.ok_or_else(|| {
            EngineError::Usage(format!(
                "no remote given and none is the default: pass --remote NAME_OR_URL, set RUDDER_REMOTE, or mark one `default = true` in [remotes.NAME] (in the recipe or in {})",
                UserConfig::default_path()
                    .map_or_else(|| "the configuration file".to_owned(), |p| p.display().to_string())
            ))
        })
    }
}

/// `~/x` as `$HOME/x`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// `a/./b/../c` as `a/c`, without touching the filesystem (the directory may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(remotes: &[(&str, &str, bool)]) -> UserConfig {
        UserConfig {
            file: Some(PathBuf::from("/home/me/.config/rudder/config.toml")),
            dir: PathBuf::from("/home/me/.config/rudder"),
            remotes: remotes
                .iter()
                .map(|(name, url, default)| {
                    (
                        (*name).to_owned(),
                        RemoteSpec {
                            url: (*url).to_owned(),
                            default: *default,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn names_urls_and_the_default() {
        let remotes = Remotes::from_parts(
            &[],
            &config(&[
                ("team", "s3://bucket/rudder", true),
                ("nfs", "../shared", false),
            ]),
        );
        let default = remotes.choose(None).unwrap().unwrap();
        assert_eq!(default.to_string(), "team (s3://bucket/rudder)");
        assert_eq!(
            default.location(),
            Location::Url("s3://bucket/rudder".into())
        );
        let nfs = remotes.choose(Some("nfs")).unwrap().unwrap();
        assert_eq!(
            nfs.location(),
            Location::Directory(PathBuf::from("/home/me/.config/shared"))
        );
        let url = remotes.choose(Some("file:///srv/store")).unwrap().unwrap();
        assert_eq!(url.name, None);
        assert_eq!(url.location(), Location::Directory("/srv/store".into()));
        let err = remotes.choose(Some("teem")).unwrap_err().to_string();
        assert!(err.contains("did you mean `team`"), "{err}");
        let err = remotes.choose(Some("http://x/y")).unwrap_err().to_string();
        assert!(err.contains("unsupported remote scheme"), "{err}");
    }

    #[test]
    fn without_a_default_a_remote_must_be_named() {
        let remotes = Remotes::from_parts(&[], &config(&[("nfs", "/shared", false)]));
        assert_eq!(remotes.choose(None).unwrap(), None);
        let err = remotes.require(None).unwrap_err().to_string();
        assert!(err.contains("--remote"), "{err}");
    }
}
