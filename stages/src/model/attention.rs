//! Grouped-query self-attention with rotary positions and an optional KV cache. Query head `h`
//! reads key/value head `h / n_rep`, as in transformers' `repeat_kv`. Masking rules live in
//! `mask.rs`; this module only applies them.

use burn::config::Config;
use burn::module::{Initializer, Module};
use burn::nn::LinearConfig;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};

use super::cache::LayerCache;
use super::lora::linear::LoraLinear;
use super::mask::AttentionMask;
use super::rope::Rotary;

/// Whether the `cpu` backend runs attention through the fused kernel (`kernels/attention.rs`): on by
/// default; tests turn it off to compare with the generic path.
#[cfg(feature = "flex")]
pub static FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Configuration of [`Attention`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model (residual stream) width.
    pub d_model: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads; divides `n_heads`.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Biases on q/k/v. Default false.
    #[config(default = false)]
    pub qkv_bias: bool,
    /// Bias on the output projection. Default false.
    #[config(default = false)]
    pub o_bias: bool,
    /// Std of the normal initialisation. Default 0.02.
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// Multi-head attention whose key/value heads may be shared by several query heads.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionConfig {
    /// Initialises projections with N(0, init_std) weights and zero biases.
    pub fn init(&self, device: &Device) -> Attention {
        let linear = |d_in: usize, d_out: usize, bias: bool| {
            let mut l = LinearConfig::new(d_in, d_out)
                .with_bias(bias)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: self.init_std,
                })
                .init(device);
            if let Some(b) = l.bias.take() {
                l.bias = Some(b.map(|t| t.zeros_like()));
            }
            l
        };
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        Attention {
            q_proj: linear(self.d_model, q, self.qkv_bias).into(),
            k_proj: linear(self.d_model, kv, self.qkv_bias).into(),
            v_proj: linear(self.d_model, kv, self.qkv_bias).into(),
            o_proj: linear(q, self.d_model, self.o_bias).into(),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl Attention {
    /// Attends the new tokens `x` to themselves and to any cached keys.
    ///
    /// # Shapes
    /// - x: `[batch, seq_q, d_model]`
    /// - rotary tables for the `seq_q` new positions
    /// - mask: causal, or explicit `[batch, 1, seq_q, seq_k]` with `seq_k` the cache's capacity
    ///   (cached + `seq_q`, and slots not written yet)
    /// - output: `[batch, seq_q, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rotary,
        mask: &AttentionMask,
        cache: Option<(&mut LayerCache, (usize, usize))>,
    ) -> Tensor<3> {
        let [batch, seq_q, _] = x.dims();
        let heads =
            |t: Tensor<3>, n: usize| t.reshape([batch, seq_q, n, self.head_dim]).swap_dims(1, 2);
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), self.n_heads));
        let k = rope.apply(heads(self.k_proj.forward(x.clone()), self.n_kv_heads));
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let (k, v) = match cache {
            // Written at slot `start` of tensors of `capacity` slots.
            Some((cache, (start, capacity))) => cache.append(k, v, start, capacity),
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores and softmax in fp32 from bf16 inputs, the output rounded back, as flash
        // attention computes them. Burn's attention takes the inputs' dtype for every op on the
        // GPU backends (an explicit scale selects its op-by-op fallback) and under autodiff, so
        // the inputs are cast, the KV cache included at each decoding step.
        let dtype = q.dtype();
        let (q, k, v) = match dtype {
            DType::F32 => (q, k, v),
            _ => (q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32)),
        };
        #[cfg(feature = "flex")]
        if FUSED.load(std::sync::atomic::Ordering::Relaxed) {
            let key_mask = match mask {
                AttentionMask::Causal => super::kernels::KeyMask::Causal,
                AttentionMask::Explicit(m) => super::kernels::KeyMask::from_tensor(m),
            };
            let fused =
                super::kernels::attention(q.clone(), k.clone(), v.clone(), &key_mask, scale);
            if let Some(out) = fused {
                return self.project_out(crate::precision::cast(out, dtype), batch, seq_q);
            }
        }
        let out = self.attention_generic(q, k, v, mask, scale);
        self.project_out(crate::precision::cast(out, dtype), batch, seq_q)
    }

    /// `[batch, heads, seq_q, head_dim]` -> `[batch, seq_q, d_model]` through `o_proj`.
    fn project_out(&self, out: Tensor<4>, batch: usize, seq_q: usize) -> Tensor<3> {
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq_q, self.n_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// Burn's attention with the K/V heads repeated to the query heads: any backend.
    fn attention_generic(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: &AttentionMask,
        scale: f64,
    ) -> Tensor<4> {
        let [batch, _, seq_q, _] = q.dims();
        let k = self.repeat_kv(k);
        let v = self.repeat_kv(v);
        let seq_k = k.dims()[2];
        let (mask, is_causal) = match mask {
            AttentionMask::Causal => (None, true),
            AttentionMask::Explicit(m) => (
                Some(m.clone().expand([batch, self.n_heads, seq_q, seq_k])),
                false,
            ),
        };
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal,
        };
        attention(q, k, v, mask, None, options)
    }

    /// Expands `[batch, n_kv_heads, seq, d]` to `[batch, n_heads, seq, d]`.
    fn repeat_kv(&self, t: Tensor<4>) -> Tensor<4> {
        let n_rep = self.n_heads / self.n_kv_heads;
        if n_rep == 1 {
            return t;
        }
        let [b, kv, l, d] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .expand([b, kv, n_rep, l, d])
            .reshape([b, kv * n_rep, l, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::RotaryConfig;
    use burn::tensor::{Int, Tolerance};

    #[test]
    fn padded_keys_do_not_change_real_outputs() {
        let device = crate::test_device();
        device.seed(3);
        let attn = AttentionConfig::new(8, 4, 2, 2).init(&device);
        let rope = RotaryConfig::new(2);
        let x = Tensor::<3>::random(
            [1, 3, 8],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let pos = |n: i64| Tensor::<1, Int>::arange(0..n, &device).reshape([1, n as usize]);
        let full = attn.forward(
            x.clone(),
            &rope.at_positions(pos(3)),
            &AttentionMask::Causal,
            None,
        );
        // Append a pad token on the right: the first 3 outputs must not change.
        let pad = Tensor::<3>::ones([1, 1, 8], &device) * 5.0;
        let xp = Tensor::cat(vec![x, pad], 1);
        let mask = AttentionMask::new(&[vec![1, 1, 1, 0]], 4, None, &device);
        let padded = attn.forward(xp, &rope.at_positions(pos(4)), &mask, None);
        padded
            .slice([0..1, 0..3, 0..8])
            .into_data()
            .assert_approx_eq::<f32>(&full.into_data(), Tolerance::absolute(1e-6));
    }
}
