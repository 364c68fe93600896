//! LoRA tables a stage takes from the adapter it continues, after the recipe is loaded and
//! its inputs resolved.

use std::path::Path;

use serde_json::Value;

use super::Loader;
use crate::diagnostic::Diagnostic;
use crate::kinds::kind_info;
use crate::recipe::{NodeBody, Recipe, Target};
use crate::source::ValuePath;

/// A stage that continues adapters, without `lora` and without `merge_adapter`, whose `model`
/// is base + an adapter its kind continues (a LoRA stage's, [`continues_adapter_of`], or a
/// model node's `adapter`), continues that adapter: it takes that stage's `lora` table, or the
/// settings of the adapter's `adapter_config.json`, as TRL trains a `PeftModel` further when
/// given no `peft_config`. The table becomes the stage's own parameter, so its key is the key
/// of the same table written out, and it is checked as a written one would be. A chain (`sft`
/// -> `dpo` -> `kto`, the later ones without `lora`) passes it on. An adapter config that
/// cannot be read leaves the stage as it is: the run reports the file when it reads the
/// adapter.
impl Loader<'_> {
    pub(super) fn inherit_lora(&mut self, recipe: &mut Recipe) {
        use crate::kinds::{continues_adapter_of, continues_adapters};
        // Stages whose inherited table was refused (reported once).
        let mut refused = std::collections::HashSet::new();
        // One pass per link of the longest chain.
        for _ in 0..recipe.nodes.len() {
            let mut inherited: Vec<(usize, String, crate::kinds::LoraArgs)> = Vec::new();
            for (i, node) in recipe.nodes.iter().enumerate() {
                let NodeBody::Stage(stage) = &node.body else {
                    continue;
                };
                let Some(train) = stage.spec.train_args() else {
                    continue;
                };
                if refused.contains(&i)
                    || train.lora.is_some()
                    || train.merge_adapter
                    || !continues_adapters(stage.spec.kind())
                {
                    continue;
                }
                let upstream = stage
                    .inputs
                    .iter()
                    .find(|input| input.field.role == "model")
                    .and_then(|input| match &input.target {
                        Target::Node { name, .. } => recipe.node(name),
                        Target::Path(_) => None,
                    });
                let Some(upstream) = upstream else {
                    continue;
                };
                let lora = match &upstream.body {
                    NodeBody::Stage(from)
                        if continues_adapter_of(stage.spec.kind(), from.spec.kind()) =>
                    {
                        from.spec.train_args().and_then(|t| t.lora.clone())
                    }
                    NodeBody::Model(model) => model
                        .spec
                        .adapter
                        .as_ref()
                        .and_then(|dir| peft_lora(&recipe.dir.join(dir), stage.spec.kind())),
                    _ => None,
                };
                if let Some(lora) = lora {
                    inherited.push((i, upstream.name.clone(), lora));
                }
            }
            if inherited.is_empty() {
                return;
            }
            for (i, from, lora) in inherited {
                let node = &mut recipe.nodes[i];
                let NodeBody::Stage(stage) = &mut node.body else {
                    continue;
                };
                let context = format!(
                    "stage `{}` continues the LoRA adapter of `{from}` with its settings (it has no `lora` of its own)",
                    node.name
                );
                let mut params = stage.spec.params();
                params["lora"] = serde_json::to_value(&lora).expect("a lora table serialises");
                let kind = kind_info(stage.spec.kind()).expect("a loaded stage has a known kind");
                let spec = match (kind.parse)(params) {
                    Ok(spec) => spec,
                    Err(err) => {
                        self.error(
                            &node.path,
                            format!("{context}, which are invalid: {err}"),
                            "this stage",
                        );
                        refused.insert(i);
                        continue;
                    }
                };
                // Only what the table adds: the stage's own errors are reported already.
                let before: Vec<(ValuePath, String)> = stage
                    .spec
                    .check()
                    .into_iter()
                    .map(|e| (e.path, e.message))
                    .collect();
                let errors: Vec<_> = spec
                    .check()
                    .into_iter()
                    .filter(|e| !before.iter().any(|(p, m)| *p == e.path && *m == e.message))
                    .collect();
                if !errors.is_empty() {
                    for e in errors {
                        let mut at = node.path.clone();
                        at.0.extend(e.path.0);
                        if self.spans.value(&at).is_none() {
                            at = node.path.key("model");
                        }
                        self.errors.push(
                            Diagnostic::new(format!("{context}; {}", e.message))
                                .with_optional_label(self.spans.key_or_value(&at), "here")
                                .with_help(
                                    "set `merge_adapter = true` to train the merged model in full, or write a `lora` table",
                                ),
                        );
                    }
                    refused.insert(i);
                    continue;
                }
                stage.spec = spec;
            }
        }
    }
}

/// The LoRA settings of the PEFT adapter in `dir`, when a stage of `kind` continues it: a
/// causal-LM adapter by every kind that continues adapters, a sequence-classification one by
/// `reward` only (a language-model kind merges a reward model's adapter).
fn peft_lora(dir: &Path, kind: &str) -> Option<crate::kinds::LoraArgs> {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).ok()?;
    let config: Value = serde_json::from_str(&text).ok()?;
    let reward_adapter = config.get("task_type").and_then(Value::as_str) == Some("SEQ_CLS");
    if reward_adapter && kind != "reward" {
        return None;
    }
    crate::kinds::LoraArgs::from_peft_config(&config).ok()
}
