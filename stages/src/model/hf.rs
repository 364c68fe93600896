//! Hugging Face model directories: reading `config.json` and the weights (`model.safetensors` or
//! an index of shards; f32, bf16 or f16, cast to f32) into the modules of `llama.rs`, and writing
//! them back in the same layout (fp32, transformers' tensor names) so that `transformers` loads
//! the result as is. PyTorch stores linear weights `[out, in]`, Burn `[in, out]`: the
//! transposition happens here and nowhere else. Fresh models are built through the same path from
//! a seeded generator, so their initialisation does not depend on the backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::attention::Attention;
use super::config::{Architecture, ModelConfig, WeightDtype};
use super::llama::{CausalLm, DecoderLayer, Llama, RewardModel};
use super::mlp::Mlp;
use super::rms_norm::RmsNorm;
use crate::error::StageError;

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Where parameter values come from when a model is built.
trait WeightSource {
    /// The values of tensor `name` in PyTorch layout, checked against `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, StageError>;
}

/// Tensors of a directory's safetensors files, read whole into memory.
struct SafetensorsSource {
    dir: PathBuf,
    /// Raw bytes of each file.
    files: Vec<Vec<u8>>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    fn open(dir: &Path) -> Result<Self, StageError> {
        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        let shard_names: Vec<String> = if single.is_file() {
            vec![WEIGHTS_FILE.to_string()]
        } else if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| StageError::io(&index_path, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|source| StageError::Json {
                path: index_path.clone(),
                source,
            })?;
            let map = value
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| StageError::Safetensors {
                    path: index_path.clone(),
                    message: "missing `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(StageError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            // Shard names come from a file: refuse anything that would leave the directory.
            if Path::new(name).components().count() != 1 {
                return Err(StageError::Safetensors {
                    path: index_path.clone(),
                    message: format!("shard `{name}` is not a file name"),
                });
            }
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
            let parsed = SafeTensors::deserialize(&bytes).map_err(|e| StageError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for tensor_name in parsed.names() {
                index.insert(tensor_name.to_string(), i);
            }
            files.push(bytes);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The dtype the weights are stored in: the embedding table's (the tensor every model has;
    /// checkpoints keep norms in the same dtype as the matrices).
    fn dtype(&self) -> WeightDtype {
        let Some(&file) = self.index.get("model.embed_tokens.weight") else {
            return WeightDtype::F32;
        };
        SafeTensors::deserialize(&self.files[file])
            .ok()
            .and_then(|t| {
                t.tensor("model.embed_tokens.weight")
                    .ok()
                    .map(|v| v.dtype())
            })
            .map_or(WeightDtype::F32, |d| match d {
                Dtype::BF16 => WeightDtype::Bf16,
                Dtype::F16 => WeightDtype::F16,
                _ => WeightDtype::F32,
            })
    }
}

impl WeightSource for SafetensorsSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, StageError> {
        let missing = || StageError::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
        };
        let file = *self.index.get(name).ok_or_else(missing)?;
        let parsed =
            SafeTensors::deserialize(&self.files[file]).map_err(|e| StageError::Safetensors {
                path: self.dir.clone(),
                message: e.to_string(),
            })?;
        let view = parsed.tensor(name).map_err(|_| missing())?;
        if view.shape() != shape {
            return Err(StageError::ShapeMismatch {
                dir: self.dir.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(StageError::UnsupportedDtype {
                    dir: self.dir.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(values)
    }
}

/// Seeded fresh weights: N(0, std) for matrices, ones for norms, zeros for biases, drawn from
/// ChaCha8 in the (fixed) order the model is built.
struct RandomSource {
    rng: ChaCha8Rng,
    std: f64,
}

impl RandomSource {
    fn normal(&mut self) -> f64 {
        // Box-Muller on two uniforms in (0, 1].
        let u = |rng: &mut ChaCha8Rng| ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let (u1, u2) = (u(&mut self.rng), u(&mut self.rng));
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

impl WeightSource for RandomSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, StageError> {
        let n: usize = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (self.normal() * self.std) as f32).collect()
        })
    }
}

/// A weight on `device`: in fp32, or in bf16 for a model that only infers (not on an autodiff
/// device) under `precision = "bf16"`, which casts every weight to bf16 where it is used anyway.
fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    let t = Tensor::<D>::from_data(TensorData::new(values, shape), device);
    match crate::precision::current() {
        rudder_schema::Precision::Bf16 if !device.is_autodiff() => {
            t.cast(burn::tensor::DType::BF16)
        }
        _ => t,
    }
}

fn linear(
    src: &mut dyn WeightSource,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<Linear, StageError> {
    let w = src.take(&format!("{prefix}.weight"), &[d_out, d_in])?;
    // PyTorch [out, in] -> Burn [in, out], transposed on the host so that the parameter is a
    // contiguous buffer rather than a strided view (matmuls on views are slower on CPU).
    let mut t = vec![0f32; w.len()];
    for o in 0..d_out {
        for i in 0..d_in {
            t[i * d_out + o] = w[o * d_in + i];
        }
    }
    let weight = tensor::<2>(t, [d_in, d_out], device);
    let bias = if bias {
        let b = src.take(&format!("{prefix}.bias"), &[d_out])?;
        Some(Param::from_tensor(tensor::<1>(b, [d_out], device)))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias,
    })
}

fn norm(
    src: &mut dyn WeightSource,
    name: &str,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<RmsNorm, StageError> {
    let w = src.take(name, &[cfg.hidden_size])?;
    Ok(RmsNorm {
        weight: Param::from_tensor(tensor::<1>(w, [cfg.hidden_size], device)),
        eps: cfg.rms_norm_eps,
    })
}

fn build_backbone(
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    device: &Device,
) -> Result<Llama, StageError> {
    let h = cfg.hidden_size;
    let emb = src.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let embed_tokens = Embedding {
        weight: Param::from_tensor(tensor::<2>(emb, [cfg.vocab_size, h], device)),
    };
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    // Not `with_capacity`: the layer count comes from config.json, and a layer exists only once
    // its weights have been read from the file.
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let input_layernorm = norm(src, &format!("{p}.input_layernorm.weight"), cfg, device)?;
        let a = format!("{p}.self_attn");
        let self_attn = Attention {
            q_proj: linear(src, &format!("{a}.q_proj"), h, q, cfg.qkv_bias, device)?.into(),
            k_proj: linear(src, &format!("{a}.k_proj"), h, kv, cfg.qkv_bias, device)?.into(),
            v_proj: linear(src, &format!("{a}.v_proj"), h, kv, cfg.qkv_bias, device)?.into(),
            o_proj: linear(src, &format!("{a}.o_proj"), q, h, cfg.o_bias, device)?.into(),
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        let post_attention_layernorm = norm(
            src,
            &format!("{p}.post_attention_layernorm.weight"),
            cfg,
            device,
        )?;
        let m = format!("{p}.mlp");
        let ff = cfg.intermediate_size;
        let mlp = Mlp {
            gate_proj: linear(src, &format!("{m}.gate_proj"), h, ff, cfg.mlp_bias, device)?.into(),
            up_proj: linear(src, &format!("{m}.up_proj"), h, ff, cfg.mlp_bias, device)?.into(),
            down_proj: linear(src, &format!("{m}.down_proj"), ff, h, cfg.mlp_bias, device)?.into(),
        };
        layers.push(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        });
    }
    let norm = norm(src, "model.norm.weight", cfg, device)?;
    Ok(Llama {
        embed_tokens,
        layers,
        norm,
        head_dim: cfg.head_dim,
        rope_theta: cfg.rope_theta,
        sliding_window: cfg.sliding_window.unwrap_or(0),
        bf16: crate::precision::current() == rudder_schema::Precision::Bf16,
    })
}

fn build_causal_lm(
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    device: &Device,
) -> Result<CausalLm, StageError> {
    let model = build_backbone(cfg, src, device)?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(linear(
            src,
            "lm_head",
            cfg.hidden_size,
            cfg.vocab_size,
            false,
            device,
        )?)
    };
    Ok(CausalLm { model, lm_head })
}

fn build_reward_model(
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    device: &Device,
) -> Result<RewardModel, StageError> {
    let model = build_backbone(cfg, src, device)?;
    let score = linear(src, "score", cfg.hidden_size, 1, false, device)?;
    Ok(RewardModel { model, score })
}

/// Reads `DIR/config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig, StageError> {
    ModelConfig::from_file(&dir.join(CONFIG_FILE))
}

/// Loads a causal language model from a Hugging Face directory.
///
/// A `LlamaForSequenceClassification` directory is refused: its backbone could be read but it has
/// no LM head, and silently inventing one would produce nonsense.
pub fn load_causal_lm(dir: &Path, device: &Device) -> Result<(ModelConfig, CausalLm), StageError> {
    let mut cfg = load_config(dir)?;
    if cfg.architecture.is_sequence_classifier() {
        return Err(StageError::Config {
            path: dir.join(CONFIG_FILE),
            message: "this is a sequence classifier (reward model); a causal language model is needed here".into(),
        });
    }
    let mut src = SafetensorsSource::open(dir)?;
    cfg.dtype = src.dtype();
    let model = build_causal_lm(&cfg, &mut src, device)?;
    Ok((cfg, model))
}

/// Loads a reward (or value) model. A causal LM directory is accepted too: its backbone is read
/// and the `score` head must then be present, as transformers requires.
pub fn load_reward_model(
    dir: &Path,
    device: &Device,
) -> Result<(ModelConfig, RewardModel), StageError> {
    let mut cfg = load_config(dir)?;
    let mut src = SafetensorsSource::open(dir)?;
    cfg.dtype = src.dtype();
    let model = build_reward_model(&cfg, &mut src, device)?;
    cfg.architecture = Architecture::LlamaForSequenceClassification;
    Ok((cfg, model))
}

/// Builds a reward model from a causal LM directory's backbone with a fresh scalar head
/// (N(0, initializer_range) from `seed`), as transformers does when it loads a causal checkpoint
/// into `AutoModelForSequenceClassification`.
pub fn reward_model_from_causal_lm(
    dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<(ModelConfig, RewardModel), StageError> {
    let mut cfg = load_config(dir)?;
    let mut src = SafetensorsSource::open(dir)?;
    cfg.dtype = src.dtype();
    let model = build_backbone(&cfg, &mut src, device)?;
    let mut random = RandomSource {
        rng: ChaCha8Rng::seed_from_u64(seed),
        std: cfg.initializer_range,
    };
    let score = if src.contains("score.weight") {
        linear(&mut src, "score", cfg.hidden_size, 1, false, device)?
    } else {
        linear(&mut random, "score", cfg.hidden_size, 1, false, device)?
    };
    cfg.architecture = Architecture::LlamaForSequenceClassification;
    Ok((cfg, RewardModel { model, score }))
}

/// A fresh causal LM with seeded weights: N(0, initializer_range) matrices, unit norms, zero
/// biases. The same seed gives the same weights on every backend.
pub fn random_causal_lm(cfg: &ModelConfig, seed: u64, device: &Device) -> CausalLm {
    let mut src = RandomSource {
        rng: ChaCha8Rng::seed_from_u64(seed),
        std: cfg.initializer_range,
    };
    build_causal_lm(cfg, &mut src, device).expect("a random source never fails")
}

/// A fresh reward model with seeded weights (see [`random_causal_lm`]).
pub fn random_reward_model(cfg: &ModelConfig, seed: u64, device: &Device) -> RewardModel {
    let mut src = RandomSource {
        rng: ChaCha8Rng::seed_from_u64(seed),
        std: cfg.initializer_range,
    };
    build_reward_model(cfg, &mut src, device).expect("a random source never fails")
}

/// Named tensors in PyTorch layout, ready to be written.
struct Collected {
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
}

impl Collected {
    fn push<const D: usize>(&mut self, name: String, t: Tensor<D>) {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>();
        let values: Vec<f32> = data.try_to_vec::<f32>().expect("converted to f32");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name, shape, bytes));
    }

    fn linear(&mut self, prefix: &str, l: &Linear) {
        self.push(format!("{prefix}.weight"), l.weight.val().transpose());
        if let Some(b) = &l.bias {
            self.push(format!("{prefix}.bias"), b.val());
        }
    }

    fn backbone(&mut self, m: &Llama) {
        self.push(
            "model.embed_tokens.weight".into(),
            m.embed_tokens.weight.val(),
        );
        for (i, layer) in m.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            self.push(
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.val(),
            );
            self.push(
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.val(),
            );
            let a = &layer.self_attn;
            self.linear(&format!("{p}.self_attn.q_proj"), &a.q_proj);
            self.linear(&format!("{p}.self_attn.k_proj"), &a.k_proj);
            self.linear(&format!("{p}.self_attn.v_proj"), &a.v_proj);
            self.linear(&format!("{p}.self_attn.o_proj"), &a.o_proj);
            self.linear(&format!("{p}.mlp.gate_proj"), &layer.mlp.gate_proj);
            self.linear(&format!("{p}.mlp.up_proj"), &layer.mlp.up_proj);
            self.linear(&format!("{p}.mlp.down_proj"), &layer.mlp.down_proj);
        }
        self.push("model.norm.weight".into(), m.norm.weight.val());
    }

    fn write(self, dir: &Path, cfg: &ModelConfig) -> Result<(), StageError> {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
        let config_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&cfg.to_json()).expect("JSON values serialise");
        std::fs::write(&config_path, text + "\n").map_err(|e| StageError::io(&config_path, e))?;

        // generate() and transformers read the stop tokens from here.
        if !cfg.eos_token_ids.is_empty() {
            let gen_path = dir.join(GENERATION_CONFIG_FILE);
            let mut generation = serde_json::Map::new();
            let cfg_json = cfg.to_json();
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = cfg_json.get(key).filter(|v| !v.is_null()) {
                    generation.insert(key.into(), v.clone());
                }
            }
            let text = serde_json::to_string_pretty(&Value::Object(generation))
                .expect("JSON values serialise");
            std::fs::write(&gen_path, text + "\n").map_err(|e| StageError::io(&gen_path, e))?;
        }

        let path = dir.join(WEIGHTS_FILE);
        // Rounded to nearest-even from the fp32 the model trains in.
        let (dtype, tensors) = match cfg.dtype {
            WeightDtype::F32 => (Dtype::F32, self.tensors),
            half @ (WeightDtype::Bf16 | WeightDtype::F16) => {
                let convert = |bytes: &[u8]| -> Vec<u8> {
                    bytes
                        .chunks_exact(4)
                        .flat_map(|c| {
                            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            if half == WeightDtype::Bf16 {
                                half::bf16::from_f32(v).to_le_bytes()
                            } else {
                                half::f16::from_f32(v).to_le_bytes()
                            }
                        })
                        .collect()
                };
                let dtype = if half == WeightDtype::Bf16 {
                    Dtype::BF16
                } else {
                    Dtype::F16
                };
                let tensors = self
                    .tensors
                    .into_iter()
                    .map(|(name, shape, bytes)| {
                        let converted = convert(&bytes);
                        (name, shape, converted)
                    })
                    .collect();
                (dtype, tensors)
            }
        };
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StageError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        // transformers refuses safetensors files whose metadata does not name the format.
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
            StageError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })
    }
}

/// Writes a causal LM as a Hugging Face directory (config.json + model.safetensors in
/// `cfg.dtype`).
pub fn save_causal_lm(model: &CausalLm, cfg: &ModelConfig, dir: &Path) -> Result<(), StageError> {
    let mut out = Collected {
        tensors: Vec::new(),
    };
    out.backbone(&model.model);
    let mut cfg = cfg.clone();
    match &model.lm_head {
        Some(head) => {
            out.linear("lm_head", head);
            cfg.tie_word_embeddings = false;
        }
        None => cfg.tie_word_embeddings = true,
    }
    if cfg.architecture.is_sequence_classifier() {
        cfg.architecture = Architecture::LlamaForCausalLM;
    }
    out.write(dir, &cfg)
}

/// Writes a reward model as a `LlamaForSequenceClassification` directory.
pub fn save_reward_model(
    model: &RewardModel,
    cfg: &ModelConfig,
    dir: &Path,
) -> Result<(), StageError> {
    let mut out = Collected {
        tensors: Vec::new(),
    };
    out.backbone(&model.model);
    out.linear("score", &model.score);
    let mut cfg = cfg.clone();
    cfg.architecture = Architecture::LlamaForSequenceClassification;
    cfg.tie_word_embeddings = false;
    out.write(dir, &cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        let mut cfg = ModelConfig::llama(32, 16, 24, 2, 4, 2);
        cfg.eos_token_ids = vec![2];
        cfg
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec().unwrap()
    }

    #[test]
    fn random_init_is_seeded_and_scaled() {
        let device = crate::test_device();
        let cfg = tiny();
        let a = random_causal_lm(&cfg, 7, &device);
        let b = random_causal_lm(&cfg, 7, &device);
        let c = random_causal_lm(&cfg, 8, &device);
        let emb = |m: &CausalLm| values(m.model.embed_tokens.weight.val());
        assert_eq!(emb(&a), emb(&b));
        assert_ne!(emb(&a), emb(&c));
        // 32 x 16 draws of N(0, 0.02^2): the sample std is within 10% of 0.02.
        let e = emb(&a);
        let std = (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        assert!(values(a.model.norm.weight.val()).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn fresh_model_round_trips_through_a_directory() {
        let device = crate::test_device();
        let mut cfg = tiny();
        cfg.architecture = Architecture::Qwen2ForCausalLM;
        cfg.qkv_bias = true;
        let model = random_causal_lm(&cfg, 1, &device);
        let dir = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &cfg, dir.path()).unwrap();
        assert!(dir.path().join(GENERATION_CONFIG_FILE).is_file());
        let (cfg2, again) = load_causal_lm(dir.path(), &device).unwrap();
        assert_eq!(cfg2.architecture, Architecture::Qwen2ForCausalLM);
        assert!(again.model.layers[0].self_attn.q_proj.bias.is_some());
        assert!(again.model.layers[0].self_attn.o_proj.bias.is_none());
        let ids = Tensor::<2, burn::tensor::Int>::from_data(
            TensorData::new(vec![1i64, 5, 9], [1, 3]),
            &device,
        );
        assert_eq!(
            values(model.forward(ids.clone(), None, None)),
            values(again.forward(ids, None, None))
        );
    }

    #[test]
    fn sharded_bf16_weights_load_as_f32() {
        let device = crate::test_device();
        let cfg = tiny();
        let model = random_causal_lm(&cfg, 3, &device);
        let dir = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &cfg, dir.path()).unwrap();
        // Rewrite the weights as two bf16 shards with an index.
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        type Shard = Vec<(String, Vec<usize>, Vec<u8>)>;
        let mut shards: [Shard; 2] = [Vec::new(), Vec::new()];
        let mut weight_map = serde_json::Map::new();
        for (i, (name, view)) in st.tensors().into_iter().enumerate() {
            let bf16: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            weight_map.insert(name.clone(), Value::String(file));
            shards[i % 2].push((name, view.shape().to_vec(), bf16));
        }
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
        for (i, shard) in shards.iter().enumerate() {
            let views: Vec<_> = shard
                .iter()
                .map(|(n, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let path = dir
                .path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1));
            safetensors::serialize_to_file(views, None, &path).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.path().join(WEIGHTS_INDEX_FILE), index.to_string()).unwrap();

        let (_, loaded) = load_causal_lm(dir.path(), &device).unwrap();
        let original = values(model.model.embed_tokens.weight.val());
        let rounded = values(loaded.model.embed_tokens.weight.val());
        for (o, r) in original.iter().zip(&rounded) {
            assert_eq!(*r, half::bf16::from_f32(*o).to_f32());
        }
    }

    /// A model's weights, dtype by tensor name, and config.json, as saved in `dir`.
    fn saved(dir: &Path) -> (HashMap<String, (Dtype, Vec<u8>)>, Value) {
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, (view.dtype(), view.data().to_vec())))
            .collect();
        let config =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        (tensors, config)
    }

    #[test]
    fn weights_are_saved_in_the_dtype_they_were_loaded_in_unless_asked_otherwise() {
        use rudder_schema::kinds::SaveDtype;
        let device = crate::test_device();
        let mut cfg = tiny();
        // A checkpoint written by transformers 4 names its dtype `torch_dtype`.
        cfg.raw
            .insert("torch_dtype".into(), Value::String("bfloat16".into()));
        let model = random_causal_lm(&cfg, 5, &device);
        let bf16_dir = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &cfg.saved_as(SaveDtype::Bf16), bf16_dir.path()).unwrap();
        let (bf16, config) = saved(bf16_dir.path());
        assert!(bf16.values().all(|(d, _)| *d == Dtype::BF16));
        assert_eq!(config["dtype"], "bfloat16");
        assert_eq!(config["torch_dtype"], "bfloat16");

        // Loaded (as f32 for training) and saved again with `auto`: bf16, the same bytes.
        let (loaded_cfg, loaded) = load_causal_lm(bf16_dir.path(), &device).unwrap();
        assert_eq!(loaded_cfg.dtype, WeightDtype::Bf16);
        let again = tempfile::tempdir().unwrap();
        save_causal_lm(&loaded, &loaded_cfg.saved_as(SaveDtype::Auto), again.path()).unwrap();
        let (auto, _) = saved(again.path());
        assert_eq!(auto, bf16);
        let size = |d: &Path| std::fs::metadata(d.join(WEIGHTS_FILE)).unwrap().len();

        // fp32 on request: twice the bytes, the same values.
        let fp32_dir = tempfile::tempdir().unwrap();
        save_causal_lm(
            &loaded,
            &loaded_cfg.saved_as(SaveDtype::Fp32),
            fp32_dir.path(),
        )
        .unwrap();
        let (fp32, config) = saved(fp32_dir.path());
        assert_eq!(config["dtype"], "float32");
        assert_eq!(config["torch_dtype"], "float32");
        assert!(fp32.values().all(|(d, _)| *d == Dtype::F32));
        let data =
            |t: &HashMap<String, (Dtype, Vec<u8>)>| t.values().map(|(_, b)| b.len()).sum::<usize>();
        assert_eq!(data(&fp32), 2 * data(&auto));
        assert!(size(fp32_dir.path()) > size(again.path()));
        let (_, from_fp32) = load_causal_lm(fp32_dir.path(), &device).unwrap();
        assert_eq!(
            values(from_fp32.model.embed_tokens.weight.val()),
            values(loaded.model.embed_tokens.weight.val())
        );

        // f16, rounded to nearest from the fp32 values.
        let f16_dir = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &cfg.saved_as(SaveDtype::F16), f16_dir.path()).unwrap();
        let (f16, config) = saved(f16_dir.path());
        assert_eq!(config["dtype"], "float16");
        let (dtype, bytes) = &f16["model.norm.weight"];
        assert_eq!(*dtype, Dtype::F16);
        let expect: Vec<u8> = values(model.model.norm.weight.val())
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(bytes, &expect);

        // A fresh fp32 model with `auto` stays fp32.
        let fresh = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &tiny().saved_as(SaveDtype::Auto), fresh.path()).unwrap();
        assert!(
            saved(fresh.path())
                .0
                .values()
                .all(|(d, _)| *d == Dtype::F32)
        );
    }
}
