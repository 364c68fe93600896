//! Every stage kind this crate runs, one module each, reading top to bottom as what the kind
//! does; [`register`] is the one list of them. Kinds import shared machinery (`inputs`,
//! `sampling`, `losses`, `train`, `rl`, `preference`, `artifacts`, `seeds`), never each other.
//!
//! Adding a kind: its parameters in `rudder_schema::kinds` (and one line in its `KINDS`), its
//! module here, and one line in [`register`]; the test below checks that every kind and part the
//! schema declares has a runner and that every runner runs a declared kind.

pub mod constitutional;
pub mod dpo;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod grpo;
pub mod iterative_dpo;
pub mod kto;
pub mod orpo;
pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod rloo;
pub mod sft;
pub mod simpo;
pub mod tokenizer;

use rudder_engine::Registry;

use crate::kind::{host_runner, runner};

/// Adds the runners of every stage kind built on Burn (and of their parts) to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(host_runner::<tokenizer::TokenizerKind>());
    registry.register(runner::<pretrain::Pretrain>());
    registry.register(runner::<sft::Sft>());
    registry.register(runner::<reward::Reward>());
    registry.register(runner::<dpo::Dpo>());
    registry.register(runner::<dpo::DpoRefLogps>());
    registry.register(runner::<kto::Kto>());
    registry.register(runner::<kto::KtoRefLogps>());
    registry.register(runner::<orpo::Orpo>());
    registry.register(runner::<simpo::Simpo>());
    registry.register(runner::<ppo::PpoKind>());
    registry.register(runner::<rloo::RlooKind>());
    registry.register(runner::<grpo::GrpoKind>());
    registry.register(runner::<iterative_dpo::IterativeDpo>());
    registry.register(runner::<iterative_dpo::Round>());
    registry.register(runner::<constitutional::Constitutional>());
    registry.register(runner::<generate::Generate>());
    registry.register(runner::<evaluate::Evaluate>());
    registry.register(host_runner::<export::Export>());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rudder_schema::kinds::{KINDS, part_kind};

    use super::*;

    #[test]
    fn every_declared_kind_and_part_has_a_runner_and_nothing_else_does() {
        let mut registry = Registry::new();
        rudder_engine::command::register(&mut registry);
        register(&mut registry);
        let declared: BTreeSet<String> = KINDS
            .iter()
            .flat_map(|k| {
                std::iter::once(k.name.to_owned())
                    .chain(k.parts.iter().map(|part| part_kind(k.name, part)))
            })
            .collect();
        let registered: BTreeSet<String> = registry.kinds().map(str::to_owned).collect();
        assert_eq!(declared, registered);
    }

    #[test]
    fn stage_keys_use_a_registered_implementation() {
        // A stage whose key comes from one of its parts (`iterative_dpo`, keyed as its last
        // round) must find that part's runner.
        let mut registry = Registry::new();
        register(&mut registry);
        for kind in KINDS.iter().filter(|k| k.name != "command") {
            let spec = (kind.parse)(serde_json::json!({})).expect("defaults parse");
            assert!(
                registry.get(&spec.key_kind()).is_some(),
                "no runner for the key kind of {}",
                kind.name
            );
        }
    }
}
