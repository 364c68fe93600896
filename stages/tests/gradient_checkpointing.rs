//! `gradient_checkpointing = true` trains on Burn's checkpointing device, which recomputes
//! memory-bound activations in the backward pass: the gradients, and so the whole run, must be
//! those of training without it (which is why the setting is not part of a stage's key).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::model::{CausalLm, load_causal_lm, lora};
use rudder_stages::padding::Pad;
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{
    NoHooks, Objective, ScheduleKind, SftObjective, SftSequence, TrainConfig, train,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn sequences() -> Vec<SftSequence> {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    sft::tokenize(
        &tokenizer,
        &rows.sft_examples("text").unwrap(),
        &SftTokenization::default(),
    )
    .unwrap()
}

/// Every gradient of the first step, flattened in module order.
fn gradients(model: &CausalLm, seqs: &[SftSequence], device: &Device) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.push(g.into_data().try_to_vec::<f32>().unwrap());
            }
        }
    }
    let refs: Vec<&SftSequence> = seqs.iter().collect();
    let out = SftObjective { pad: Pad::exact(0) }
        .forward(model, &refs, device)
        .unwrap();
    let grads = GradientsParams::from_grads(out.loss_sum.backward(), model);
    let mut visitor = Collect {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

/// Step-1 gradients, per-step (loss, grad_norm), and the gradients after training.
type Run = (Vec<Vec<f32>>, Vec<(f64, f64)>, Vec<Vec<f32>>);

fn run(device: &Device, adapters: bool) -> Run {
    let seqs = sequences();
    let (_, model) = load_causal_lm(&fixtures().join("policy"), device).unwrap();
    let model = if adapters {
        let args = rudder_schema::kinds::LoraArgs {
            target_modules: rudder_schema::kinds::TargetModules::AllLinear(
                rudder_schema::kinds::AllLinear::AllLinear,
            ),
            ..Default::default()
        };
        lora::attach(model, &args, 1).unwrap()
    } else {
        model
    };
    let step1 = gradients(&model, &seqs, device);
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        batch_size: 8,
        max_steps: Some(3),
        schedule: ScheduleKind::Constant,
        ..TrainConfig::default()
    };
    let (model, report) = train(
        &SftObjective { pad: Pad::exact(0) },
        model,
        &seqs,
        &cfg,
        device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let steps = report.steps.iter().map(|s| (s.loss, s.grad_norm)).collect();
    let after = gradients(&model, &seqs, device);
    (step1, steps, after)
}

#[test]
fn checkpointing_gives_the_same_gradients_and_run() {
    let plain = rudder_stages::test_device().autodiff();
    let checkpointed = rudder_stages::test_device()
        .autodiff()
        .gradient_checkpointing();
    assert!(checkpointed.gradient_checkpointing_strategy().is_some());
    for adapters in [false, true] {
        let (g0, s0, a0) = run(&plain, adapters);
        let (g1, s1, a1) = run(&checkpointed, adapters);
        assert_eq!(g0.len(), if adapters { 28 } else { 21 });
        assert_eq!(g0, g1, "step-1 gradients differ (adapters: {adapters})");
        assert_eq!(
            s0, s1,
            "losses or gradient norms differ (adapters: {adapters})"
        );
        assert_eq!(
            a0, a1,
            "gradients after training differ (adapters: {adapters})"
        );
    }
}
