//! Parity of LoRA training runs with PEFT 0.21 + TRL 1.16 (`data/lora/generate.py` wrote the
//! goldens): 20 steps of SFT and of DPO on the shared fixtures, each from an initial adapter
//! that PEFT drew and saved (`data/lora/{sft,dpo}_init`), batch 16, constant lr 1e-3, no
//! clipping. Every step's loss and gradient norm (and DPO's rewards) and the trained adapter's
//! tensors are compared with the reference run, within 1e-4 relative.

use rudder_schema::kinds::{DpoLossType, PreferenceTokens};
use rudder_stages::data::{Format, read_rows};
use rudder_stages::kinds::sft::{self, SftTokenization};
use rudder_stages::logps::{PromptCompletion, sequence_logps};
use rudder_stages::losses::DpoLossConfig;
use rudder_stages::model::load_causal_lm;
use rudder_stages::model::lora::{self, ADAPTER_WEIGHTS_FILE};
use rudder_stages::padding::Pad;
use rudder_stages::preference::{DpoExample, DpoObjective, tokenize_pairs};
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::train::{NoHooks, ScheduleKind, SftObjective, StepRecord, TrainConfig, train};
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

fn data() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lora")).to_path_buf()
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join(name)).unwrap()).unwrap()
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

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Largest relative errors of loss and grad_norm over the steps, and of the given metrics
/// (measured against `max(|expected|, floor)`, as rewards start at zero).
fn compare_steps(ours: &[StepRecord], theirs: &Value, metrics: &[&str], floor: f64) -> [f64; 3] {
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let mut errs = [0f64; 3];
    for (o, t) in ours.iter().zip(theirs) {
        errs[0] = errs[0].max(rel(o.loss, t["loss"].as_f64().unwrap()));
        errs[1] = errs[1].max(rel(o.grad_norm, t["grad_norm"].as_f64().unwrap()));
        for key in metrics {
            let expect = t[*key].as_f64().unwrap();
            errs[2] = errs[2].max((o.metrics[*key] - expect).abs() / expect.abs().max(floor));
        }
    }
    errs
}

/// Largest relative error of the per-tensor (L2, sum) of a saved adapter against the golden's.
fn compare_adapter(dir: &Path, reference: &Value) -> f64 {
    let bytes = std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let reference = reference.as_object().unwrap();
    assert_eq!(st.names().len(), reference.len(), "same tensors");
    let mut err = 0f64;
    for (name, r) in reference {
        let view = st.tensor(name).unwrap_or_else(|_| panic!("{name} saved"));
        let values: Vec<f64> = view
            .data()
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect();
        let l2 = values.iter().map(|x| x * x).sum::<f64>().sqrt();
        let sum: f64 = values.iter().sum();
        let (rl2, rsum) = (r["l2"].as_f64().unwrap(), r["sum"].as_f64().unwrap());
        err = err
            .max(rel(l2, rl2))
            .max((sum - rsum).abs() / rsum.abs().max(rl2));
    }
    err
}

#[test]
fn lora_sft_reproduces_peft_trl_trajectory() {
    let traj = golden("sft_lora_trajectory.json");
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let examples = rows.sft_examples("text").unwrap();
    let seqs = sft::tokenize(&tokenizer, &examples, &SftTokenization::default()).unwrap();

    let device = rudder_stages::test_device().autodiff();
    let (_, base) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let (model, args) = lora::load_adapter(base, &data().join("sft_init")).unwrap();
    assert_eq!(args.r, 4);
    assert_eq!(args.scale(), 2.0);
    let objective = SftObjective { pad: Pad::exact(0) };
    let (model, report) = train(
        &objective,
        model,
        &seqs,
        &config(),
        &device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let [loss, norm, metrics] = compare_steps(
        &report.steps,
        &traj["steps"],
        &["entropy", "mean_token_accuracy"],
        1e-3,
    );
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(&model, &args, dir.path()).unwrap();
    let adapter = compare_adapter(dir.path(), &traj["final_adapter_summary"]);
    println!(
        "lora sft parity: loss {loss:.2e}, grad_norm {norm:.2e}, metrics {metrics:.2e}, adapter {adapter:.2e}"
    );
    assert!(loss < 1e-4, "loss relative error {loss:e}");
    assert!(norm < 1e-4, "grad_norm relative error {norm:e}");
    assert!(metrics < 1e-4, "metric error {metrics:e}");
    // The trajectory's bound is per step (above). The adapter after 20 steps carries every
    // step's rounding: the cpu backend's own attention kernel sums in another order than
    // torch's, which moves it by about 1e-4 relative (7.2e-5 with Burn's generic attention).
    assert!(adapter < 2e-4, "adapter error {adapter:e}");
    write_peft_check(&model, &args, &seqs[..4]);
}

/// Leaves the trained adapter and rudder's logits on a few sequences in the test's scratch
/// folder, for `data/lora/check_peft.py` to load the adapter in PEFT and compare.
fn write_peft_check(
    model: &rudder_stages::model::CausalLm,
    args: &rudder_schema::kinds::LoraArgs,
    seqs: &[rudder_stages::train::SftSequence],
) {
    use burn::tensor::{Int, Tensor, TensorData};
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora-peft-check");
    lora::save_adapter(model, args, &dir).unwrap();
    let device = model.device();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        let n = seq.input_ids.len();
        let ids: Vec<i64> = seq.input_ids.iter().map(|&t| i64::from(t)).collect();
        let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((format!("input_ids_{i}"), vec![1, n], bytes));
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits = model.forward(input, None, None);
        let shape = logits.dims().to_vec();
        let values: Vec<f32> = logits.into_data().try_to_vec::<f32>().unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((format!("logits_{i}"), shape, bytes));
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let dtype = if name.starts_with("input_ids") {
                safetensors::Dtype::I64
            } else {
                safetensors::Dtype::F32
            };
            (
                name.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("rudder_logits.safetensors")).unwrap();
}

#[test]
fn lora_dpo_reproduces_peft_trl_trajectory() {
    let traj = golden("dpo_lora_trajectory.json");
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

    let device = rudder_stages::test_device().autodiff();
    let (_, base) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let (model, args) = lora::load_adapter(base, &data().join("dpo_init")).unwrap();
    assert!(args.use_rslora);
    assert_eq!(args.scale(), 8.0);
    // The reference: the policy with its adapters disabled, sharing its weights.
    let reference = {
        use burn::module::Module;
        lora::without_adapters(&model).valid()
    };
    let sides: Vec<&PromptCompletion> = tokenized
        .pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(tokenized.pairs.iter().map(|p| &p.rejected))
        .collect();
    let mut chosen = sequence_logps(&reference, &sides, Pad::exact(0), 16);
    let rejected = chosen.split_off(16);
    let examples: Vec<DpoExample> = tokenized
        .pairs
        .into_iter()
        .zip(chosen.into_iter().zip(rejected))
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
    let (model, report) = train(
        &objective,
        model,
        &examples,
        &config(),
        &device,
        None,
        &mut NoHooks,
    )
    .unwrap();
    let [loss, norm, metrics] = compare_steps(
        &report.steps,
        &traj["steps"],
        &[
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ],
        0.1,
    );
    for (o, t) in report.steps.iter().zip(traj["steps"].as_array().unwrap()) {
        // At step 1 policy and reference are the same function (B = 0): TRL's rewards are exact
        // zeros and its strict `>` gives accuracy 0, while ours are zeros up to the last bits
        // of a differently batched forward pass. A tie has no accuracy to compare.
        if t["rewards/margins"].as_f64().unwrap().abs() < 1e-6 {
            continue;
        }
        assert_eq!(
            o.metrics["rewards/accuracies"],
            t["rewards/accuracies"].as_f64().unwrap(),
            "step {}",
            o.step
        );
    }
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(&model, &args, dir.path()).unwrap();
    let adapter = compare_adapter(dir.path(), &traj["final_adapter_summary"]);
    println!(
        "lora dpo parity: loss {loss:.2e}, grad_norm {norm:.2e}, metrics {metrics:.2e}, adapter {adapter:.2e}"
    );
    assert!(loss < 1e-4, "loss relative error {loss:e}");
    assert!(norm < 1e-4, "grad_norm relative error {norm:e}");
    assert!(metrics < 1e-4, "metric error {metrics:e}");
    assert!(adapter < 1e-4, "adapter error {adapter:e}");
}

/// Stops the run once `after` steps are done.
struct StopAfter {
    after: u64,
    done: u64,
}

impl rudder_stages::train::Hooks for StopAfter {
    fn on_step(&mut self, record: &StepRecord, _: u64) {
        self.done = record.step;
    }
    fn interrupted(&self) -> bool {
        self.done >= self.after
    }
}

#[test]
fn resumed_lora_training_is_bit_identical_and_keeps_the_base_frozen() {
    let tokenizer = Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let rows = read_rows(
        &fixtures().join("sft.jsonl"),
        Format::Jsonl,
        &BTreeMap::new(),
    )
    .unwrap();
    let seqs = sft::tokenize(
        &tokenizer,
        &rows.sft_examples("text").unwrap(),
        &SftTokenization::default(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let device = rudder_stages::test_device().autodiff();
    let run = |name: &str, hooks: &mut dyn rudder_stages::train::Hooks| {
        let cfg = TrainConfig {
            batch_size: 8,
            max_steps: Some(6),
            checkpoint: Some(rudder_stages::train::Checkpointing {
                dir: tmp.path().join(name),
                every: 3,
            }),
            ..config()
        };
        let (_, base) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
        let (model, args) = lora::load_adapter(base, &data().join("sft_init")).unwrap();
        let (model, _) = train(
            &SftObjective { pad: Pad::exact(0) },
            model,
            &seqs,
            &cfg,
            &device,
            None,
            hooks,
        )?;
        let out = tmp.path().join(format!("{name}-adapter"));
        lora::save_adapter(&model, &args, &out).unwrap();
        let base_q: Vec<f32> = model.model.layers[0]
            .self_attn
            .q_proj
            .weight
            .val()
            .into_data()
            .try_to_vec()
            .unwrap();
        Ok::<_, rudder_stages::train::TrainError>((
            std::fs::read(out.join(ADAPTER_WEIGHTS_FILE)).unwrap(),
            base_q,
        ))
    };
    let (whole, whole_q) = run("whole", &mut NoHooks).unwrap();
    let mut stop = StopAfter { after: 4, done: 0 };
    assert!(run("parts", &mut stop).is_err());
    let (parts, parts_q) = run("parts", &mut NoHooks).unwrap();
    assert!(whole == parts, "resumed adapter differs");
    let (_, fresh) = load_causal_lm(&fixtures().join("policy"), &device).unwrap();
    let fresh_q: Vec<f32> = fresh.model.layers[0]
        .self_attn
        .q_proj
        .weight
        .val()
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(whole_q, fresh_q, "the base weight moved");
    assert_eq!(parts_q, fresh_q, "the base weight moved after resuming");
}
