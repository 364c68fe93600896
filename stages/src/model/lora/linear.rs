//! The LoRA layer itself: a frozen [`Linear`] with an optional low-rank adapter computed beside
//! it (see the parent module for PEFT's semantics). It knows nothing of the model it sits in,
//! so the attention and MLP blocks can hold it without depending on the rest of LoRA.

use std::ops::Deref;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::module::linear;
use burn::tensor::{Distribution, Tensor};

/// The low-rank update of one linear layer.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]`: PEFT's `lora_A.weight` (`[r, in]`) transposed.
    pub lora_a: Param<Tensor<2>>,
    /// `[r, out]`: PEFT's `lora_B.weight` (`[out, r]`) transposed.
    pub lora_b: Param<Tensor<2>>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Probability of zeroing an input element of the adapter while training.
    pub dropout: f64,
}

impl LoraAdapter {
    /// `scale * B(A(dropout(x)))`; dropout only when `x` records gradients (training).
    ///
    /// # Shapes
    /// - x: `[..., in]`; output `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = if self.dropout > 0.0 && x.device().is_autodiff() {
            // nn.Dropout: zero with probability p, scale the kept elements by 1 / (1 - p).
            let keep = Tensor::<D>::random(
                x.shape(),
                Distribution::Bernoulli(1.0 - self.dropout),
                &x.device(),
            );
            let keep = crate::precision::cast(keep.div_scalar(1.0 - self.dropout), x.dtype());
            x * keep
        } else {
            x
        };
        // In the input's dtype, as PEFT's fp32 factors compute under autocast.
        let dtype = x.dtype();
        let down = linear(x, crate::precision::cast(self.lora_a.val(), dtype), None);
        let up = linear(down, crate::precision::cast(self.lora_b.val(), dtype), None);
        up.mul_scalar(self.scale)
    }

    /// `scale * A B`, the update in Burn's `[in, out]` layout.
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a
            .val()
            .matmul(self.lora_b.val())
            .mul_scalar(self.scale)
    }
}

/// A linear layer that may carry a LoRA adapter. It reads as the [`Linear`] it wraps (`weight`,
/// `bias`), so code that only reads the base weights needs no change.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
}

impl From<Linear> for LoraLinear {
    fn from(base: Linear) -> Self {
        Self { base, lora: None }
    }
}

impl Deref for LoraLinear {
    type Target = Linear;
    fn deref(&self) -> &Linear {
        &self.base
    }
}

impl LoraLinear {
    /// # Shapes
    /// - x: `[..., in]`; output `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.lora {
            None => self.base_forward(x),
            Some(adapter) => self.base_forward(x.clone()) + adapter.forward(x),
        }
    }

    /// The frozen or trained base layer; a few rows without a gradient on `cpu` go through
    /// `kernels::linear`, parallel over the output columns.
    fn base_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        #[cfg(feature = "flex")]
        if x.device() == burn::tensor::Device::flex() && !x.device().is_autodiff() {
            let bias = self.base.bias.as_ref().map(|b| b.val());
            if let Some(out) =
                crate::model::kernels::linear::linear(x.clone(), self.base.weight.val(), bias)
            {
                return out;
            }
        }
        crate::precision::linear_in(&self.base, x)
    }

    /// The plain layer with the adapter merged into its weight: `W + scale * A B`.
    pub fn merged(&self) -> Linear {
        let mut base = self.base.clone();
        if let Some(adapter) = &self.lora {
            let weight = crate::precision::cast(base.weight.val(), burn::tensor::DType::F32);
            let weight = (weight + adapter.delta()).detach();
            base.weight = Param::from_tensor(weight).set_require_grad(false);
        }
        base
    }
}
