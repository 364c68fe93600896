//! The SwiGLU feed-forward block of Llama-family decoders: `down(silu(gate(x)) * up(x))`.

use burn::config::Config;
use burn::module::{Initializer, Module};
use burn::nn::LinearConfig;
use burn::tensor::{Device, Tensor, activation::silu};

use super::lora::linear::LoraLinear;

/// Configuration of [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of the gated projection.
    pub d_ff: usize,
    /// Biases on the three projections (Llama's `mlp_bias`). Default false.
    #[config(default = false)]
    pub bias: bool,
    /// Std of the normal initialisation. Default 0.02.
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// Gated feed-forward block.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

impl MlpConfig {
    /// Initialises the projections with N(0, init_std) weights and zero biases.
    pub fn init(&self, device: &Device) -> Mlp {
        let linear = |d_in: usize, d_out: usize| {
            let mut l = LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
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
        Mlp {
            gate_proj: linear(self.d_model, self.d_ff).into(),
            up_proj: linear(self.d_model, self.d_ff).into(),
            down_proj: linear(self.d_ff, self.d_model).into(),
        }
    }
}

impl Mlp {
    /// # Shapes
    /// - x: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(swiglu(gate, self.up_proj.forward(x)))
    }
}

/// `silu(gate) * up`: one fused op on the `cpu` backend (`kernels/swiglu.rs`), Burn's ops
/// elsewhere.
fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if let Some(out) = super::kernels::swiglu(gate.clone(), up.clone()) {
        return out;
    }
    silu(gate) * up
}
