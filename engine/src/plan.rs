//! The plan: which vertices run and why.
//!
//! Every vertex is keyed first (`keying.rs`). A stage runs when its key is not in the store (or it is forced). The reasons are
//! found by comparing the new lockfile entry with the one from the last successful run:
//!
//! ```text
//!   beta: 0.1 -> 0.2                  a parameter changed
//!   data prefs changed (content)      an input dataset or model changed
//!   input sft will be rebuilt         an upstream stage runs in this plan
//!   implementation of dpo changed     the kind's implementation version changed
//!   not in store                      same key as before, but the artifact is gone
//!   corrupted (file x: digest mismatch)  the artifact no longer matches its manifest
//! ```
//!
//! Every artifact the plan would count as cached is checked against its manifest first
//! (cheaply, or by hashing every file with `--verify full`): a corrupted one runs again.
//! With a remote store ([`RemoteIndex`]), a stage whose key is not in the store (or whose
//! artifact there is corrupted) but on the remote is `remote`: it is fetched, not built (unless
//! forced, or what it writes outside the store is gone). An input that a selection leaves out and that only the remote holds is
//! fetched too, so it appears in the plan as `remote`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use petgraph::graph::NodeIndex;
use rudder_schema::{Backend, NodeBody, Recipe};
use serde_json::{Value, json};

use crate::digest::DigestCache;
use crate::error::EngineError;
use crate::graph::{Graph, Source};
use crate::integrity::{Problem, VerifyMode};
use crate::key::Key;
pub use crate::keying::Keyed;
use crate::lockfile::{LockEntry, Lockfile};
use crate::runner::Registry;
use crate::store::{Health, Store};

/// Which vertices a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these nodes (with their parts); their inputs must already be in the store.
    pub only: Vec<String>,
    /// This node and everything it depends on.
    pub until: Option<String>,
    /// Re-run these even if cached.
    pub force: Vec<String>,
    pub force_all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Cached,
    Run,
    /// Not in the store, but on the remote: fetched instead of built.
    Remote,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::Run => "run",
            State::Remote => "remote",
        }
    }
}

/// A second store that artifacts missing from the local one may be fetched from (a remote).
pub trait RemoteIndex: Sync {
    /// How the plan names it (`team`).
    fn name(&self) -> &str;
    /// Which of `keys` it holds. An error (it is unreachable) is the plan's warning, and the
    /// stages are planned as if it held none.
    fn holds(&self, keys: &[Key]) -> Result<BTreeSet<Key>, String>;
}

/// Why a vertex runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    NotInStore,
    /// The artifact is in the store but does not match its manifest: what is wrong.
    Corrupted(String),
    /// Not in the store; the remote of this name has it.
    OnRemote(String),
    Forced,
    /// The stage's artifact is in the store but a path it writes outside the store is gone.
    ExternalMissing(String),
    /// A parameter (or seed, backend, precision) changed; `None` is "unset / default".
    Param {
        name: String,
        old: Option<String>,
        new: Option<String>,
    },
    /// An input dataset, model or file changed: what changed ("content" or "settings").
    InputChanged {
        role: String,
        node: String,
        what: &'static str,
    },
    /// An upstream stage runs in this plan.
    InputRebuilt {
        role: String,
        node: String,
    },
    /// An upstream stage's key changed, but its artifact is already in the store.
    InputSwitched {
        role: String,
        node: String,
    },
    InputAdded {
        role: String,
    },
    InputRemoved {
        role: String,
    },
    DepChanged {
        path: String,
    },
    ImplementationChanged {
        kind: String,
        old: u32,
        new: u32,
    },
}

impl Reason {
    fn corrupted(problems: &[Problem]) -> Reason {
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        Reason::Corrupted(shown.join(", "))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(default)".into());
        match self {
            Reason::NotInStore => write!(f, "not in store"),
            Reason::Corrupted(problems) => write!(f, "corrupted ({problems})"),
            Reason::OnRemote(remote) => write!(f, "on remote {remote}"),
            Reason::Forced => write!(f, "forced"),
            Reason::ExternalMissing(path) => write!(f, "{path} is missing"),
            Reason::Param { name, old, new } => write!(f, "{name}: {} -> {}", show(old), show(new)),
            Reason::InputChanged { role, node, what } => {
                write!(f, "{role} {node} changed ({what})")
            }
            Reason::InputRebuilt { node, .. } => write!(f, "input {node} will be rebuilt"),
            Reason::InputSwitched { node, .. } => write!(f, "input {node} changed"),
            Reason::InputAdded { role } => write!(f, "input {role} added"),
            Reason::InputRemoved { role } => write!(f, "input {role} removed"),
            Reason::DepChanged { path } => write!(f, "dependency {path} changed (content)"),
            Reason::ImplementationChanged { kind, old, new } => {
                write!(f, "implementation of {kind} changed (v{old} -> v{new})")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlanEntry {
    pub index: NodeIndex,
    pub name: String,
    pub kind: String,
    pub key: Key,
    pub state: State,
    pub reasons: Vec<Reason>,
    pub is_source: bool,
}

#[derive(Debug)]
pub struct Plan {
    pub recipe: PathBuf,
    pub entries: Vec<PlanEntry>,
    /// Keys of every vertex of the graph (also those outside the selection).
    pub keyed: BTreeMap<NodeIndex, Keyed>,
    /// Why the remote could not be asked (it is unreachable); the plan then builds locally.
    pub remote_warning: Option<String>,
}

impl Plan {
    pub fn to_run(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries.iter().filter(|e| e.state == State::Run)
    }

    /// The entries to fetch from the remote, one per key.
    pub fn to_fetch(&self) -> Vec<&PlanEntry> {
        let mut seen = BTreeSet::new();
        self.entries
            .iter()
            .filter(|e| e.state == State::Remote && seen.insert(e.key))
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "recipe": self.recipe.display().to_string(),
            "nodes": self.entries.iter().map(|e| json!({
                "name": e.name,
                "kind": e.kind,
                "key": e.key.to_hex(),
                "state": e.state.as_str(),
                "reasons": e.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Computes keys and plans.
pub struct Planner<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a Graph,
    pub registry: &'a Registry,
    pub store: &'a Store,
    pub digests: &'a DigestCache,
    /// `--backend`, which wins over the recipe.
    pub backend: Option<Backend>,
    /// How cached artifacts are checked before they count as cached.
    pub verify: VerifyMode,
    /// Where artifacts missing from the store may be fetched from.
    pub remote: Option<&'a dyn RemoteIndex>,
}

impl<'a> Planner<'a> {
    /// The first path outside the store that a stage writes and that does not exist.
    fn missing_external_output(&self, index: NodeIndex) -> Option<String> {
        let vertex = self.graph.vertex(index);
        if vertex.is_part() {
            return None;
        }
        let NodeBody::Stage(stage) = &self.recipe.nodes[vertex.node].body else {
            return None;
        };
        stage
            .spec
            .external_outputs()
            .into_iter()
            .find(|path| !self.recipe.dir.join(path).exists())
    }

    /// The plan for a selection, with reasons compared to the lockfile.
    pub fn plan(&self, selection: &Selection, lock: &Lockfile) -> Result<Plan, EngineError> {
        let keyed = self.keys()?;
        let resolve = |name: &str| -> Result<NodeIndex, EngineError> {
            self.graph.index(name).ok_or_else(|| {
                let names: Vec<&str> = self
                    .graph
                    .order
                    .iter()
                    .map(|&i| self.graph.vertex(i).name.as_str())
                    .collect();
                let hint = rudder_schema::diagnostic::did_you_mean(name, names.iter().copied())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                EngineError::Usage(format!("no node named `{name}` in the recipe{hint}"))
            })
        };
        let mut considered: BTreeSet<NodeIndex> = BTreeSet::new();
        if !selection.only.is_empty() {
            for name in &selection.only {
                considered.extend(self.graph.with_parts(resolve(name)?));
            }
        }
        if let Some(until) = &selection.until {
            considered.extend(self.graph.ancestors(resolve(until)?));
        }
        if selection.only.is_empty() && selection.until.is_none() {
            considered.extend(self.graph.order.iter().copied());
        }
        let mut forced: BTreeSet<NodeIndex> = BTreeSet::new();
        for name in &selection.force {
            forced.extend(self.graph.with_parts(resolve(name)?));
        }
        // Whether each vertex's artifact can be used: checked for those the plan acts on.
        let mut usable: BTreeMap<NodeIndex, (bool, Option<Vec<Problem>>)> = BTreeMap::new();
        for &index in &self.graph.order {
            let k = &keyed[&index];
            let health = if k.is_source {
                (true, None)
            } else if considered.contains(&index) {
                match self.store.check(&k.key, self.verify) {
                    Health::Intact => (true, None),
                    Health::Missing => (false, None),
                    Health::Corrupted(problems) => (false, Some(problems)),
                }
            } else {
                (self.store.contains(&k.key), None)
            };
            usable.insert(index, health);
        }
        let (on_remote, remote_warning) = self.ask_remote(&keyed, &usable);
        let mut entries: Vec<PlanEntry> = Vec::new();
        let mut states: BTreeMap<NodeIndex, State> = BTreeMap::new();
        for &index in &self.graph.order {
            let k = &keyed[&index];
            let (in_store, corrupted) = usable.remove(&index).expect("every vertex checked");
            let force = !k.is_source && (selection.force_all || forced.contains(&index));
            let missing = self.missing_external_output(index);
            let state = if considered.contains(&index) && (force || !in_store || missing.is_some())
            {
                if !force && !in_store && missing.is_none() && on_remote.contains(&k.key) {
                    State::Remote
                } else {
                    State::Run
                }
            } else {
                State::Cached
            };
            states.insert(index, state);
            if !considered.contains(&index) {
                continue;
            }
            let mut reasons = Vec::new();
            if state == State::Remote {
                // A corrupted artifact is fetched whole from the remote in its place.
                if let Some(problems) = &corrupted {
                    reasons.push(Reason::corrupted(problems));
                }
                let remote = self.remote.map_or("", |r| r.name()).to_owned();
                reasons.push(Reason::OnRemote(remote));
                let old = lock.entry(&k.entry.name);
                reasons.extend(
                    self.reasons(index, &k.entry, old, lock, &keyed, &states)
                        .into_iter()
                        .filter(|r| *r != Reason::NotInStore),
                );
            }
            if state == State::Run {
                if force {
                    reasons.push(Reason::Forced);
                }
                let old = lock.entry(&k.entry.name);
                if let Some(problems) = &corrupted {
                    reasons.push(Reason::corrupted(problems));
                } else if let (Some(path), true, false) = (&missing, in_store, force) {
                    // The artifact is built; only what it wrote outside the store is gone.
                    reasons.push(Reason::ExternalMissing(path.clone()));
                } else if !force || old.is_some_and(|o| o.key != k.entry.key) {
                    reasons.extend(self.reasons(index, &k.entry, old, lock, &keyed, &states));
                }
            }
            entries.push(PlanEntry {
                index,
                name: k.entry.name.clone(),
                kind: k.entry.kind.clone(),
                key: k.key,
                state,
                reasons,
                is_source: k.is_source,
            });
        }
        // A selection that leaves out an input stage needs that input's artifact already built,
        // or on the remote (then it is fetched).
        let mut fetched_inputs: BTreeSet<NodeIndex> = BTreeSet::new();
        for entry in entries.iter().filter(|e| e.state == State::Run) {
            for input in &self.graph.vertex(entry.index).inputs {
                if let Source::Vertex { index, .. } = input.source
                    && !considered.contains(&index)
                    && !keyed[&index].is_source
                    && !self.store.contains(&keyed[&index].key)
                {
                    if on_remote.contains(&keyed[&index].key) {
                        fetched_inputs.insert(index);
                        continue;
                    }
                    return Err(EngineError::Usage(format!(
                        "`{}` needs `{}`, which is not in the store and not selected; run it first, or use --until {}",
                        entry.name,
                        self.graph.vertex(index).name,
                        entry.name
                    )));
                }
            }
        }
        if !fetched_inputs.is_empty() {
            let remote = self.remote.map_or("", |r| r.name()).to_owned();
            for &index in &fetched_inputs {
                let k = &keyed[&index];
                entries.push(PlanEntry {
                    index,
                    name: k.entry.name.clone(),
                    kind: k.entry.kind.clone(),
                    key: k.key,
                    state: State::Remote,
                    reasons: vec![Reason::OnRemote(remote.clone())],
                    is_source: false,
                });
            }
            let position: BTreeMap<NodeIndex, usize> = self
                .graph
                .order
                .iter()
                .enumerate()
                .map(|(i, &index)| (index, i))
                .collect();
            entries.sort_by_key(|e| position[&e.index]);
        }
        Ok(Plan {
            recipe: self.recipe.file.clone(),
            entries,
            keyed,
            remote_warning,
        })
    }

    /// The keys the remote holds among those the store lacks or holds corrupted, and a warning
    /// if it could not be asked.
    fn ask_remote(
        &self,
        keyed: &BTreeMap<NodeIndex, Keyed>,
        usable: &BTreeMap<NodeIndex, (bool, Option<Vec<Problem>>)>,
    ) -> (BTreeSet<Key>, Option<String>) {
        let Some(remote) = self.remote else {
            return (BTreeSet::new(), None);
        };
        let missing: Vec<Key> = keyed
            .iter()
            .filter(|(index, k)| !k.is_source && !usable[*index].0)
            .map(|(_, k)| k.key)
            .collect::<BTreeSet<Key>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return (BTreeSet::new(), None);
        }
        match remote.holds(&missing) {
            Ok(held) => (held, None),
            Err(warning) => (BTreeSet::new(), Some(warning)),
        }
    }

    fn reasons(
        &self,
        index: NodeIndex,
        new: &LockEntry,
        old: Option<&LockEntry>,
        lock: &Lockfile,
        keyed: &BTreeMap<NodeIndex, Keyed>,
        states: &BTreeMap<NodeIndex, State>,
    ) -> Vec<Reason> {
        let Some(old) = old else {
            return vec![Reason::NotInStore];
        };
        if old.key == new.key {
            return vec![Reason::NotInStore];
        }
        let mut reasons = Vec::new();
        if let (Some(o), Some(n)) = (old.implementation, new.implementation)
            && o != n
        {
            reasons.push(Reason::ImplementationChanged {
                kind: new.kind.clone(),
                old: o,
                new: n,
            });
        }
        diff_values("", &old.params, &new.params, &mut reasons);
        let scalar =
            |name: &str, o: Option<String>, n: Option<String>, reasons: &mut Vec<Reason>| {
                if o != n {
                    reasons.push(Reason::Param {
                        name: name.into(),
                        old: o,
                        new: n,
                    });
                }
            };
        scalar(
            "seed",
            old.seed.map(|s| s.to_string()),
            new.seed.map(|s| s.to_string()),
            &mut reasons,
        );
        scalar(
            "backend",
            old.backend.clone(),
            new.backend.clone(),
            &mut reasons,
        );
        scalar(
            "precision",
            old.precision.clone(),
            new.precision.clone(),
            &mut reasons,
        );
        let vertex = self.graph.vertex(index);
        for input in &vertex.inputs {
            let Some(new_key) = new.inputs.get(&input.role) else {
                continue;
            };
            let node_name = match &input.source {
                Source::Vertex { index, .. } => self.graph.vertex(*index).name.clone(),
                Source::File(path) => path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            match old.inputs.get(&input.role) {
                None => reasons.push(Reason::InputAdded {
                    role: input.role.clone(),
                }),
                Some(old_key) if old_key == new_key => {}
                Some(old_key) => match &input.source {
                    Source::Vertex { index: from, .. } if !keyed[from].is_source => {
                        if states.get(from) == Some(&State::Run) {
                            reasons.push(Reason::InputRebuilt {
                                role: input.role.clone(),
                                node: node_name,
                            });
                        } else {
                            reasons.push(Reason::InputSwitched {
                                role: input.role.clone(),
                                node: node_name,
                            });
                        }
                    }
                    Source::Vertex { index: from, .. } => {
                        let before = lock.by_key(old_key.split('/').next().unwrap_or(old_key));
                        let what = match before {
                            Some(b) if b.outputs == keyed[from].entry.outputs => "settings",
                            _ => "content",
                        };
                        reasons.push(Reason::InputChanged {
                            role: input.role.clone(),
                            node: node_name,
                            what,
                        });
                    }
                    Source::File(_) => reasons.push(Reason::InputChanged {
                        role: input.role.clone(),
                        node: node_name,
                        what: "content",
                    }),
                },
            }
        }
        for role in old.inputs.keys() {
            if !new.inputs.contains_key(role) {
                reasons.push(Reason::InputRemoved { role: role.clone() });
            }
        }
        for (path, digest) in &new.deps {
            if old.deps.get(path) != Some(digest) {
                reasons.push(Reason::DepChanged { path: path.clone() });
            }
        }
        if reasons.is_empty() {
            // Only settings outside the lockfile changed (e.g. the key scheme itself).
            reasons.push(Reason::NotInStore);
        }
        // Two roles can read the same upstream node (`split.train`, `split.eval`): say it once.
        let mut unique: Vec<Reason> = Vec::with_capacity(reasons.len());
        for reason in reasons {
            if !unique.iter().any(|r| r.to_string() == reason.to_string()) {
                unique.push(reason);
            }
        }
        unique
    }
}

/// Parameter differences as `a.b: old -> new`, recursing into tables.
pub(crate) fn diff_values(prefix: &str, old: &Value, new: &Value, reasons: &mut Vec<Reason>) {
    let name = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (key, new_value) in n {
                match o.get(key) {
                    Some(old_value) => diff_values(&name(key), old_value, new_value, reasons),
                    None => reasons.push(Reason::Param {
                        name: name(key),
                        old: None,
                        new: Some(render(new_value)),
                    }),
                }
            }
            for (key, old_value) in o {
                if !n.contains_key(key) {
                    reasons.push(Reason::Param {
                        name: name(key),
                        old: Some(render(old_value)),
                        new: None,
                    });
                }
            }
        }
        (o, n) if o != n => reasons.push(Reason::Param {
            name: prefix.to_owned(),
            old: Some(render(o)),
            new: Some(render(n)),
        }),
        _ => {}
    }
}

/// A value as the recipe would write it.
fn render(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_nested_changes() {
        let mut reasons = Vec::new();
        diff_values(
            "",
            &json!({"beta": 0.1, "env": {"A": "1"}, "gone": 3}),
            &json!({"beta": 0.2, "env": {"A": "2"}, "new": true}),
            &mut reasons,
        );
        let shown: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "beta: 0.1 -> 0.2",
                "env.A: \"1\" -> \"2\"",
                "new: (default) -> true",
                "gone: 3 -> (default)"
            ]
        );
    }
}
