//! The Llama-family decoder: token embeddings, a stack of pre-norm decoder layers (attention and
//! SwiGLU, each with a residual connection), a final RMSNorm, and one of two heads: a language
//! model head (tied to the embeddings or not) or a scalar `score` head for reward/value models.
//! Hyper-parameters come from [`ModelConfig`]; loading and saving weights is `hf.rs`'s job.

use burn::module::{Initializer, Module};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::attention::{Attention, AttentionConfig};
use super::cache::KvCache;
use super::config::ModelConfig;
use super::mask::{AttentionMask, positions_from_padding, positions_tensor};
use super::mlp::{Mlp, MlpConfig};
use super::rms_norm::{RmsNorm, RmsNormConfig};
use super::rope::RotaryConfig;

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; output the same
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &super::rope::Rotary,
        mask: &AttentionMask,
        cache: Option<(&mut super::cache::LayerCache, (usize, usize))>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The decoder without a head (transformers' `LlamaModel`, the `model.*` tensors).
#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// Sliding-window span, 0 when attention is global.
    pub sliding_window: usize,
    /// Activations and matmuls in bf16 (`precision = "bf16"`, see [`crate::precision`]).
    pub bf16: bool,
}

/// Which intermediate results a forward pass returns.
struct Trace {
    states: Option<Vec<Tensor<3>>>,
}

impl Llama {
    /// The device the parameters live on (its autodiff form when they record gradients): inputs
    /// for this model are created there.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.val().device()
    }

    /// Runs the decoder over `input_ids` and returns the final-norm hidden states.
    ///
    /// `padding_mask` has one row per batch element with 1 for real tokens and 0 for padding
    /// (`None`: nothing is padded). With a cache, it covers the new tokens only, and the cache
    /// supplies the history.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        padding_mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        self.run(input_ids, padding_mask, cache, &mut Trace { states: None })
    }

    /// The residual stream after the embedding and after every layer, then the final-norm
    /// output (`num_hidden_layers + 2` tensors), as transformers' `output_hidden_states` minus its
    /// last-layer duplicate.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - each output: `[batch, seq, d_model]`
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        padding_mask: Option<&[Vec<u8>]>,
    ) -> Vec<Tensor<3>> {
        let mut trace = Trace {
            states: Some(Vec::new()),
        };
        let last = self.run(input_ids, padding_mask, None, &mut trace);
        let mut states = trace.states.expect("trace was requested");
        states.push(last);
        states
    }

    fn run(
        &self,
        input_ids: Tensor<2, Int>,
        padding_mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
        trace: &mut Trace,
    ) -> Tensor<3> {
        let device = input_ids.device();
        let [batch, seq_q] = input_ids.dims();
        let new_padding: Vec<Vec<u8>> = match padding_mask {
            Some(rows) => rows.to_vec(),
            None => vec![vec![1u8; seq_q]; batch],
        };
        let window = (self.sliding_window > 0).then_some(self.sliding_window);
        let rotary = RotaryConfig::new(self.head_dim).with_theta(self.rope_theta);

        let mut x = crate::precision::cast(
            self.embed_tokens.forward(input_ids),
            self.activation_dtype(),
        );
        if let Some(states) = trace.states.as_mut() {
            states.push(x.clone());
        }
        match cache {
            Some(cache) => {
                let start = cache.len();
                let capacity = cache.reserve(seq_q);
                if cache.padding.is_empty() {
                    cache.padding = vec![Vec::new(); batch];
                }
                for (hist, new) in cache.padding.iter_mut().zip(&new_padding) {
                    hist.extend_from_slice(new);
                }
                let positions: Vec<Vec<i64>> = positions_from_padding(&cache.padding)
                    .into_iter()
                    .map(|row| row[row.len() - seq_q..].to_vec())
                    .collect();
                let rope = rotary.at_positions(positions_tensor(&positions, &device));
                // The slots past the new tokens are not written yet: masked as padding.
                let key_padding = cache.key_padding(capacity);
                let mask = AttentionMask::at(&key_padding, start, seq_q, window, &device);
                for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    let slots = (start, capacity);
                    x = layer.forward(x, &rope, &mask, Some((layer_cache, slots)));
                    if let Some(states) = trace.states.as_mut() {
                        states.push(x.clone());
                    }
                }
            }
            None => {
                let positions = positions_from_padding(&new_padding);
                let rope = rotary.at_positions(positions_tensor(&positions, &device));
                let mask = AttentionMask::new(&new_padding, seq_q, window, &device);
                for layer in &self.layers {
                    x = layer.forward(x, &rope, &mask, None);
                    if let Some(states) = trace.states.as_mut() {
                        states.push(x.clone());
                    }
                }
            }
        }
        self.norm.forward(x)
    }

    /// The dtype of the decoder's activations and matmuls.
    pub fn activation_dtype(&self) -> DType {
        match self.bf16 {
            true => DType::BF16,
            false => DType::F32,
        }
    }

    /// An empty KV cache sized for this decoder, growing in the buckets of its device's
    /// backend (exactly on `cpu`: see [`crate::backend::shape_bucket`]).
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_bucket(
            self.layers.len(),
            crate::backend::shape_bucket(&self.device()),
        )
    }
}

/// A decoder with a language-model head (`LlamaForCausalLM` and relatives).
#[derive(Module, Debug)]
pub struct CausalLm {
    pub model: Llama,
    /// `None` when the head is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
}

impl CausalLm {
    /// See [`Llama::device`].
    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// Next-token logits at every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        padding_mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let hidden = self.model.forward(input_ids, padding_mask, cache);
        self.head(hidden)
    }

    /// Applies the LM head to final-norm hidden states.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, d_model]`
    /// - output: `[batch, seq, vocab]`, in fp32 whatever the decoder computes in
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        #[cfg(feature = "flex")]
        if let Some(logits) = self.fused_logits(hidden.clone()) {
            return logits;
        }
        let dtype = hidden.dtype();
        let logits = match &self.lm_head {
            Some(head) => crate::precision::linear_in(head, hidden),
            None => {
                let w = crate::precision::cast(self.model.embed_tokens.weight.val(), dtype);
                hidden.matmul(w.transpose().unsqueeze::<3>())
            }
        };
        crate::precision::cast(logits, DType::F32)
    }
}

/// A decoder with a scalar head (`LlamaForSequenceClassification` with one label): reward
/// models and value models.
#[derive(Module, Debug)]
pub struct RewardModel {
    pub model: Llama,
    /// `[d_model, 1]` in Burn's layout, no bias (`score.weight` is `[1, d_model]` on disk).
    pub score: Linear,
}

impl RewardModel {
    /// See [`Llama::device`].
    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// The scalar head at every position (per-token values for PPO's value model).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq]`
    pub fn values(&self, input_ids: Tensor<2, Int>, padding_mask: Option<&[Vec<u8>]>) -> Tensor<2> {
        let [batch, seq] = input_ids.dims();
        let hidden = self.model.forward(input_ids, padding_mask, None);
        crate::precision::cast(crate::precision::linear_in(&self.score, hidden), DType::F32)
            .reshape([batch, seq])
    }

    /// The reward of each sequence: the scalar head at its last non-pad token.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        padding_mask: Option<&[Vec<u8>]>,
    ) -> Tensor<1> {
        let device = input_ids.device();
        let [batch, seq] = input_ids.dims();
        let last: Vec<i64> = match padding_mask {
            Some(rows) => rows
                .iter()
                .map(|r| r.iter().rposition(|&m| m != 0).unwrap_or(seq - 1) as i64)
                .collect(),
            None => vec![seq as i64 - 1; batch],
        };
        let index = Tensor::<2, Int>::from_data(TensorData::new(last, [batch, 1]), &device);
        self.values(input_ids, padding_mask)
            .gather(1, index)
            .reshape([batch])
    }
}

impl ModelConfig {
    fn rms(&self, size: usize) -> RmsNormConfig {
        RmsNormConfig::new(size).with_eps(self.rms_norm_eps)
    }

    /// A freshly initialised backbone (weights N(0, initializer_range), norms 1) using the
    /// backend's RNG; see `hf::random_*` for seeded, backend-independent initialisation.
    pub fn init_backbone(&self, device: &Device) -> Llama {
        let std = self.initializer_range;
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: self.rms(self.hidden_size).init(device),
                self_attn: AttentionConfig::new(
                    self.hidden_size,
                    self.num_attention_heads,
                    self.num_key_value_heads,
                    self.head_dim,
                )
                .with_qkv_bias(self.qkv_bias)
                .with_o_bias(self.o_bias)
                .with_init_std(std)
                .init(device),
                post_attention_layernorm: self.rms(self.hidden_size).init(device),
                mlp: MlpConfig::new(self.hidden_size, self.intermediate_size)
                    .with_bias(self.mlp_bias)
                    .with_init_std(std)
                    .init(device),
            })
            .collect();
        Llama {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, self.hidden_size)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device),
            layers,
            norm: self.rms(self.hidden_size).init(device),
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            sliding_window: self.sliding_window.unwrap_or(0),
            bf16: crate::precision::current() == rudder_schema::Precision::Bf16,
        }
    }

    /// A freshly initialised causal LM (backend RNG).
    pub fn init_causal_lm(&self, device: &Device) -> CausalLm {
        let lm_head = (!self.tie_word_embeddings).then(|| self.head(self.vocab_size, device));
        CausalLm {
            model: self.init_backbone(device),
            lm_head,
        }
    }

    /// A freshly initialised reward model (backend RNG).
    pub fn init_reward_model(&self, device: &Device) -> RewardModel {
        RewardModel {
            model: self.init_backbone(device),
            score: self.head(1, device),
        }
    }

    fn head(&self, d_out: usize, device: &Device) -> Linear {
        LinearConfig::new(self.hidden_size, d_out)
            .with_bias(false)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: self.initializer_range,
            })
            .init(device)
    }
}
