//! Parity of whole training runs with TRL 1.16 (../shared/fixtures): 20 AdamW steps of SFT from
//! `policy/` on `sft.jsonl` and of a Bradley-Terry reward model from `rm_init/` on
//! `prefs.jsonl`, batch 16 (the whole dataset), constant lr 1e-3, no clipping, no shuffling.
//! Every step's loss and gradient norm and the final parameters are compared with the
//! reference run, and the tokenised rows with TRL's.

use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::reward::{self, RewardObjective, pair_rewards};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::model::{load_causal_lm, load_reward_model, save_causal_lm, save_reward_model};
use rudder_stages::padding::Pad;
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::SftObjective;
use rudder_stages::train::{MetricsWriter, NoHooks, ScheduleKind, TrainConfig, train};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-3,
        batch_size: 16,
        max_steps: Some(20),
        schedule: ScheduleKind::Constant,
        max_grad_norm: 0.0,
        shuffle: false,
        ..TrainConfig::default()
    }
}

/// Per-tensor (L2, sum) of the gradient of `loss`, by Hugging Face parameter name (Burn's module
/// paths are the same names but for the `base` of each linear layer; the transposed Linear
/// layout changes neither statistic).
fn grad_summary<M: burn::module::Module>(
    model: &M,
    loss: burn::tensor::Tensor<1>,
) -> BTreeMap<String, (f64, f64)> {
    struct Summary<'a> {
        grads: &'a burn::optim::GradientsParams,
        path: Vec<String>,
        out: BTreeMap<String, (f64, f64)>,
    }
    impl burn::module::ModuleVisitor for Summary<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            let g = self
                .grads
                .get::<D>(param.id)
                .expect("every parameter has a gradient");
            let values: Vec<f64> = g
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let l2 = values.iter().map(|x| x * x).sum::<f64>().sqrt();
            // A linear layer's weight sits under its `LoraLinear`'s `base`.
            let name = self.path.join(".").replace(".base.", ".");
            self.out.insert(name, (l2, values.iter().sum()));
        }
    }
    let grads = burn::optim::GradientsParams::from_grads(loss.backward(), model);
    let mut v = Summary {
        grads: &grads,
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Per-tensor (L2, sum) of a saved model directory, in f64.
fn param_summary(dir: &Path) -> BTreeMap<String, (f64, f64)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f64> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            let l2 = values.iter().map(|x| x * x).sum::<f64>().sqrt();
            (name, (l2, values.iter().sum()))
        })
        .collect()
}

/// Largest relative differences of (L2, sum) against the fixture; a sum is measured relative to
/// the larger of itself and the tensor's L2 norm, since signed values can cancel to near zero.
fn compare_params(ours: &BTreeMap<String, (f64, f64)>, reference: &Value) -> (f64, f64) {
    let reference = reference.as_object().unwrap();
    assert_eq!(ours.len(), reference.len(), "same tensors");
    let (mut l2_err, mut sum_err) = (0f64, 0f64);
    for (name, r) in reference {
        let (l2, sum) = ours.get(name).unwrap_or_else(|| panic!("{name} saved"));
        let (rl2, rsum) = (r["l2"].as_f64().unwrap(), r["sum"].as_f64().unwrap());
        l2_err = l2_err.max(rel(*l2, rl2));
        sum_err = sum_err.max((sum - rsum).abs() / rsum.abs().max(rl2));
    }
    (l2_err, sum_err)
}

#[test]
fn sft_reproduces_trl_trajectory() {
    let traj = json("sft_trajectory.json");
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let examples = rows.sft_examples("text").unwrap();
    let seqs = sft::tokenize(&tokenizer, &examples, &SftTokenization::default()).unwrap();
    let mut targets = 0;
    for (seq, row) in seqs.iter().zip(traj["rows"].as_array().unwrap()) {
        let ids: Vec<u32> = serde_json::from_value(row["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(row["labels"].clone()).unwrap();
        assert_eq!(seq.input_ids, ids);
        assert_eq!(seq.labels(), labels);
        targets += seq.num_targets();
    }
    assert_eq!(
        targets as u64,
        traj["total_completion_tokens"].as_u64().unwrap()
    );

    let device = rudder_stages::test_device().autodiff();
    let (cfg, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let objective = SftObjective { pad: Pad::exact(0) };
    let refs: Vec<&_> = seqs.iter().collect();
    let step1 = {
        use rudder_stages::train::Objective;
        let out = Objective::forward(&objective, &model, &refs, &device).unwrap();
        grad_summary(&model, out.loss_sum.div_scalar(targets as f64))
    };
    let (g_l2, g_sum) = compare_params(&step1, &traj["step1_param_grad"]);
    println!("sft step-1 gradient: l2 {g_l2:.2e}, sum {g_sum:.2e}");
    assert!(
        g_l2 < 1e-4 && g_sum < 1e-4,
        "step-1 gradient {g_l2:e} {g_sum:e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut writer = MetricsWriter::create(&dir.path().join("metrics.jsonl"), 5).unwrap();
    let (model, report) = train(
        &objective,
        model,
        &seqs,
        &config(),
        &device,
        Some(&mut writer),
        &mut NoHooks,
    )
    .unwrap();

    let steps = traj["steps"].as_array().unwrap();
    assert_eq!(report.steps.len(), steps.len());
    let (mut loss_err, mut norm_err, mut ent_err, mut acc_err) = (0f64, 0f64, 0f64, 0f64);
    for (ours, theirs) in report.steps.iter().zip(steps) {
        loss_err = loss_err.max(rel(ours.loss, theirs["loss"].as_f64().unwrap()));
        norm_err = norm_err.max(rel(ours.grad_norm, theirs["grad_norm"].as_f64().unwrap()));
        ent_err = ent_err.max(rel(
            ours.metrics["entropy"],
            theirs["entropy"].as_f64().unwrap(),
        ));
        acc_err = acc_err.max(
            (ours.metrics["mean_token_accuracy"] - theirs["mean_token_accuracy"].as_f64().unwrap())
                .abs(),
        );
    }
    let saved = dir.path().join("model");
    save_causal_lm(&model, &cfg, &saved).unwrap();
    let (l2_err, sum_err) = compare_params(&param_summary(&saved), &traj["final_param_summary"]);
    println!(
        "sft parity: loss {loss_err:.2e}, grad_norm {norm_err:.2e}, entropy {ent_err:.2e}, \
         accuracy abs {acc_err:.2e}, param l2 {l2_err:.2e}, param sum {sum_err:.2e}"
    );
    assert!(loss_err < 1e-4, "loss relative error {loss_err:e}");
    assert!(norm_err < 1e-3, "grad_norm relative error {norm_err:e}");
    assert!(ent_err < 1e-4, "entropy relative error {ent_err:e}");
    // One token of 266 flipping its argmax would be 3.8e-3.
    assert!(acc_err < 1e-6, "accuracy differs by {acc_err:e}");
    assert!(
        l2_err < 1e-4 && sum_err < 1e-4,
        "params {l2_err:e} {sum_err:e}"
    );

    // The final loss, evaluated after the last update.
    let final_loss = {
        use rudder_stages::train::Objective;
        let out = Objective::forward(&objective, &model, &refs, &device).unwrap();
        out.loss_sum.into_scalar::<f64>() / targets as f64
    };
    let expect = traj["final_loss_after_20_updates"].as_f64().unwrap();
    assert!(rel(final_loss, expect) < 1e-4, "{final_loss} vs {expect}");

    // metrics.jsonl: lines at steps 5, 10, 15, 20, each averaging its five steps.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let mean5: f64 = steps[15..20]
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 5.0;
    assert_eq!(lines[3]["step"], 20);
    assert!(rel(lines[3]["loss"].as_f64().unwrap(), mean5) < 1e-4);
    for key in [
        "learning_rate",
        "grad_norm",
        "mean_token_accuracy",
        "num_tokens",
        "entropy",
    ] {
        assert!(lines[3][key].is_number(), "{key} logged");
    }
}

#[test]
fn reward_model_reproduces_trl_trajectory() {
    let traj = json("rm_trajectory.json");
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("prefs.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let pairs = reward::tokenize(&tokenizer, &rows.preference_pairs().unwrap(), 1024).unwrap();
    for (pair, row) in pairs.iter().zip(traj["rows"].as_array().unwrap()) {
        let chosen: Vec<u32> = serde_json::from_value(row["chosen_ids"].clone()).unwrap();
        let rejected: Vec<u32> = serde_json::from_value(row["rejected_ids"].clone()).unwrap();
        assert_eq!(pair.chosen, chosen);
        assert_eq!(pair.rejected, rejected);
    }

    let device = rudder_stages::test_device().autodiff();
    let (cfg, model) = load_reward_model(&fixtures().join("rm_init"), &device).unwrap();
    let refs: Vec<&_> = pairs.iter().collect();
    let rewards_err = |model: &rudder_stages::model::RewardModel, expect: &Value| -> f64 {
        let (c, r) = pair_rewards(model, &refs, Pad::exact(0));
        let c: Vec<f32> = c.into_data().try_to_vec().unwrap();
        let r: Vec<f32> = r.into_data().try_to_vec().unwrap();
        let mut err = 0f64;
        for (ours, key) in [(c, "chosen_rewards"), (r, "rejected_rewards")] {
            for (a, b) in ours.iter().zip(expect[key].as_array().unwrap()) {
                err = err.max((*a as f64 - b.as_f64().unwrap()).abs());
            }
        }
        err
    };
    let initial_err = rewards_err(&model, &traj["initial"]);
    assert!(
        initial_err < 1e-5,
        "initial rewards differ by {initial_err:e}"
    );
    let step1 = {
        let (c, r) = pair_rewards(&model, &refs, Pad::exact(0));
        let loss = rudder_stages::losses::bradley_terry(c, r, None, None).mean();
        grad_summary(&model, loss)
    };
    let (g_l2, g_sum) = compare_params(&step1, &traj["step1_param_grad"]);
    println!("reward step-1 gradient: l2 {g_l2:.2e}, sum {g_sum:.2e}");
    assert!(
        g_l2 < 1e-4 && g_sum < 1e-4,
        "step-1 gradient {g_l2:e} {g_sum:e}"
    );

    let objective = RewardObjective {
        pad: Pad::exact(0),
        center_rewards_coefficient: None,
    };
    let (model, report) = train(
        &objective,
        model,
        &pairs,
        &config(),
        &device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let steps = traj["steps"].as_array().unwrap();
    assert_eq!(report.steps.len(), steps.len());
    let (mut loss_err, mut norm_err, mut margin_err) = (0f64, 0f64, 0f64);
    for (ours, theirs) in report.steps.iter().zip(steps) {
        loss_err = loss_err.max(rel(ours.loss, theirs["loss"].as_f64().unwrap()));
        norm_err = norm_err.max(rel(ours.grad_norm, theirs["grad_norm"].as_f64().unwrap()));
        margin_err = margin_err.max(rel(
            ours.metrics["margin"],
            theirs["margin"].as_f64().unwrap(),
        ));
        assert_eq!(
            ours.metrics["accuracy"],
            theirs["accuracy"].as_f64().unwrap()
        );
        for key in ["mean_reward", "min_reward", "max_reward"] {
            let (a, b) = (ours.metrics[key], theirs[key].as_f64().unwrap());
            assert!(
                (a - b).abs() < 1e-3 * b.abs().max(1.0),
                "step {}: {key} {a} vs {b}",
                ours.step
            );
        }
    }
    let saved = tempfile::tempdir().unwrap();
    save_reward_model(&model, &cfg, saved.path()).unwrap();
    let (l2_err, sum_err) =
        compare_params(&param_summary(saved.path()), &traj["final_param_summary"]);
    let final_err = rewards_err(&model, &traj["final_after_20_updates"]);
    println!(
        "reward parity: loss {loss_err:.2e}, grad_norm {norm_err:.2e}, margin {margin_err:.2e}, \
         param l2 {l2_err:.2e}, param sum {sum_err:.2e}, final rewards abs {final_err:.2e}"
    );
    assert!(loss_err < 1e-4, "loss relative error {loss_err:e}");
    assert!(norm_err < 1e-3, "grad_norm relative error {norm_err:e}");
    assert!(margin_err < 1e-4, "margin relative error {margin_err:e}");
    assert!(
        l2_err < 1e-4 && sum_err < 1e-4,
        "params {l2_err:e} {sum_err:e}"
    );
    assert!(final_err < 1e-3, "final rewards differ by {final_err:e}");
}

/// Golden per-pair values of `dpo_golden.json`'s examples.
fn golden_column(golden: &Value, key: &str) -> Vec<f64> {
    golden["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[key].as_f64().unwrap())
        .collect()
}

#[test]
fn dpo_reproduces_trl_trajectory() {
    use rudder_schema::kinds::{DpoLossType, PreferenceTokens};
    use rudder_stages::logps::{PromptCompletion, sequence_logps};
    use rudder_stages::losses::DpoLossConfig;
    use rudder_stages::preference::tokenize_pairs;
    use rudder_stages::preference::{DpoExample, DpoObjective};

    let traj = json("dpo_trajectory.json");
    let golden = json("dpo_golden.json");
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("prefs.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let tokenized = tokenize_pairs(
        &tokenizer,
        &rows.preference_pairs().unwrap(),
        &PreferenceTokens::default(),
    )
    .unwrap();
    assert_eq!(tokenized.dropped, 0);
    for (pair, example) in tokenized
        .pairs
        .iter()
        .zip(golden["examples"].as_array().unwrap())
    {
        let ids = |key: &str| -> Vec<u32> { serde_json::from_value(example[key].clone()).unwrap() };
        assert_eq!(pair.chosen.prompt, ids("prompt_ids"));
        assert_eq!(pair.chosen.completion, ids("chosen_ids"));
        assert_eq!(pair.rejected.completion, ids("rejected_ids"));
    }

    // The reference's cached log-probs, as the `ref_logps` part computes them, against TRL's.
    let device = rudder_stages::test_device();
    let (_, reference) = load_causal_lm(&fixtures().join("reference"), &device).unwrap();
    let sides: Vec<&PromptCompletion> = tokenized
        .pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(tokenized.pairs.iter().map(|p| &p.rejected))
        .collect();
    let mut reference_logps = sequence_logps(&reference, &sides, Pad::exact(0), 16);
    let reference_rejected = reference_logps.split_off(16);
    let mut logp_err = 0f64;
    for (ours, key) in [
        (&reference_logps, "reference_chosen_logps"),
        (&reference_rejected, "reference_rejected_logps"),
    ] {
        for (values, expect) in ours.iter().zip(golden_column(&golden, key)) {
            let sum: f64 = values.iter().map(|&x| f64::from(x)).sum();
            logp_err = logp_err.max((sum - expect).abs());
        }
    }
    println!("dpo reference log-probs: max abs {logp_err:.2e}");
    assert!(
        logp_err < 1e-4,
        "reference log-probs differ by {logp_err:e}"
    );

    let examples: Vec<DpoExample> = tokenized
        .pairs
        .into_iter()
        .zip(reference_logps.into_iter().zip(reference_rejected))
        .map(|(pair, (c, r))| DpoExample {
            pair,
            reference_chosen: c,
            reference_rejected: r,
        })
        .collect();
    let objective = DpoObjective {
        pad: Pad::exact(0),
        loss: DpoLossConfig::single(DpoLossType::Sigmoid, 0.1),
        ld_alpha: None,
        use_weighting: false,
    };
    let train_device = device.clone().autodiff();
    let (cfg, model) = load_causal_lm(&fixtures().join("policy"), &train_device).unwrap();
    let refs: Vec<&_> = examples.iter().collect();
    let step1 = {
        use rudder_stages::train::Objective;
        let out = Objective::forward(&objective, &model, &refs, &train_device).unwrap();
        grad_summary(&model, out.loss_sum.div_scalar(16.0))
    };
    let (g_l2, g_sum) = compare_params(&step1, &traj["step1_param_grad"]);
    println!("dpo step-1 gradient: l2 {g_l2:.2e}, sum {g_sum:.2e}");
    assert!(
        g_l2 < 1e-4 && g_sum < 1e-4,
        "step-1 gradient {g_l2:e} {g_sum:e}"
    );

    let (model, report) = train(
        &objective,
        model,
        &examples,
        &config(),
        &train_device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let steps = traj["steps"].as_array().unwrap();
    assert_eq!(report.steps.len(), steps.len());
    let (mut loss_err, mut norm_err, mut metric_err) = (0f64, 0f64, 0f64);
    for (ours, theirs) in report.steps.iter().zip(steps) {
        loss_err = loss_err.max(rel(ours.loss, theirs["loss"].as_f64().unwrap()));
        norm_err = norm_err.max(rel(ours.grad_norm, theirs["grad_norm"].as_f64().unwrap()));
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "entropy",
        ] {
            let expect = theirs[key].as_f64().unwrap();
            // Rewards start near zero: measure them against the scale of the log-probs' change.
            let err = (ours.metrics[key] - expect).abs() / expect.abs().max(0.1);
            metric_err = metric_err.max(err);
        }
        assert_eq!(
            ours.metrics["rewards/accuracies"],
            theirs["rewards/accuracies"].as_f64().unwrap(),
            "step {}",
            ours.step
        );
        let acc = theirs["mean_token_accuracy"].as_f64().unwrap();
        assert!((ours.metrics["mean_token_accuracy"] - acc).abs() < 1e-6);
    }
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("model");
    save_causal_lm(&model, &cfg, &saved).unwrap();
    let (l2_err, sum_err) = compare_params(&param_summary(&saved), &traj["final_param_summary"]);
    println!(
        "dpo parity: loss {loss_err:.2e}, grad_norm {norm_err:.2e}, metrics {metric_err:.2e}, \
         param l2 {l2_err:.2e}, param sum {sum_err:.2e}"
    );
    assert!(loss_err < 1e-4, "loss relative error {loss_err:e}");
    assert!(norm_err < 1e-3, "grad_norm relative error {norm_err:e}");
    assert!(metric_err < 1e-4, "metric error {metric_err:e}");
    assert!(
        l2_err < 1e-4 && sum_err < 1e-4,
        "params {l2_err:e} {sum_err:e}"
    );
    let final_loss = {
        use rudder_stages::train::Objective;
        let out = Objective::forward(&objective, &model, &refs, &train_device).unwrap();
        out.loss_sum.into_scalar::<f64>() / 16.0
    };
    let expect = traj["final_loss_after_20_updates"].as_f64().unwrap();
    assert!(rel(final_loss, expect) < 1e-4, "{final_loss} vs {expect}");
}
