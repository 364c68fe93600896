//! AdamW exactly as `torch.optim.AdamW` computes it (single-tensor path), written over a Burn
//! module's parameters: decoupled weight decay applied before the Adam step, bias-corrected
//! moments, `eps` added after `sqrt(v) / sqrt(1 - b2^t)`. Burn's own AdamW differs in these
//! details (where eps goes, how the decay is applied), which shows up within a few steps of a
//! parity trajectory. This module owns the optimiser state; gradients, clipping and the learning
//! rate come from the loop.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// AdamW hyper-parameters (PyTorch's defaults apart from the learning rate, which the schedule
/// supplies at every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The first and second moments of one parameter, flattened so that every parameter's state has
/// the same type whatever its rank.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

/// The optimiser: its configuration, the step count and the moments by parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates applied so far (PyTorch's `state["step"]`, shared by all parameters
    /// because every parameter receives a gradient at every step here).
    pub step: u64,
    pub moments: HashMap<ParamId, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every parameter of `module` that has a
    /// gradient in `grads`, each gradient multiplied by `grad_scale` first (the clipping
    /// coefficient, 1 without clipping).
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let mut mapper = Update {
            optim: self,
            grads,
            lr,
            grad_scale,
        };
        module.map(&mut mapper)
    }
}

/// Whether a parameter of rank `rank` is decayed. In a Llama-family model the rank-1 parameters
/// are exactly the biases and the RMSNorm weights, the group the Hugging Face Trainer exempts
/// from weight decay; every matrix (embeddings, projections, heads) is decayed.
pub fn decays(rank: usize) -> bool {
    rank >= 2
}

struct Update<'a> {
    optim: &'a mut AdamW,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
}

impl ModuleMapper for Update<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        // The updated value must keep the parameter's gradient-checkpointing strategy.
        let strategy = tensor.gradient_checkpointing_strategy();
        let cfg = self.optim.config;
        let t = self.optim.step as i32;
        let shape = tensor.shape();
        let numel = shape.num_elements();
        let mut p = tensor.inner();
        let grad = if self.grad_scale != 1.0 {
            grad.mul_scalar(self.grad_scale)
        } else {
            grad
        };
        if decays(D) && cfg.weight_decay != 0.0 {
            // PyTorch: param.mul_(1 - lr * weight_decay).
            p = p.mul_scalar(1.0 - self.lr * cfg.weight_decay);
        }
        let g = grad.reshape([numel]);
        let (m, v) = match self.optim.moments.remove(&id) {
            Some(s) => (s.exp_avg, s.exp_avg_sq),
            None => (g.zeros_like(), g.zeros_like()),
        };
        // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2).
        let m = m.clone() + (g.clone() - m).mul_scalar(1.0 - cfg.beta1);
        let v = v.mul_scalar(cfg.beta2) + (g.clone() * g).mul_scalar(1.0 - cfg.beta2);
        let bias1 = 1.0 - cfg.beta1.powi(t);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
        let step_size = self.lr / bias1;
        let denom = v
            .clone()
            .sqrt()
            .div_scalar(bias2_sqrt)
            .add_scalar(cfg.epsilon);
        let update = (m.clone() / denom).mul_scalar(step_size);
        let p = p - update.reshape(shape);
        self.optim.moments.insert(
            id,
            Moments {
                exp_avg: m,
                exp_avg_sq: v,
            },
        );
        let mut tensor = Tensor::from_inner(p);
        if let Some(strategy) = strategy {
            tensor = tensor.with_gradient_checkpointing_strategy(strategy);
        }
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The global L2 norm of the gradients of `module`, as `torch.nn.utils.clip_grad_norm_`
/// computes it: each tensor's norm, then the norm of those norms. Accumulated in f64.
pub fn global_grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = NormVisitor { grads, sum_sq: 0.0 };
    module.visit(&mut visitor);
    visitor.sum_sq.sqrt()
}

struct NormVisitor<'a> {
    grads: &'a GradientsParams,
    sum_sq: f64,
}

impl ModuleVisitor for NormVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            // Row sums first: flex sums a tensor of 4M elements or more in parallel, in an order
            // that depends on the thread count; rows are each summed by one thread.
            let numel = g.shape().num_elements();
            let last = g.dims()[D - 1].max(1);
            let rows = (g.clone() * g).reshape([numel / last, last]).sum_dim(1);
            let sq: f64 = rows.sum().into_scalar::<f64>();
            self.sum_sq += sq;
        }
    }
}

/// PyTorch's clipping coefficient: `max_norm / (total_norm + 1e-6)` clamped to at most 1;
/// 1 when clipping is off (`max_norm` 0).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    // PyTorch computes the coefficient in the gradients' dtype (f32).
    let coef = (max_norm as f32) / (total_norm as f32 + 1e-6);
    f64::from(coef.min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::tensor::TensorData;

    #[derive(Module, Debug)]
    struct Two {
        w: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    fn model() -> Two {
        let device = crate::test_device().autodiff();
        Two {
            w: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, -2.0], [1, 2]),
                &device,
            )),
            b: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![0.5f32], [1]),
                &device,
            )),
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// loss = sum(w * [3, 4]) + 2 * b, so the gradients are [3, 4] and 2.
    fn grads(m: &Two) -> GradientsParams {
        let device = crate::test_device().autodiff();
        let x = Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 4.0], [1, 2]), &device);
        let loss = (m.w.val() * x).sum() + m.b.val().mul_scalar(2.0).sum();
        GradientsParams::from_grads(loss.backward(), m)
    }

    #[test]
    fn first_steps_match_hand_computed_pytorch_updates() {
        let mut m = model();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg);
        let lr = 0.01;
        // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2: update = lr * g/(|g| + eps).
        let g = grads(&m);
        m = opt.step(m, g, lr, 1.0);
        let w = values(m.w.val());
        let decayed = [1.0 * (1.0 - lr * 0.1), -2.0 * (1.0 - lr * 0.1)];
        let expect_w = [
            decayed[0] - lr * 3.0 / (3.0 + 1e-8),
            decayed[1] - lr * 4.0 / (4.0 + 1e-8),
        ];
        assert!(
            (w[0] as f64 - expect_w[0]).abs() < 1e-6,
            "{w:?} vs {expect_w:?}"
        );
        assert!(
            (w[1] as f64 - expect_w[1]).abs() < 1e-6,
            "{w:?} vs {expect_w:?}"
        );
        // The bias is not decayed.
        let b = values(m.b.val());
        assert!((b[0] as f64 - (0.5 - lr)).abs() < 1e-6, "{b:?}");
        // Step 2 with the same gradient: m = 0.19 g, v = 0.001999 g^2; m_hat = g, v_hat = g^2.
        let g = grads(&m);
        m = opt.step(m, g, lr, 1.0);
        let b2 = values(m.b.val());
        let m2 = 0.9 * 0.2 + 0.1 * 2.0;
        let v2: f64 = 0.999 * 0.004 + 0.001 * 4.0;
        let step =
            lr / (1.0 - 0.9f64.powi(2)) * m2 / (v2.sqrt() / (1.0 - 0.999f64.powi(2)).sqrt() + 1e-8);
        assert!((b2[0] as f64 - (0.5 - lr - step)).abs() < 1e-6, "{b2:?}");
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn gradient_scale_is_applied_before_the_moments() {
        // With a scale, Adam's first step is still lr * sign(g) (scale-invariant) but the
        // moments carry the scaled gradient.
        let m = model();
        let mut opt = AdamW::new(AdamWConfig::default());
        let g = grads(&m);
        let _ = opt.step(m, g, 0.1, 0.5);
        let sums: Vec<f32> = opt
            .moments
            .values()
            .map(|s| values(s.exp_avg.clone()).iter().sum())
            .collect();
        let total: f32 = sums.iter().sum();
        // 0.1 * 0.5 * (3 + 4 + 2)
        assert!((total - 0.45).abs() < 1e-6, "{total}");
    }

    #[test]
    fn global_norm_and_clip_coefficient() {
        let m = model();
        let g = grads(&m);
        let norm = global_grad_norm(&m, &g);
        assert!((norm - (9.0f64 + 16.0 + 4.0).sqrt()).abs() < 1e-6, "{norm}");
        assert_eq!(clip_coefficient(norm, 0.0), 1.0);
        assert_eq!(clip_coefficient(norm, 100.0), 1.0);
        let c = clip_coefficient(norm, 1.0);
        assert!((c - 1.0 / (29f64.sqrt() + 1e-6)).abs() < 1e-6, "{c}");
    }
}
