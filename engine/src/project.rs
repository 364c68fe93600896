//! A recipe opened for work: the loaded recipe, its graph, and the store it uses.

use std::path::{Path, PathBuf};

use rudder_schema::{Backend, Recipe};

use crate::digest::DigestCache;
use crate::error::EngineError;
use crate::graph::Graph;
use crate::integrity::VerifyMode;
use crate::lockfile::Lockfile;
use crate::plan::{Plan, Planner, RemoteIndex, Selection};
use crate::runner::Registry;
use crate::store::Store;

pub struct Project {
    pub recipe: Recipe,
    pub graph: Graph,
    pub store: Store,
    /// How artifacts are checked before they count as cached (`--verify`).
    pub verify: VerifyMode,
}

impl Project {
    /// Loads the recipe (with `--set` overrides) and builds its graph. The store is `store`
    /// when given, else `.rudder/` beside the recipe.
    pub fn open(
        file: &Path,
        overrides: &[String],
        store: Option<PathBuf>,
    ) -> Result<Project, EngineError> {
        let recipe = Recipe::load(file, overrides)?;
        let graph = Graph::build(&recipe)?;
        let store = Store::new(store.unwrap_or_else(|| recipe.dir.join(".rudder")));
        Ok(Project {
            recipe,
            graph,
            store,
            verify: VerifyMode::default(),
        })
    }

    pub fn lockfile(&self) -> Result<Lockfile, EngineError> {
        Lockfile::read(&self.recipe.lockfile_path())
    }

    /// Keys every vertex and plans the selection against the lockfile.
    pub fn plan(
        &self,
        registry: &Registry,
        selection: &Selection,
        backend: Option<Backend>,
    ) -> Result<Plan, EngineError> {
        self.plan_with_remote(registry, selection, backend, None)
    }

    /// [`Project::plan`], with what is missing from the store looked up on a remote.
    pub fn plan_with_remote(
        &self,
        registry: &Registry,
        selection: &Selection,
        backend: Option<Backend>,
        remote: Option<&dyn RemoteIndex>,
    ) -> Result<Plan, EngineError> {
        let digests = if self.store.exists() {
            self.store.digest_cache()
        } else {
            DigestCache::in_memory()
        };
        let planner = Planner {
            recipe: &self.recipe,
            graph: &self.graph,
            registry,
            store: &self.store,
            digests: &digests,
            backend,
            verify: self.verify,
            remote,
        };
        let plan = planner.plan(selection, &self.lockfile()?)?;
        // Only a cache: failing to save it loses nothing but time.
        let _ = digests.save();
        Ok(plan)
    }
}
