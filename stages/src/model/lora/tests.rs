use super::*;
use crate::model::{ModelConfig, random_causal_lm, random_reward_model};
use burn::optim::GradientsParams;
use burn::tensor::Int;
use rudder_schema::kinds::AllLinear;

fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
    cfg.eos_token_ids = vec![2];
    cfg
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

fn ids(device: &burn::tensor::Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), device)
}

fn all_linear(r: u32, alpha: f64) -> LoraArgs {
    LoraArgs {
        r,
        alpha,
        target_modules: TargetModules::AllLinear(AllLinear::AllLinear),
        ..LoraArgs::default()
    }
}

/// Sets every B to a seeded non-zero value, so that adapters change the output.
fn perturb(model: &mut CausalLm) {
    let mut k = 0.0f32;
    for layer in &mut model.model.layers {
        for (_, l) in layer_linears_mut(layer) {
            if let Some(a) = &mut l.lora {
                let [r, out] = a.lora_b.val().dims();
                let device = a.lora_b.val().device();
                let v: Vec<f32> = (0..r * out)
                    .map(|i| {
                        k += 1.0;
                        ((i as f32 + k) * 0.37).sin() * 0.1
                    })
                    .collect();
                a.lora_b =
                    Param::from_tensor(Tensor::from_data(TensorData::new(v, [r, out]), &device));
            }
        }
    }
}

#[test]
fn fresh_adapters_leave_the_output_unchanged_and_follow_peft_init() {
    let device = crate::test_device().autodiff();
    let base = random_causal_lm(&tiny(), 1, &device);
    let before = values(base.forward(ids(&device), None, None));
    let args = all_linear(4, 8.0);
    let adapted = attach(base, &args, 7).unwrap();
    assert!(has_adapters(&adapted));
    assert_eq!(values(adapted.forward(ids(&device), None, None)), before);
    let q = adapted.model.layers[0]
        .self_attn
        .q_proj
        .lora
        .as_ref()
        .unwrap();
    assert_eq!(q.scale, 2.0);
    // A is [in, r] = [16, 4], uniform in ±1/sqrt(16); B is zero.
    let a = values(q.lora_a.val());
    assert_eq!(q.lora_a.val().dims(), [16, 4]);
    assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| v.abs() > 0.15));
    assert!(values(q.lora_b.val()).iter().all(|&v| v == 0.0));
    // The same seed draws the same factors; another seed others.
    let again = attach(random_causal_lm(&tiny(), 1, &device), &args, 7).unwrap();
    let other = attach(random_causal_lm(&tiny(), 1, &device), &args, 8).unwrap();
    let a_of = |m: &CausalLm| {
        values(
            m.model.layers[1]
                .mlp
                .down_proj
                .lora
                .as_ref()
                .unwrap()
                .lora_a
                .val(),
        )
    };
    assert_eq!(a_of(&adapted), a_of(&again));
    assert_ne!(a_of(&adapted), a_of(&other));
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() {
    let args = LoraArgs {
        r: 16,
        alpha: 32.0,
        use_rslora: true,
        ..LoraArgs::default()
    };
    assert_eq!(args.scale(), 8.0);
    assert_eq!(
        LoraArgs {
            use_rslora: false,
            ..args
        }
        .scale(),
        2.0
    );
}

#[test]
fn only_targeted_layers_get_adapters() {
    let device = crate::test_device().autodiff();
    let model = attach(
        random_causal_lm(&tiny(), 1, &device),
        &LoraArgs::default(),
        0,
    )
    .unwrap();
    for layer in &model.model.layers {
        let adapted: Vec<&str> = layer_linears(layer)
            .iter()
            .filter(|(_, _, l)| l.lora.is_some())
            .map(|(_, p, _)| *p)
            .collect();
        assert_eq!(adapted, ["self_attn.q_proj", "self_attn.v_proj"]);
    }
}

#[test]
fn only_adapters_and_saved_modules_receive_gradients() {
    let device = crate::test_device().autodiff();
    let mut model = attach(
        random_causal_lm(&tiny(), 1, &device),
        &all_linear(2, 4.0),
        3,
    )
    .unwrap();
    perturb(&mut model);
    let loss = model.forward(ids(&device), None, None).powi_scalar(2).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    // 2 layers x 7 linears x (A, B).
    assert_eq!(grads.len(), 28);
    let q = model.model.layers[0]
        .self_attn
        .q_proj
        .lora
        .as_ref()
        .unwrap();
    assert!(grads.get::<2>(q.lora_a.id).is_some());
    assert!(
        grads
            .get::<2>(model.model.layers[0].self_attn.q_proj.weight.id)
            .is_none()
    );

    let rm = random_reward_model(&tiny(), 2, &device);
    let args = LoraArgs {
        modules_to_save: vec![SavedModule::Score],
        ..LoraArgs::default()
    };
    let rm = attach(rm, &args, 3).unwrap();
    let loss = rm.forward(ids(&device), None).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &rm);
    assert!(grads.get::<2>(rm.score.weight.id).is_some());
    // q and v adapters of 2 layers, and the score head.
    assert_eq!(grads.len(), 9);
}

#[test]
fn saved_module_missing_from_the_model_is_an_error() {
    let device = crate::test_device().autodiff();
    let args = LoraArgs {
        modules_to_save: vec![SavedModule::Score],
        ..LoraArgs::default()
    };
    let err = attach(random_causal_lm(&tiny(), 1, &device), &args, 0).unwrap_err();
    assert!(err.to_string().contains("`score`"), "{err}");
}

#[test]
fn merging_gives_the_adapted_output_and_stripping_the_base() {
    let device = crate::test_device();
    let base = random_causal_lm(&tiny(), 1, &device);
    let plain = values(base.forward(ids(&device), None, None));
    let mut model = attach(base, &all_linear(4, 8.0), 5).unwrap();
    perturb(&mut model);
    let adapted = values(model.forward(ids(&device), None, None));
    assert!(
        adapted
            .iter()
            .zip(&plain)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
    let merged = merge(&model);
    assert!(!has_adapters(&merged));
    for (m, a) in values(merged.forward(ids(&device), None, None))
        .iter()
        .zip(&adapted)
    {
        assert!((m - a).abs() < 1e-5, "{m} vs {a}");
    }
    assert_eq!(
        values(without_adapters(&model).forward(ids(&device), None, None)),
        plain
    );
}

#[test]
fn adapters_round_trip_through_a_peft_directory() {
    let device = crate::test_device();
    let args = LoraArgs {
        r: 4,
        alpha: 16.0,
        target_modules: TargetModules::List(vec![
            LinearModule::VProj,
            LinearModule::QProj,
            LinearModule::DownProj,
        ]),
        ..LoraArgs::default()
    };
    let mut model = attach(random_causal_lm(&tiny(), 1, &device), &args, 5).unwrap();
    perturb(&mut model);
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &args, dir.path()).unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["target_modules"],
        json!(["down_proj", "q_proj", "v_proj"])
    );
    assert_eq!(config["lora_alpha"], json!(16.0));
    let bytes = std::fs::read(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names.len(), 12);
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), [4, 16]);
    let b = st
        .tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), [16, 4]);

    let (loaded, read) = load_adapter(random_causal_lm(&tiny(), 1, &device), dir.path()).unwrap();
    assert_eq!(read.r, 4);
    assert_eq!(read.scale(), 4.0);
    assert_eq!(
        values(loaded.forward(ids(&device), None, None)),
        values(model.forward(ids(&device), None, None))
    );
}

#[test]
fn unsupported_adapter_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write =
        |v: Value| std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), v.to_string()).unwrap();
    write(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "all"}));
    let err = read_adapter_config(dir.path()).unwrap_err().to_string();
    assert!(err.contains("`bias`"), "{err}");
    write(json!({"peft_type": "IA3"}));
    assert!(read_adapter_config(dir.path()).is_err());
    write(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}));
    let args = read_adapter_config(dir.path()).unwrap();
    assert!(args.targets(LinearModule::UpProj));
}

#[test]
fn dropout_applies_to_the_adapter_input_while_training_only() {
    let train = crate::test_device().autodiff();
    let ones = |device: &burn::tensor::Device| Tensor::<2>::ones([64, 16], device);
    let adapter = |device: &burn::tensor::Device| LoraAdapter {
        lora_a: Param::from_tensor(Tensor::ones([16, 1], device)),
        lora_b: Param::from_tensor(Tensor::ones([1, 1], device)),
        scale: 1.0,
        dropout: 0.5,
    };
    // Without dropout every row is 16; with p = 0.5 each kept input counts twice.
    let out = values(adapter(&train).forward(ones(&train)));
    assert!(out.iter().all(|v| (v / 2.0).fract() == 0.0 && *v <= 32.0));
    assert!(out.iter().any(|&v| v != 16.0));
    let mean = out.iter().sum::<f32>() / out.len() as f32;
    assert!((mean - 16.0).abs() < 2.0, "{mean}");
    // Inference (the plain device): no dropout.
    let plain = crate::test_device();
    assert!(
        values(adapter(&plain).forward(ones(&plain)))
            .iter()
            .all(|&v| v == 16.0)
    );
}
