//! Root-mean-square layer normalisation as Llama computes it: in fp32, `x * rsqrt(mean(x^2) + eps)`
//! then scaled by a learned weight. Burn's `RmsNorm` names the weight `gamma` and defaults eps to
//! 1e-5; this module keeps Hugging Face's name and takes eps from the config.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor};

/// Configuration of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Size of the normalised (last) dimension.
    pub size: usize,
    /// Added to the mean square before the square root. Default 1e-6 (Llama's `rms_norm_eps`).
    #[config(default = 1e-6)]
    pub eps: f64,
}

/// RMS normalisation over the last dimension with a learned per-channel weight.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Per-channel scale, initialised to ones.
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNormConfig {
    /// A norm whose weight is all ones.
    pub fn init(&self, device: &Device) -> RmsNorm {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([self.size], device)),
            eps: self.eps,
        }
    }
}

impl RmsNorm {
    /// Normalises `x` over its last dimension.
    ///
    /// # Shapes
    /// - x: `[..., size]`
    /// - output: same as x, same dtype as x
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // The `cpu` backend's fused kernel (`kernels/rms_norm.rs`) for f32; the generic ops
        // otherwise.
        #[cfg(feature = "flex")]
        if let Some(out) = super::kernels::rms_norm(x.clone(), self.weight.val(), self.eps) {
            return out;
        }
        self.forward_generic(x)
    }

    /// [`Self::forward`] through Burn's tensor ops, on any backend.
    pub fn forward_generic<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        // Half-precision activations are normalised in fp32, as transformers does.
        let x32 = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let variance = x32.clone().square().mean_dim(D - 1);
        // A division, not `recip()`: ndarray's SIMD reciprocal is an approximation (~1e-4
        // relative error), enough to move logits by 2e-4.
        let normed = x32 / (variance + self.eps).sqrt();
        let normed = if dtype == DType::F32 {
            normed
        } else {
            normed.cast(dtype)
        };
        normed * crate::precision::cast(self.weight.val(), dtype).unsqueeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn matches_hand_computed_values() {
        let device = crate::test_device();
        let mut norm = RmsNormConfig::new(2).with_eps(0.0).init(&device);
        norm.weight = Param::from_tensor(Tensor::from_floats([1.0, 2.0], &device));
        // rms of [3, 4] = sqrt(12.5); rms of [1, 1] = 1.
        let x = Tensor::<2>::from_floats([[3.0, 4.0], [1.0, 1.0]], &device);
        let r = 12.5f32.sqrt();
        let expected = TensorData::from([[3.0 / r, 8.0 / r], [1.0, 2.0]]);
        norm.forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn eps_is_applied() {
        let device = crate::test_device();
        let norm = RmsNormConfig::new(1).with_eps(1.0).init(&device);
        // x / sqrt(x^2 + 1) with x = 1 is 1/sqrt(2).
        let x = Tensor::<1>::from_floats([1.0], &device);
        let y: Vec<f32> = norm.forward(x).into_data().try_to_vec().unwrap();
        assert!((y[0] - 0.5f32.sqrt()).abs() < 1e-6);
    }
}
