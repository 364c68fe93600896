//! Peak-memory estimates of training stages, from a model's shape (config.json's names) and the
//! stage's batch: the arithmetic `rudder plan` shows, written out in the README. It needs no
//! tensor library; it says nothing about what a backend actually allocates (that is measured).
//!
//! ```text
//! weights      P x 4                           every parameter, trained or frozen (fp32)
//!   bf16:      T x 6 + F x f                   trained weights in fp32 and their bf16 copies
//!                                              (cast for the matmuls, kept for the backward
//!                                              pass); LoRA's frozen base F = P held in its
//!                                              disk dtype: f = 2 (bf16), 4 (f16 + bf16 copy),
//!                                              6 (fp32 + bf16 copy)
//!   reference  + P x 4 (bf16: P x 2)           a full frozen copy (TR-DPO, RL without LoRA)
//! gradients    T x 4                           T trained parameters (all, or LoRA's A/B)
//! optimizer    T x 8                           AdamW's two fp32 moments
//! activations  B x S x (L x a + 2V) x 4        kept for the backward pass, per token:
//!   bf16:      B x S x (L x (2a + 2c) + 10V)   the layers' in bf16 but the attention core's
//!                                              c (fp32), the logits in bf16 and fp32, the
//!                                              log-softmax in fp32
//!              a = 2H + H + (q + 2kv) + q + nH x S + H + 3I   per layer (see `per_layer`),
//!              of which c = (q + 2kv) + nH x S in the attention core
//!              with gradient checkpointing: a = H + (q + 2kv) + q + 2I (matmul outputs only),
//!              c = q
//!              2V: the logits and their log-softmax
//! ```

use rudder_schema::kinds::{LinearModule, LoraArgs, SavedModule};
use serde_json::Value;

/// What the arithmetic needs of a model (transformers' config.json names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub tie_word_embeddings: bool,
    /// A scalar `score` head instead of the LM head (reward and value models).
    pub reward_head: bool,
    /// The dtype of the weights on disk (config.json's `dtype` or `torch_dtype`), in which a
    /// bf16 LoRA stage holds its frozen base when that is exact.
    pub disk_dtype: DiskDtype,
}

/// The dtype a model's weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    Bf16,
    F16,
}

impl DiskDtype {
    /// Bytes per frozen weight of a bf16 stage: held in this dtype (fp32 for fp32 weights,
    /// which bf16 would round), plus a bf16 copy kept for the backward pass unless it is bf16.
    fn frozen_bytes_in_bf16(self) -> u64 {
        match self {
            DiskDtype::Bf16 => 2,
            DiskDtype::F16 => 2 + 2,
            DiskDtype::F32 => 4 + 2,
        }
    }
}

impl ModelShape {
    /// Reads a model's shape from its config.json; `None` when a needed field is missing.
    pub fn from_config(config: &Value) -> Option<Self> {
        let get = |k: &str| config.get(k).and_then(Value::as_u64);
        let hidden_size = get("hidden_size")?;
        let num_attention_heads = get("num_attention_heads")?;
        let reward_head = config
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter().any(|v| {
                    v.as_str()
                        .is_some_and(|s| s.ends_with("SequenceClassification"))
                })
            });
        Some(Self {
            vocab_size: get("vocab_size")?,
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: get("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim: get("head_dim").unwrap_or(hidden_size / num_attention_heads.max(1)),
            tie_word_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            reward_head,
            disk_dtype: match ["dtype", "torch_dtype"]
                .iter()
                .find_map(|k| config.get(*k).and_then(Value::as_str))
            {
                Some("bfloat16") => DiskDtype::Bf16,
                Some("float16") => DiskDtype::F16,
                _ => DiskDtype::F32,
            },
        })
    }

    /// `(in, out)` of a decoder layer's linear layer.
    fn linear(&self, module: LinearModule) -> (u64, u64) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match module {
            LinearModule::QProj => (h, q),
            LinearModule::KProj | LinearModule::VProj => (h, kv),
            LinearModule::OProj => (q, h),
            LinearModule::GateProj | LinearModule::UpProj => (h, i),
            LinearModule::DownProj => (i, h),
        }
    }

    fn head_params(&self) -> u64 {
        if self.reward_head {
            self.hidden_size
        } else if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * self.hidden_size
        }
    }

    /// Every parameter: embeddings, layers (linear layers and two norms each), the final norm
    /// and the head.
    pub fn parameters(&self) -> u64 {
        let h = self.hidden_size;
        let per_layer: u64 = LinearModule::ALL
            .iter()
            .map(|&m| {
                let (i, o) = self.linear(m);
                i * o
            })
            .sum::<u64>()
            + 2 * h;
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + self.head_params()
    }

    /// The parameters LoRA trains: `r x (in + out)` per targeted layer, and the
    /// `modules_to_save` in full.
    pub fn lora_parameters(&self, lora: &LoraArgs) -> u64 {
        let r = u64::from(lora.r);
        let per_layer: u64 = LinearModule::ALL
            .iter()
            .filter(|&&m| lora.targets(m))
            .map(|&m| {
                let (i, o) = self.linear(m);
                r * (i + o)
            })
            .sum();
        let saved: u64 = lora
            .modules_to_save
            .iter()
            .map(|m| match m {
                SavedModule::Score | SavedModule::LmHead => self.head_params(),
            })
            .sum();
        self.num_hidden_layers * per_layer + saved
    }

    /// Activation bytes kept per token for the backward pass, over all layers and the head.
    fn per_token_bytes(&self, seq_len: u64, checkpointing: bool, bf16: bool) -> u64 {
        let (values, attention) = self.per_layer(seq_len, checkpointing);
        let (values, attention) = (
            self.num_hidden_layers * values,
            self.num_hidden_layers * attention,
        );
        let head = self.head_values();
        match bf16 {
            // The attention core in fp32; the head's outputs in bf16, then in fp32 with their
            // log-softmax.
            true => 2 * values + 4 * attention + 4 * head + 2 * (head / 2).max(1),
            false => 4 * (values + attention + head),
        }
    }

    /// Values kept by the head per token: the logits and their log-softmax (one score for a
    /// reward head).
    fn head_values(&self) -> u64 {
        if self.reward_head {
            1
        } else {
            2 * self.vocab_size
        }
    }

    /// Activation values one decoder layer keeps per token for the backward pass: those kept
    /// in the activations' dtype, and those of the attention core, which computes in fp32.
    fn per_layer(&self, seq_len: u64, checkpointing: bool) -> (u64, u64) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        if checkpointing {
            // Burn's balanced strategy keeps the outputs of compute-bound operations (the
            // matmuls: the projections, the attention core's, gate/up) and recomputes the rest.
            (h + (q + 2 * kv) + 2 * i, q)
        } else {
            // Two residual inputs of the norms, the normed input of q/k/v, the input of o_proj,
            // the normed input of the MLP, gate/up and their gated product; the attention
            // core's q/k/v and probabilities.
            (
                2 * h + h + q + h + 3 * i,
                (q + 2 * kv) + self.num_attention_heads * seq_len,
            )
        }
    }
}

/// What a training stage runs: its batch, precision and memory-saving settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingShape {
    pub batch_size: u64,
    pub seq_len: u64,
    /// Mixed precision (`precision = "bf16"`).
    pub bf16: bool,
    pub lora: Option<LoraArgs>,
    pub gradient_checkpointing: bool,
    /// A frozen reference model held besides the policy (TR-DPO, RL kinds without LoRA).
    pub reference_copy: bool,
}

/// A training stage's estimated peak, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }
}

/// The estimate of [the module docs](self).
pub fn estimate(model: &ModelShape, training: &TrainingShape) -> MemoryEstimate {
    let params = model.parameters();
    let trained = match &training.lora {
        Some(lora) => model.lora_parameters(lora),
        None => params,
    };
    // LoRA's factors (and `modules_to_save`) are held beside the frozen model; full
    // fine-tuning trains the model itself.
    let (frozen, trainable) = match &training.lora {
        Some(_) => (params, trained),
        None => (0, params),
    };
    let weights = match training.bf16 {
        // Trained weights in fp32 plus the bf16 copies their matmuls keep; frozen ones as
        // `DiskDtype::frozen_bytes_in_bf16` says.
        true => frozen * model.disk_dtype.frozen_bytes_in_bf16() + trainable * (4 + 2),
        false => (frozen + trainable) * 4,
    };
    let reference = match (training.reference_copy, training.bf16) {
        (false, _) => 0,
        (true, true) => params * 2,
        (true, false) => params * 4,
    };
    MemoryEstimate {
        weights: weights + reference,
        gradients: trained * 4,
        optimizer: trained * 8,
        activations: training.batch_size
            * training.seq_len
            * model.per_token_bytes(
                training.seq_len,
                training.gradient_checkpointing,
                training.bf16,
            ),
    }
}

/// Kinds that train a model, with how many sequences one batch element is (a preference pair
/// runs its chosen and rejected sides together).
fn training_kind(kind: &str) -> Option<u64> {
    match kind {
        "pretrain" | "sft" | "ppo" | "rloo" | "grpo" => Some(1),
        "reward" | "dpo" | "kto" | "orpo" | "simpo" | "iterative_dpo" => Some(2),
        _ => None,
    }
}

/// The estimate of every training stage of `recipe` whose model's shape can be read (a
/// `models.X.hf` directory's config.json or a fresh architecture, followed through the stages
/// that train it), in the recipe's order.
pub fn recipe_estimates(recipe: &rudder_schema::Recipe) -> Vec<(String, MemoryEstimate)> {
    use rudder_schema::NodeBody;
    let mut out = Vec::new();
    for node in &recipe.nodes {
        let NodeBody::Stage(stage) = &node.body else {
            continue;
        };
        let Some(sequences) = training_kind(stage.spec.kind()) else {
            continue;
        };
        let Some(mut shape) = model_shape(recipe, &node.name, 0) else {
            continue;
        };
        let Some(train) = stage.spec.train_args() else {
            continue;
        };
        // Lengths are named per kind (`max_length`, `max_prompt_length` + `max_new_tokens`).
        let params = stage.spec.params();
        let get = |k: &str| params.get(k).and_then(Value::as_u64);
        let mut lora: Option<LoraArgs> = train.lora.clone();
        if stage.spec.kind() == "reward" {
            shape.reward_head = true;
            // A reward stage trains its head in full (see the `reward` kind).
            if let Some(lora) = &mut lora
                && !lora.modules_to_save.contains(&SavedModule::Score)
            {
                lora.modules_to_save.push(SavedModule::Score);
            }
        }
        let seq_len = get("max_length").unwrap_or_else(|| {
            get("max_prompt_length").unwrap_or(512) + get("max_new_tokens").unwrap_or(0)
        });
        let reference_copy = lora.is_none()
            && (matches!(stage.spec.kind(), "ppo" | "rloo" | "grpo")
                || params.get("sync_ref_model").and_then(Value::as_bool) == Some(true));
        let training = TrainingShape {
            batch_size: u64::from(train.batch_size) * sequences,
            seq_len,
            bf16: stage.precision == rudder_schema::Precision::Bf16,
            lora,
            gradient_checkpointing: train.gradient_checkpointing,
            reference_copy,
        };
        out.push((node.name.clone(), estimate(&shape, &training)));
    }
    out
}

/// The shape of the model a stage trains (its `model` input, followed to its source).
fn model_shape(recipe: &rudder_schema::Recipe, name: &str, depth: usize) -> Option<ModelShape> {
    use rudder_schema::{NodeBody, Target};
    if depth > recipe.nodes.len() {
        return None;
    }
    match &recipe.node(name)?.body {
        NodeBody::Model(model) => match &model.spec.hf {
            Some(hf) => {
                let text = std::fs::read_to_string(recipe.dir.join(hf).join("config.json")).ok()?;
                ModelShape::from_config(&serde_json::from_str(&text).ok()?)
            }
            None => {
                let spec = serde_json::to_value(&model.spec).ok()?;
                let mut config = spec.as_object()?.clone();
                config.insert(
                    "architectures".into(),
                    serde_json::json!(["LlamaForCausalLM"]),
                );
                // A fresh model's vocabulary follows its tokenizer.
                if config.get("vocab_size").is_none_or(Value::is_null) {
                    let vocab = match &model.tokenizer.as_ref()?.target {
                        Target::Node { name, .. } => match &recipe.node(name)?.body {
                            NodeBody::Stage(t) => t.spec.params().get("vocab_size")?.as_u64()?,
                            _ => return None,
                        },
                        Target::Path(path) => {
                            let text = std::fs::read_to_string(path).ok()?;
                            let json: Value = serde_json::from_str(&text).ok()?;
                            json.pointer("/model/vocab")?.as_object()?.len() as u64
                        }
                    };
                    config.insert("vocab_size".into(), vocab.into());
                }
                ModelShape::from_config(&Value::Object(config))
            }
        },
        NodeBody::Stage(stage) => {
            let input = stage.inputs.iter().find(|i| i.field.role == "model")?;
            let Target::Node { name, .. } = &input.target else {
                return None;
            };
            let mut shape = model_shape(recipe, name, depth + 1)?;
            // An upstream stage saves in its input's dtype unless told otherwise (depth 0 is the
            // stage being estimated, which trains on its input).
            if depth > 0
                && let Some(train) = stage.spec.train_args()
            {
                use rudder_schema::kinds::SaveDtype;
                match train.save_dtype {
                    SaveDtype::Auto => {}
                    SaveDtype::Fp32 => shape.disk_dtype = DiskDtype::F32,
                    SaveDtype::Bf16 => shape.disk_dtype = DiskDtype::Bf16,
                    SaveDtype::F16 => shape.disk_dtype = DiskDtype::F16,
                }
            }
            Some(shape)
        }
        NodeBody::Dataset(_) => None,
    }
}

/// Bytes in GiB with one decimal, or in MiB below 1 GiB.
pub fn gib(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rudder_schema::kinds::{AllLinear, TargetModules};

    fn llama2_7b() -> ModelShape {
        ModelShape::from_config(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        }))
        .unwrap()
    }

    #[test]
    fn llama2_7b_has_its_parameter_count() {
        // Llama-2-7B has 6,738,415,616 parameters.
        assert_eq!(llama2_7b().parameters(), 6_738_415_616);
    }

    /// A bf16 LoRA stage over a bf16 checkpoint holds its base in bf16; over a stage that
    /// saved that checkpoint in fp32, in fp32.
    #[test]
    fn a_frozen_base_is_held_in_the_dtype_its_input_was_saved_in() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base")).unwrap();
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "torch_dtype": "bfloat16"
        });
        std::fs::write(dir.path().join("base/config.json"), config.to_string()).unwrap();
        let recipe = |save_dtype: &str| {
            let text = format!(
                "[recipe]\nprecision = \"bf16\"\n[models.base]\nhf = \"base\"\n\
                 [datasets.d]\npath = \"d.jsonl\"\n\
                 [stages.sft]\nkind = \"sft\"\nmodel = \"base\"\ndata = \"d\"\n{save_dtype}\n\
                 [stages.dpo]\nkind = \"dpo\"\nmodel = \"sft\"\ndata = \"d\"\nlora = {{}}\n"
            );
            let path = dir.path().join("recipe.toml");
            std::fs::write(&path, text).unwrap();
            let recipe = rudder_schema::Recipe::load(&path, &[]).unwrap();
            let estimates = recipe_estimates(&recipe);
            estimates.into_iter().find(|(n, _)| n == "dpo").unwrap().1
        };
        let (bf16, fp32) = (recipe(""), recipe("save_dtype = \"fp32\""));
        // 2 bytes per frozen weight against 4 + 2 (fp32 and the bf16 copies).
        assert!(fp32.weights > 2 * bf16.weights, "{fp32:?} vs {bf16:?}");
    }

    fn lora_args() -> LoraArgs {
        LoraArgs {
            r: 16,
            alpha: 32.0,
            target_modules: TargetModules::AllLinear(AllLinear::AllLinear),
            ..LoraArgs::default()
        }
    }

    /// The README's worked example: Llama-2-7B, batch 1 x 512 tokens.
    #[test]
    fn seven_b_estimates_match_the_readme_arithmetic() {
        let model = llama2_7b();
        let full = TrainingShape {
            batch_size: 1,
            seq_len: 512,
            bf16: false,
            lora: None,
            gradient_checkpointing: false,
            reference_copy: false,
        };
        let within = |ours: u64, readme_gib: f64| {
            let ours = ours as f64 / (1u64 << 30) as f64;
            assert!(
                (ours - readme_gib).abs() / readme_gib < 0.10,
                "{ours} vs {readme_gib}"
            );
        };
        // Full fine-tuning in fp32: 16 bytes per parameter, 100.4 GiB, plus activations.
        let e = estimate(&model, &full);
        within(e.weights + e.gradients + e.optimizer, 100.4);
        within(e.activations, 5.14);
        within(e.total(), 105.5);
        // LoRA r = 16 on all linear layers: 40.0M trained parameters.
        let lora = lora_args();
        assert_eq!(model.lora_parameters(&lora), 39_976_960);
        let e = estimate(
            &model,
            &TrainingShape {
                lora: Some(lora),
                gradient_checkpointing: true,
                ..full.clone()
            },
        );
        within(e.weights, 25.3);
        within(e.gradients + e.optimizer, 0.45);
        within(e.activations, 2.72);
        within(e.total(), 28.4);
        // bf16: full fine-tuning adds the bf16 copies of the weights (6 bytes per parameter)
        // and halves the layers' activations; LoRA holds its base in bf16.
        let bf16 = TrainingShape {
            bf16: true,
            ..full.clone()
        };
        let e = estimate(&model, &bf16);
        within(e.weights, 37.7);
        within(e.activations, 3.54);
        within(e.total(), 116.5);
        let e = estimate(
            &model,
            &TrainingShape {
                lora: Some(lora_args()),
                gradient_checkpointing: true,
                ..bf16
            },
        );
        within(e.weights, 12.8);
        within(e.activations, 1.57);
        within(e.total(), 14.8);
    }
}
