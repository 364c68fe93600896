//! LoRA adapters (Hu et al. 2021) with PEFT's semantics: a targeted linear layer computes
//! `W x + b + scale * B(A(dropout(x)))`, `W` and `b` frozen, `A` drawn Kaiming-uniform
//! (`kaiming_uniform_(a=sqrt(5))`, so U(-1/sqrt(in), 1/sqrt(in))) from the stage's seed and `B`
//! zero, `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). The adapter is computed beside the
//! frozen weight rather than merged into it, as PEFT does, so that dropout applies to the
//! adapter's input only and no weight-shaped gradient is formed.
//!
//! This module owns the wrapper ([`LoraLinear`], in [`linear`]), attaching and removing adapters, merging them
//! into the base, and PEFT's adapter directory (`adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names). Burn 0.22's own `apply_lora` is not
//! used: it merges `base + scale * a @ b` into the weight at every forward pass (no dropout on
//! the input, a dense weight gradient) and initialises `A` N(0, 1/r), which is not PEFT's.
//! Which stages use adapters, and what their artifacts hold, is the stages' business.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rudder_schema::Precision;
use rudder_schema::kinds::{LinearModule, LoraArgs, SavedModule, TargetModules};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

pub mod linear;

pub use linear::{LoraAdapter, LoraLinear};

use super::llama::{CausalLm, DecoderLayer, Llama, RewardModel};
use crate::error::StageError;

/// File names of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The linear layers of one decoder layer with their transformers paths (relative to the layer).
fn layer_linears(layer: &DecoderLayer) -> [(LinearModule, &'static str, &LoraLinear); 7] {
    let (a, m) = (&layer.self_attn, &layer.mlp);
    [
        (LinearModule::QProj, "self_attn.q_proj", &a.q_proj),
        (LinearModule::KProj, "self_attn.k_proj", &a.k_proj),
        (LinearModule::VProj, "self_attn.v_proj", &a.v_proj),
        (LinearModule::OProj, "self_attn.o_proj", &a.o_proj),
        (LinearModule::GateProj, "mlp.gate_proj", &m.gate_proj),
        (LinearModule::UpProj, "mlp.up_proj", &m.up_proj),
        (LinearModule::DownProj, "mlp.down_proj", &m.down_proj),
    ]
}

fn layer_linears_mut(layer: &mut DecoderLayer) -> [(LinearModule, &mut LoraLinear); 7] {
    let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
    [
        (LinearModule::QProj, &mut a.q_proj),
        (LinearModule::KProj, &mut a.k_proj),
        (LinearModule::VProj, &mut a.v_proj),
        (LinearModule::OProj, &mut a.o_proj),
        (LinearModule::GateProj, &mut m.gate_proj),
        (LinearModule::UpProj, &mut m.up_proj),
        (LinearModule::DownProj, &mut m.down_proj),
    ]
}

/// PEFT's initial factors for a layer `[in] -> [out]`: `A` (`[r, in]`) uniform in
/// `±1/sqrt(in)` from `rng`, in PyTorch's row-major order, and `B` zero.
fn initial_adapter(
    rng: &mut ChaCha8Rng,
    d_in: usize,
    d_out: usize,
    args: &LoraArgs,
    device: &burn::tensor::Device,
) -> LoraAdapter {
    let r = args.r as usize;
    let bound = 1.0 / (d_in as f64).sqrt();
    let a: Vec<f32> = (0..r * d_in)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    adapter_from_torch(a, vec![0.0; d_out * r], d_in, d_out, args, device)
}

/// An adapter from PEFT's layouts (`A` `[r, in]`, `B` `[out, r]`), transposed into Burn's.
fn adapter_from_torch(
    a: Vec<f32>,
    b: Vec<f32>,
    d_in: usize,
    d_out: usize,
    args: &LoraArgs,
    device: &burn::tensor::Device,
) -> LoraAdapter {
    let r = args.r as usize;
    let t = |v: Vec<f32>, rows: usize, cols: usize| {
        Tensor::<2>::from_data(TensorData::new(v, [rows, cols]), device).transpose()
    };
    // Contiguous copies: matmuls on transposed views are slower on CPU.
    let contiguous = |x: Tensor<2>| {
        let dims = x.dims();
        Tensor::<2>::from_data(x.into_data(), device).reshape(dims)
    };
    LoraAdapter {
        lora_a: Param::from_tensor(contiguous(t(a, r, d_in))),
        lora_b: Param::from_tensor(contiguous(t(b, d_out, r))),
        scale: args.scale(),
        dropout: args.dropout,
    }
}

/// Models whose decoder linear layers can carry adapters.
pub trait Adaptable: Module + Sized {
    fn backbone(&self) -> &Llama;
    fn backbone_mut(&mut self) -> &mut Llama;
    /// The PEFT task type written to `adapter_config.json`.
    const TASK_TYPE: &'static str;
    /// The head that `modules_to_save` may name, with its transformers name.
    fn saved_module(&self, module: SavedModule) -> Option<&Linear>;
    fn saved_module_mut(&mut self, module: SavedModule) -> Option<&mut Linear>;
}

impl Adaptable for CausalLm {
    const TASK_TYPE: &'static str = "CAUSAL_LM";
    fn backbone(&self) -> &Llama {
        &self.model
    }
    fn backbone_mut(&mut self) -> &mut Llama {
        &mut self.model
    }
    fn saved_module(&self, module: SavedModule) -> Option<&Linear> {
        match module {
            SavedModule::LmHead => self.lm_head.as_ref(),
            SavedModule::Score => None,
        }
    }
    fn saved_module_mut(&mut self, module: SavedModule) -> Option<&mut Linear> {
        match module {
            SavedModule::LmHead => self.lm_head.as_mut(),
            SavedModule::Score => None,
        }
    }
}

impl Adaptable for RewardModel {
    const TASK_TYPE: &'static str = "SEQ_CLS";
    fn backbone(&self) -> &Llama {
        &self.model
    }
    fn backbone_mut(&mut self) -> &mut Llama {
        &mut self.model
    }
    fn saved_module(&self, module: SavedModule) -> Option<&Linear> {
        match module {
            SavedModule::Score => Some(&self.score),
            SavedModule::LmHead => None,
        }
    }
    fn saved_module_mut(&mut self, module: SavedModule) -> Option<&mut Linear> {
        match module {
            SavedModule::Score => Some(&mut self.score),
            SavedModule::LmHead => None,
        }
    }
}

/// Trains `l` in full: in fp32 (a frozen layer may be held in a half dtype, see
/// [`hold_frozen`]).
fn unfreeze(l: &mut Linear) {
    let fp32 = |p: Param<Tensor<2>>| p.map(|t| crate::precision::cast(t, DType::F32));
    l.weight = fp32(l.weight.clone()).set_require_grad(true);
    if let Some(b) = l.bias.take() {
        let b = b.map(|t| crate::precision::cast(t, DType::F32));
        l.bias = Some(b.set_require_grad(true));
    }
}

/// Under `precision = "bf16"`, every frozen parameter of `model` (on an autodiff device: a
/// stage's trainable model) held in the first of bf16 and f16 that holds its values exactly: the base of a LoRA stage over a bf16 or f16
/// checkpoint (as Hugging Face checkpoints are) then takes 2 bytes per weight (bf16's are cast
/// nowhere, f16's to bf16 where used), and its merged model is that base plus `scale * A B` to
/// the bit. A frozen tensor neither holds exactly (an fp32 checkpoint's) stays fp32 and is cast
/// where it is used. Adapters and `modules_to_save` stay fp32.
fn hold_frozen<M: Module>(model: M) -> M {
    struct Frozen;
    impl ModuleMapper for Frozen {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let value = param.val();
            if !value.is_autodiff() || value.is_require_grad() || value.dtype() != DType::F32 {
                return param;
            }
            for dtype in [DType::BF16, DType::F16] {
                let held = value.clone().cast(dtype);
                let exact = held.clone().cast(DType::F32).equal(value.clone()).all();
                if exact.into_scalar() {
                    return param.map(|_| held);
                }
            }
            param
        }
    }
    match crate::precision::current() {
        Precision::Bf16 => model.map(&mut Frozen),
        Precision::Fp32 => model,
    }
}

fn missing_module(module: SavedModule) -> StageError {
    StageError::Lora(format!(
        "`modules_to_save` names `{}`, which this model does not have",
        module.name()
    ))
}

/// Freezes every parameter of `model` (which lives on an autodiff device), then attaches fresh
/// adapters to the targeted layers (drawn from `seed`, layer by layer in transformers' order)
/// and unfreezes the `modules_to_save`. Only those are then trained.
pub fn attach<M: Adaptable>(model: M, args: &LoraArgs, seed: u64) -> Result<M, StageError> {
    let mut model = model.no_grad();
    let mut rng = ChaCha8Rng::seed_from_u64(crate::seeds::mix(seed, LORA_SALT));
    for layer in &mut model.backbone_mut().layers {
        for (module, l) in layer_linears_mut(layer) {
            if args.targets(module) {
                let [d_in, d_out] = l.base.weight.val().dims();
                let device = l.base.weight.val().device();
                l.lora = Some(initial_adapter(&mut rng, d_in, d_out, args, &device));
            }
        }
    }
    Ok(hold_frozen(unfreeze_modules(model, &args.modules_to_save)?))
}

/// `model` with `modules` trained in full beside its adapters (a reward model continuing a
/// language model's adapter trains its fresh `score`).
pub fn unfreeze_modules<M: Adaptable>(
    mut model: M,
    modules: &[SavedModule],
) -> Result<M, StageError> {
    for &module in modules {
        unfreeze(
            model
                .saved_module_mut(module)
                .ok_or_else(|| missing_module(module))?,
        );
    }
    Ok(model)
}

/// `model` with every adapter's dropout set to `dropout` (a stage continuing an adapter trains
/// it with its own `lora.dropout`).
pub fn with_dropout<M: Adaptable>(mut model: M, dropout: f64) -> M {
    for layer in &mut model.backbone_mut().layers {
        for (_, l) in layer_linears_mut(layer) {
            if let Some(adapter) = &mut l.lora {
                adapter.dropout = dropout;
            }
        }
    }
    model
}

/// Salt of the adapters' initialisation stream, so that it differs from the stage's other draws.
const LORA_SALT: u64 = 0x4c6f_5241;

/// The model with every adapter removed: the frozen base (the reference of DPO-family and RL
/// stages). Tensors are shared with `model`, not copied.
pub fn without_adapters<M: Adaptable>(model: &M) -> M {
    let mut base = model.clone();
    for layer in &mut base.backbone_mut().layers {
        for (_, l) in layer_linears_mut(layer) {
            l.lora = None;
        }
    }
    base
}

/// The model with every adapter merged into its base weight (`W + scale * A B`), as PEFT's
/// `merge_and_unload`.
pub fn merge<M: Adaptable>(model: &M) -> M {
    let mut merged = model.clone();
    for layer in &mut merged.backbone_mut().layers {
        for (_, l) in layer_linears_mut(layer) {
            *l = l.merged().into();
        }
    }
    merged
}

/// Whether any layer carries an adapter.
pub fn has_adapters<M: Adaptable>(model: &M) -> bool {
    model.backbone().layers.iter().any(|layer| {
        layer_linears(layer)
            .iter()
            .any(|(_, _, l)| l.lora.is_some())
    })
}

/// PEFT's name of a tensor of the wrapped model (`base_model.model.` + the transformers name).
fn peft_name(name: &str) -> String {
    format!("base_model.model.{name}")
}

fn torch_bytes(t: Tensor<2>, transpose: bool) -> (Vec<usize>, Vec<u8>) {
    let t = if transpose { t.transpose() } else { t };
    let shape = t.dims().to_vec();
    let values: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("converted to f32");
    (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The `adapter_config.json` PEFT writes for these settings.
pub fn adapter_config(args: &LoraArgs, task_type: &str) -> Value {
    let target_modules: Value = match &args.target_modules {
        TargetModules::AllLinear(_) => json!("all-linear"),
        TargetModules::List(list) => {
            let mut names: Vec<&str> = list.iter().map(|m| m.name()).collect();
            names.sort_unstable();
            names.dedup();
            json!(names)
        }
    };
    let modules_to_save: Value = if args.modules_to_save.is_empty() {
        Value::Null
    } else {
        json!(
            args.modules_to_save
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
        )
    };
    json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": Value::Null,
        "r": args.r,
        "lora_alpha": args.alpha,
        "lora_dropout": args.dropout,
        "target_modules": target_modules,
        "use_rslora": args.use_rslora,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
    })
}

/// Writes the adapters (and `modules_to_save`) of `model` as a PEFT adapter directory:
/// `adapter_config.json` and fp32 `adapter_model.safetensors` with PEFT's names
/// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...).
pub fn save_adapter<M: Adaptable>(
    model: &M,
    args: &LoraArgs,
    dir: &Path,
) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&adapter_config(args, M::TASK_TYPE))
        .expect("JSON values serialise");
    std::fs::write(&config_path, text + "\n").map_err(|e| StageError::io(&config_path, e))?;

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, layer) in model.backbone().layers.iter().enumerate() {
        for (_, path, l) in layer_linears(layer) {
            if let Some(adapter) = &l.lora {
                let prefix = peft_name(&format!("model.layers.{i}.{path}"));
                let (s, b) = torch_bytes(adapter.lora_a.val(), true);
                tensors.push((format!("{prefix}.lora_A.weight"), s, b));
                let (s, b) = torch_bytes(adapter.lora_b.val(), true);
                tensors.push((format!("{prefix}.lora_B.weight"), s, b));
            }
        }
    }
    for &module in &args.modules_to_save {
        let l = model
            .saved_module(module)
            .ok_or_else(|| missing_module(module))?;
        let prefix = peft_name(module.name());
        let (s, b) = torch_bytes(l.weight.val(), true);
        tensors.push((format!("{prefix}.weight"), s, b));
        if let Some(bias) = &l.bias {
            let v: Vec<f32> = bias
                .val()
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("converted to f32");
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((format!("{prefix}.bias"), vec![v.len()], bytes));
        }
    }
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
        StageError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        }
    })
}

/// Reads `adapter_config.json` into rudder's LoRA settings ([`LoraArgs::from_peft_config`]:
/// settings rudder does not implement are refused rather than ignored).
pub fn read_adapter_config(dir: &Path) -> Result<LoraArgs, StageError> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| StageError::Json {
        path: path.clone(),
        source,
    })?;
    LoraArgs::from_peft_config(&value)
        .map_err(|message| StageError::AdapterConfig { path, message })
}

/// Freezes `model` and attaches the adapters of the PEFT directory `dir` (settings and
/// weights), to continue training them or to run base + adapter. Returns the settings read.
pub fn load_adapter<M: Adaptable>(model: M, dir: &Path) -> Result<(M, LoraArgs), StageError> {
    let args = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| StageError::Safetensors {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, StageError> {
        let view = st.tensor(name).map_err(|_| StageError::MissingTensor {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        })?;
        if view.shape() != shape {
            return Err(StageError::ShapeMismatch {
                dir: dir.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        match view.dtype() {
            Dtype::F32 => Ok(view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::BF16 => Ok(view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::F16 => Ok(view
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            other => Err(StageError::UnsupportedDtype {
                dir: dir.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    };
    let mut model = model.no_grad();
    let r = args.r as usize;
    for (i, layer) in model.backbone_mut().layers.iter_mut().enumerate() {
        let paths = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        for ((module, l), path) in layer_linears_mut(layer).into_iter().zip(paths) {
            if !args.targets(module) {
                continue;
            }
            let [d_in, d_out] = l.base.weight.val().dims();
            let device = l.base.weight.val().device();
            let prefix = peft_name(&format!("model.layers.{i}.{path}"));
            let a = read(&format!("{prefix}.lora_A.weight"), &[r, d_in])?;
            let b = read(&format!("{prefix}.lora_B.weight"), &[d_out, r])?;
            l.lora = Some(adapter_from_torch(a, b, d_in, d_out, &args, &device));
        }
    }
    for &module in &args.modules_to_save {
        let l = model
            .saved_module_mut(module)
            .ok_or_else(|| missing_module(module))?;
        let [d_in, d_out] = l.weight.val().dims();
        let device = l.weight.val().device();
        let prefix = peft_name(module.name());
        let w = read(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let t = Tensor::<2>::from_data(TensorData::new(w, [d_out, d_in]), &device).transpose();
        let t = Tensor::<2>::from_data(t.into_data(), &device);
        l.weight = Param::from_tensor(t).set_require_grad(true);
        if let Some(bias) = l.bias.take() {
            let v = read(&format!("{prefix}.bias"), &[d_out])?;
            let t = Tensor::<1>::from_data(TensorData::new(v, [d_out]), &device);
            drop(bias);
            l.bias = Some(Param::from_tensor(t).set_require_grad(true));
        }
    }
    Ok((hold_frozen(model), args))
}

#[cfg(test)]
mod tests;
