//! The committed example recipes plan to the keys of their committed lockfiles: a store built
//! by an earlier release stays fully cached after a change that is not meant to change what any
//! stage computes. A deliberate change of an artifact bumps its kind's implementation version,
//! and the lockfiles are then regenerated with it.

mod common;

use std::path::{Path, PathBuf};

use rudder_engine::lockfile::Lockfile;

/// Recipes whose model is given on the command line (`--set models.base.hf=PATH`, a real model
/// the repository does not hold): they cannot be planned here.
const EXTERNAL_MODEL: &[&str] = &["chat.toml"];

fn recipes() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter(|p| !EXTERNAL_MODEL.contains(&p.file_name().unwrap().to_str().unwrap()))
        .collect();
    recipes.sort();
    recipes
}

#[test]
fn every_recipe_plans_to_the_keys_of_its_lockfile() {
    let store = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for recipe in recipes() {
        let lock_path = recipe.with_extension("lock");
        let lock = Lockfile::read(&lock_path).unwrap();
        assert!(
            !lock.nodes.is_empty(),
            "{} has no committed lockfile",
            recipe.display()
        );
        let out = common::rudder_in(
            store.path(),
            &[
                "plan",
                recipe.to_str().unwrap(),
                "--json",
                "--store",
                store.path().to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "plan {}: {}",
            recipe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let nodes = plan["nodes"].as_array().unwrap();
        assert_eq!(
            nodes.len(),
            lock.nodes.len(),
            "{}: the plan and the lockfile have different nodes",
            recipe.display()
        );
        for node in nodes {
            let name = node["name"].as_str().unwrap();
            let entry = lock
                .entry(name)
                .unwrap_or_else(|| panic!("{}: `{name}` is not in the lockfile", recipe.display()));
            assert_eq!(
                node["key"].as_str().unwrap(),
                entry.key,
                "{}: the key of `{name}` differs from the lockfile's",
                recipe.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} nodes checked");
}
