//! `precision = "bf16"` against transformers' Llama computing in bf16 (`data/bf16/generate.py`
//! wrote the goldens): the next-token log-probs of the logits fixtures' sequences, and 8 steps
//! of the SFT fixture with fp32 master weights and AdamW state (bit-identical with gradient
//! checkpointing); and a LoRA run holding its base in bf16, resumed from a checkpoint.
//!
//! bf16 keeps 8 bits of mantissa, and two implementations round at slightly different points
//! (silu as one op or two, attention scores in bf16 or fp32): transformers' own eager and sdpa
//! attention in bf16 differ by 5e-3 to 9e-3 in mean |log-prob|, about as much as bf16 differs
//! from fp32. So the forward test asks that rudder's bf16 be as close to transformers' as its
//! two implementations are to each other, and as far from fp32 as they are (so that it fails if
//! bf16 is not applied); training, averaging over hundreds of tokens, is compared per step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rudder_schema::Precision;
use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::model::{CausalLm, load_causal_lm};
use rudder_stages::padding::Pad;
use rudder_stages::precision::scoped;
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{NoHooks, ScheduleKind, SftObjective, TrainConfig, train};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn golden() -> Value {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bf16/golden.json"
    ));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The SFT fixture's 16 examples, tokenised as TRL does (completion-only).
fn sft_sequences() -> Vec<rudder_stages::train::SftSequence> {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let examples = rows.sft_examples("text").unwrap();
    sft::tokenize(&tokenizer, &examples, &SftTokenization::default()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn mean_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
}

/// log p(token j + 1 | tokens ..= j) at every position of one sequence.
fn next_token_logps(model: &CausalLm, ids: &[i64]) -> Vec<f64> {
    let device = model.device();
    let n = ids.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, n]), &device);
    let logits = model.forward(input, None, None);
    assert_eq!(logits.dtype(), DType::F32, "logits are returned in fp32");
    let logp = log_softmax(logits.slice([0..1, 0..n - 1]), 2);
    let targets =
        Tensor::<2, Int>::from_data(TensorData::new(ids[1..].to_vec(), [1, n - 1]), &device);
    let picked = logp.gather(2, targets.unsqueeze_dim(2));
    picked
        .into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .unwrap()
}

#[test]
fn bf16_forward_follows_transformers_in_bf16() {
    let device = rudder_stages::test_device();
    let golden = golden();
    let bf16 = scoped(Precision::Bf16, || {
        load_causal_lm(&fixtures().join("policy"), &device)
            .unwrap()
            .1
    });
    // A model that only infers holds its weights in bf16.
    assert_eq!(bf16.model.embed_tokens.weight.val().dtype(), DType::BF16);
    let (_, fp32) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    for case in golden["forward"].as_array().unwrap() {
        let ids: Vec<i64> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let [sdpa, eager, theirs_fp32] = ["bf16", "bf16_eager", "fp32"].map(|k| floats(&case[k]));
        let ours = next_token_logps(&bf16, &ids);
        let ours_fp32 = next_token_logps(&fp32, &ids);
        assert!(
            mean_abs_diff(&ours_fp32, &theirs_fp32) < 1e-5,
            "fp32 parity"
        );
        let to_theirs = mean_abs_diff(&ours, &sdpa).min(mean_abs_diff(&ours, &eager));
        let their_spread = mean_abs_diff(&sdpa, &eager);
        let (from_fp32, their_gap) = (
            mean_abs_diff(&ours, &theirs_fp32),
            mean_abs_diff(&sdpa, &theirs_fp32),
        );
        println!(
            "{} tokens: to transformers' bf16 {to_theirs:.2e} (eager vs sdpa {their_spread:.2e}); from fp32 {from_fp32:.2e} (transformers' {their_gap:.2e})",
            ids.len(),
        );
        assert!(
            to_theirs < 1.25 * their_spread,
            "mean |log-prob difference| {to_theirs:e} to transformers' bf16, whose two attentions differ by {their_spread:e}"
        );
        assert!(
            from_fp32 > 0.5 * their_gap && from_fp32 < 2.0 * their_gap,
            "bf16 is {from_fp32:e} from fp32, transformers' bf16 {their_gap:e}"
        );
        // Run to run, bf16 on the cpu backend is exact.
        assert_eq!(ours, next_token_logps(&bf16, &ids));
    }
}

#[test]
fn bf16_sft_follows_fp32_master_weights_in_torch() {
    let golden = golden();
    let seqs = sft_sequences();
    let steps = golden["sft"]["bf16"].as_array().unwrap().len();
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        batch_size: 16,
        max_steps: Some(steps as u64),
        schedule: ScheduleKind::Constant,
        max_grad_norm: 0.0,
        shuffle: false,
        ..TrainConfig::default()
    };
    let device = rudder_stages::test_device().autodiff();
    let objective = SftObjective { pad: Pad::exact(0) };
    let (trained, report) = scoped(Precision::Bf16, || {
        let (_, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
        train(&objective, model, &seqs, &cfg, &device, None, &mut NoHooks).unwrap()
    });
    // With gradient checkpointing the recomputed bf16 activations are the same bits.
    let checkpointed = device.clone().gradient_checkpointing();
    let (_, again) = scoped(Precision::Bf16, || {
        let (_, model) = load_causal_lm(&fixtures().join("policy"), &checkpointed).unwrap();
        train(
            &objective,
            model,
            &seqs,
            &cfg,
            &checkpointed,
            None,
            &mut NoHooks,
        )
        .unwrap()
    });
    assert_eq!(
        again.steps, report.steps,
        "checkpointing changed a bf16 run"
    );
    // Trained weights stay fp32 (the master copy AdamW updates).
    let mut dtypes = Vec::new();
    trained.visit(&mut DtypeOf(&mut dtypes));
    assert!(!dtypes.is_empty() && dtypes.iter().all(|&d| d == DType::F32));

    let series = |key: &str, which: &str| -> Vec<f64> {
        golden["sft"][which]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[key].as_f64().unwrap())
            .collect()
    };
    // Within these bounds per step (bf16 itself moves the loss by up to 3.6e-4 and the gradient
    // norm by 1.4e-3 relative from fp32 along this run).
    for (key, bound) in [("loss", 1e-3), ("grad_norm", 5e-3)] {
        let ours: Vec<f64> = report
            .steps
            .iter()
            .map(|s| if key == "loss" { s.loss } else { s.grad_norm })
            .collect();
        let (theirs, theirs_fp32) = (series(key, "bf16"), series(key, "fp32"));
        let rel = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / y.abs())
                .fold(0.0, f64::max)
        };
        let (to_theirs, from_fp32) = (rel(&ours, &theirs), rel(&ours, &theirs_fp32));
        println!(
            "sft {key}: to torch's bf16 {to_theirs:.2e}, from fp32 {from_fp32:.2e} (torch's {:.2e})",
            rel(&theirs, &theirs_fp32)
        );
        assert!(
            to_theirs < bound,
            "{key}: relative difference {to_theirs:e} to torch's bf16 run"
        );
        assert!(
            from_fp32 > 1e-5,
            "{key}: bf16 must not reproduce fp32 ({from_fp32:e})"
        );
    }
}

/// Collects the dtype of every float parameter.
struct DtypeOf<'a>(&'a mut Vec<DType>);

impl burn::module::ModuleVisitor for DtypeOf<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

/// Interrupts the run after its third step (a checkpoint is written every second step).
struct StopAfterThree(u64);

impl rudder_stages::train::Hooks for StopAfterThree {
    fn on_step(&mut self, record: &rudder_stages::train::StepRecord, _: u64) {
        self.0 = record.step;
    }
    fn interrupted(&self) -> bool {
        self.0 >= 3
    }
}

/// The fixture policy saved in `dtype` (bf16 or f16, as Hugging Face checkpoints are) into
/// `dir`.
fn half_policy(dir: &Path, dtype: rudder_stages::model::WeightDtype) -> PathBuf {
    let device = rudder_stages::test_device();
    let (mut config, model) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    config.dtype = dtype;
    let out = dir.join(format!("policy-{}", dtype.torch_name()));
    rudder_stages::model::save_causal_lm(&model, &config, &out).unwrap();
    out
}

/// LoRA SFT in bf16 over the model in `base`, with checkpoints in `dir`: the saved adapter's
/// bytes and metrics.jsonl.
fn lora_run(
    base: &Path,
    dir: &Path,
    hooks: &mut dyn rudder_stages::train::Hooks,
) -> Result<(Vec<u8>, String), rudder_stages::train::TrainError> {
    use rudder_schema::kinds::{AllLinear, LoraArgs, TargetModules};
    use rudder_stages::model::lora;
    let seqs = sft_sequences();
    let args = LoraArgs {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModules::AllLinear(AllLinear::AllLinear),
        ..LoraArgs::default()
    };
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        batch_size: 4,
        epochs: 2,
        seed: 3,
        checkpoint: Some(rudder_stages::train::Checkpointing {
            dir: dir.join("checkpoint"),
            every: 2,
        }),
        ..TrainConfig::default()
    };
    let device = rudder_stages::test_device().autodiff();
    scoped(Precision::Bf16, || {
        let (_, loaded) = load_causal_lm(base, &device).unwrap();
        let model = lora::attach(loaded, &args, 5).unwrap();
        // The frozen bf16 base is held in bf16, the adapters in fp32.
        let q = &model.model.layers[0].self_attn.q_proj;
        assert_eq!(q.base.weight.val().dtype(), DType::BF16);
        assert_eq!(model.model.embed_tokens.weight.val().dtype(), DType::BF16);
        let adapter = q.lora.as_ref().unwrap();
        assert_eq!(adapter.lora_a.val().dtype(), DType::F32);
        let metrics_path = dir.join("metrics.jsonl");
        let mut writer = rudder_stages::train::MetricsWriter::create(&metrics_path, 1).unwrap();
        let objective = SftObjective { pad: Pad::exact(0) };
        let (model, _) = train(
            &objective,
            model,
            &seqs,
            &cfg,
            &device,
            Some(&mut writer),
            hooks,
        )?;
        // The merged model is fp32: the bf16 base plus the trained update.
        let merged = lora::merge(&model);
        let w = merged.model.layers[0].self_attn.q_proj.base.weight.val();
        assert_eq!(w.dtype(), DType::F32);
        // The merged model's untouched weights are the base's to the bit.
        let (_, fp32_base) = load_causal_lm(base, &device.clone().inner()).unwrap();
        let norm = |m: &CausalLm| m.model.norm.weight.val().cast(DType::F32).into_data();
        assert_eq!(norm(&merged), norm(&fp32_base));
        lora::save_adapter(&model, &args, &dir.join("adapter")).unwrap();
        Ok((
            std::fs::read(dir.join("adapter").join(lora::ADAPTER_WEIGHTS_FILE)).unwrap(),
            std::fs::read_to_string(metrics_path).unwrap(),
        ))
    })
}

#[test]
fn bf16_lora_holds_frozen_weights_in_the_half_dtype_that_is_exact() {
    use rudder_schema::kinds::LoraArgs;
    use rudder_stages::model::lora;
    // The fixture's fp32 weights are not bf16 values: held in fp32, so nothing is rounded.
    let device = rudder_stages::test_device().autodiff();
    let model = scoped(Precision::Bf16, || {
        let (_, base) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
        lora::attach(base, &LoraArgs::default(), 5).unwrap()
    });
    let q = &model.model.layers[0].self_attn.q_proj;
    assert_eq!(q.base.weight.val().dtype(), DType::F32);
    // An f16 checkpoint's weights are held in f16, and computed with in bf16.
    let tmp = tempfile::tempdir().unwrap();
    let f16 = half_policy(tmp.path(), rudder_stages::model::WeightDtype::F16);
    let model = scoped(Precision::Bf16, || {
        let (_, base) = load_causal_lm(&f16, &device).unwrap();
        lora::attach(base, &LoraArgs::default(), 5).unwrap()
    });
    let q = &model.model.layers[0].self_attn.q_proj;
    assert_eq!(q.base.weight.val().dtype(), DType::F16);
    let ids = [1i64, 298, 30, 458, 269, 83];
    let logps = scoped(Precision::Bf16, || next_token_logps(&model.valid(), &ids));
    assert!(logps.iter().all(|l| l.is_finite() && *l < 0.0), "{logps:?}");
}

#[test]
fn bf16_lora_holds_its_base_in_bf16_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    std::fs::create_dir_all(&whole).unwrap();
    std::fs::create_dir_all(&parts).unwrap();
    let base = half_policy(tmp.path(), rudder_stages::model::WeightDtype::Bf16);
    let (adapter, metrics) = lora_run(&base, &whole, &mut NoHooks).unwrap();
    assert_eq!(metrics.lines().count(), 8);
    assert!(lora_run(&base, &parts, &mut StopAfterThree(0)).is_err());
    let (resumed, resumed_metrics) = lora_run(&base, &parts, &mut NoHooks).unwrap();
    assert_eq!(resumed_metrics, metrics);
    assert!(resumed == adapter, "the resumed adapter differs");
}
