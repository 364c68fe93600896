//! Rotary position embeddings in the Hugging Face half-split layout: dimension `i` is rotated
//! with dimension `i + head_dim/2` (`rotate_half`), not with its neighbour as Burn's
//! `RotaryEncoding` does. Cos/sin tables are computed for explicit per-row positions, so that
//! left-padded batches and KV-cached decoding see the positions transformers would use.

use burn::config::Config;
use burn::tensor::{Int, Tensor, TensorData};

/// Configuration of the rotary embedding.
#[derive(Config, Debug)]
pub struct RotaryConfig {
    /// Per-head dimension (even).
    pub head_dim: usize,
    /// Base of the geometric frequency progression. Default 10000.
    #[config(default = 10000.0)]
    pub theta: f64,
}

/// Cos/sin tables for one batch of positions, shared by every layer of a forward pass.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl RotaryConfig {
    /// `inv_freq[i] = theta^(-2i/head_dim)` for `i < head_dim/2`, computed in f32 as transformers
    /// does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim as f32;
        let base = self.theta as f32;
        (0..self.head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim))
            .collect()
    }

    /// Tables for the given positions.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]`
    /// - tables inside: `[batch, 1, seq, head_dim]`, broadcast over heads
    pub fn at_positions(&self, positions: Tensor<2, Int>) -> Rotary {
        let device = positions.device();
        let [batch, seq] = positions.dims();
        let half = self.head_dim / 2;
        let inv_freq = Tensor::<1>::from_data(TensorData::new(self.inv_freq(), [half]), &device)
            .reshape([1, 1, half]);
        let freqs = positions.float().reshape([batch, seq, 1]) * inv_freq;
        let emb =
            Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([batch, 1, seq, self.head_dim]);
        Rotary {
            cos: emb.clone().cos(),
            sin: emb.sin(),
        }
    }
}

impl Rotary {
    /// Rotates `x` by its positions: `x * cos + rotate_half(x) * sin`.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`
    /// - output: same as x
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        // The `cpu` backend's fused kernel (`kernels/rope.rs`); the generic ops otherwise.
        #[cfg(feature = "flex")]
        if let Some(out) = super::kernels::rope(x.clone(), &self.cos, &self.sin) {
            return out;
        }
        self.apply_generic(x)
    }

    /// [`Self::apply`] through Burn's tensor ops, on any backend.
    pub fn apply_generic(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, l, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..l, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..l, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        // The tables in the activations' dtype, as transformers casts them.
        let dtype = x.dtype();
        let (cos, sin) = (self.cos.clone(), self.sin.clone());
        x * crate::precision::cast(cos, dtype) + rotated * crate::precision::cast(sin, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tolerance;

    #[test]
    fn inv_freq_values() {
        let f = RotaryConfig::new(4).with_theta(100.0).inv_freq();
        assert_eq!(f.len(), 2);
        assert!((f[0] - 1.0).abs() < 1e-7);
        assert!((f[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn rotates_halves_not_pairs() {
        let device = crate::test_device();
        // head_dim 4, theta 100: frequencies [1, 0.1]; position 1 rotates (x0, x2) by 1 rad and
        // (x1, x3) by 0.1 rad.
        let rope = RotaryConfig::new(4)
            .with_theta(100.0)
            .at_positions(Tensor::from_ints([[0, 1]], &device));
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]]], &device);
        let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.1f32.cos(), 0.1f32.sin());
        let expected = TensorData::from([[[
            [1.0, 2.0, 3.0, 4.0],
            [
                1.0 * c1 - 3.0 * s1,
                2.0 * c2 - 4.0 * s2,
                3.0 * c1 + 1.0 * s1,
                4.0 * c2 + 2.0 * s2,
            ],
        ]]]);
        rope.apply(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
    }
}
