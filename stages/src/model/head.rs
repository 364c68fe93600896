//! The language model head's per-token predictions: the log-prob of each target token under
//! `softmax(logits / temperature)`, and, read from values only, whether the argmax hit it, the
//! predictive entropy and `log sum p^2`. This is what every training objective and log-prob
//! computation takes from the head; the full logits are left to generation (its last position
//! only) and to the logits fixtures.
//!
//! On the `cpu` backend the fused kernel of `kernels/head.rs` computes it a block of positions at
//! a time, so the `[rows, seq, vocab]` logits are never built; other backends (and tensors the
//! kernel does not take, such as bf16 ones) build the logits and take `log_softmax` and `gather`.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use super::llama::CausalLm;

/// The head's predictions at the positions `[rows, seq - 1]` of a batch (position `j` predicts
/// token `j + 1`).
pub struct HeadPredictions {
    /// `[rows, seq - 1]`: the target's log-prob where the mask is set, zero elsewhere.
    pub logps: Tensor<2>,
    /// Row-major over `[rows, seq - 1]`, zero where the mask is not set; when asked for.
    pub values: Option<PositionValues>,
}

/// Values of the predictive distribution per position (no gradient).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PositionValues {
    /// 1.0 where the argmax (the first of ties) is the target.
    pub hits: Vec<f32>,
    /// `-sum p log p`.
    pub entropy: Vec<f32>,
    /// `log sum p^2` (WPO's normaliser).
    pub log_sum_p2: Vec<f32>,
}

impl CausalLm {
    /// Predictions of the head from final-norm hidden states at the positions `mask` selects.
    ///
    /// # Shapes
    /// - hidden: `[rows, seq, d_model]`
    /// - targets, mask: `[rows, seq - 1]` (mask 1.0 where a position is predicted, else 0.0;
    ///   the fused kernel reads it as a selector, so a weight other than 0 or 1 is not applied)
    pub fn predictions(
        &self,
        hidden: Tensor<3>,
        targets: &Tensor<2, Int>,
        mask: &Tensor<2>,
        temperature: f64,
        values: bool,
    ) -> HeadPredictions {
        #[cfg(feature = "flex")]
        if let Some(out) = self.fused_predictions(hidden.clone(), targets, mask, temperature) {
            return out;
        }
        self.generic_predictions(hidden, targets, mask, temperature, values)
    }

    /// Logits, `log_softmax` and `gather`: the reference the fused kernel is tested against.
    pub fn generic_predictions(
        &self,
        hidden: Tensor<3>,
        targets: &Tensor<2, Int>,
        mask: &Tensor<2>,
        temperature: f64,
        values: bool,
    ) -> HeadPredictions {
        let [n, seq, d] = hidden.dims();
        let logits = self.head(hidden.slice([0..n, 0..seq - 1, 0..d]));
        // Dividing by 1.0 changes no bit: skipped.
        let logits = if temperature == 1.0 {
            logits
        } else {
            logits.div_scalar(temperature)
        };
        let logp = log_softmax(logits.clone(), 2);
        let (targets, mask) = if logp.is_autodiff() {
            (
                crate::backend::lift(targets.clone(), &logp),
                crate::backend::lift(mask.clone(), &logp),
            )
        } else {
            (targets.clone(), mask.clone())
        };
        let logps = logp
            .clone()
            .gather(2, targets.clone().unsqueeze_dim(2))
            .reshape([n, seq - 1])
            * mask.clone();
        let values = values.then(|| {
            let host = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().expect("f32 values");
            let (logits, logp) = (logits.detach(), logp.detach());
            let hits = logits
                .clone()
                .argmax(2)
                .reshape([n, seq - 1])
                .equal(targets.clone())
                .float()
                * mask.clone();
            let entropy = (logp.clone().exp() * logp)
                .sum_dim(2)
                .reshape([n, seq - 1])
                .neg()
                * mask.clone();
            let lse = |x: Tensor<3>| {
                let max = x.clone().max_dim(2);
                (x - max.clone()).exp().sum_dim(2).log() + max
            };
            let log_sum_p2 = (lse(logits.clone().mul_scalar(2.0)) - lse(logits).mul_scalar(2.0))
                .reshape([n, seq - 1])
                * mask.clone();
            PositionValues {
                hits: host(hits),
                entropy: host(entropy),
                log_sum_p2: host(log_sum_p2),
            }
        });
        HeadPredictions { logps, values }
    }

    /// The head's weight as the fused kernels read it; `None` for a head with a bias, which they
    /// do not take.
    #[cfg(feature = "flex")]
    fn head_weight(&self) -> Option<(Tensor<2>, super::kernels::head::WeightLayout)> {
        use super::kernels::head::WeightLayout;
        match &self.lm_head {
            Some(head) if head.bias.is_some() => None,
            Some(head) => Some((head.weight.val(), WeightLayout::ModelMajor)),
            None => Some((
                self.model.embed_tokens.weight.val(),
                WeightLayout::VocabMajor,
            )),
        }
    }

    /// The logits of a few rows through `kernels::head::logits` on plain flex (generation's last
    /// positions; the logits fixtures); `None` where the generic head runs.
    #[cfg(feature = "flex")]
    pub(crate) fn fused_logits(&self, hidden: Tensor<3>) -> Option<Tensor<3>> {
        use super::kernels::head::logits;
        if hidden.device() != burn::tensor::Device::flex() {
            return None;
        }
        let (weight, layout) = self.head_weight()?;
        let [n, seq, d] = hidden.dims();
        let out = logits(hidden.reshape([n * seq, d]), weight, layout)?;
        let vocab = out.dims()[1];
        Some(out.reshape([n, seq, vocab]))
    }

    #[cfg(feature = "flex")]
    fn fused_predictions(
        &self,
        hidden: Tensor<3>,
        targets: &Tensor<2, Int>,
        mask: &Tensor<2>,
        temperature: f64,
    ) -> Option<HeadPredictions> {
        use super::kernels::head::{Pick, log_probs};
        // The host copies of targets and mask below are for the kernel only.
        if hidden.device().inner() != burn::tensor::Device::flex() {
            return None;
        }
        let (weight, layout) = self.head_weight()?;
        let [n, seq, d] = hidden.dims();
        let width = seq - 1;
        let target_ids: Vec<i64> = targets
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .ok()?;
        let selected: Vec<f32> = mask
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .ok()?;
        if target_ids.len() != n * width || selected.len() != n * width {
            return None;
        }
        let mut picks = Vec::new();
        for (slot, (&target, &m)) in target_ids.iter().zip(&selected).enumerate() {
            if m != 0.0 {
                let (row, j) = (slot / width, slot % width);
                picks.push(Pick {
                    row: row * seq + j,
                    target: usize::try_from(target).ok()?,
                    slot,
                });
            }
        }
        let hidden = hidden.reshape([n * seq, d]);
        let (logps, pick_values) =
            log_probs(hidden, weight, layout, &picks, n * width, 1.0 / temperature)?;
        let mut values = PositionValues {
            hits: vec![0.0; n * width],
            entropy: vec![0.0; n * width],
            log_sum_p2: vec![0.0; n * width],
        };
        for (i, p) in picks.iter().enumerate() {
            values.hits[p.slot] = f32::from(u8::from(pick_values.hit[i]));
            values.entropy[p.slot] = pick_values.entropy[i];
            values.log_sum_p2[p.slot] = pick_values.log_sum_p2[i];
        }
        Some(HeadPredictions {
            logps: logps.reshape([n, width]),
            values: Some(values),
        })
    }
}

/// A causal LM whose head is the identity (`d_model == vocab`): its hidden states are its
/// logits, for tests written in logits.
#[cfg(test)]
pub(crate) fn identity_head(vocab: usize, device: &burn::tensor::Device) -> CausalLm {
    use burn::module::Param;
    use burn::tensor::TensorData;
    let cfg = super::ModelConfig::llama(vocab, vocab, 4, 1, 1, 1);
    let mut model = super::random_causal_lm(&cfg, 0, device);
    let eye: Vec<f32> = (0..vocab * vocab)
        .map(|i| f32::from(u8::from(i / vocab == i % vocab)))
        .collect();
    model.lm_head = Some(burn::nn::Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(eye, [vocab, vocab]),
            device,
        )),
        bias: None,
    });
    model
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, random_causal_lm};
    use burn::tensor::{Device, TensorData, Tolerance};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        TensorData::new(a.to_vec(), [a.len()]).assert_approx_eq::<f32>(
            &TensorData::new(b.to_vec(), [b.len()]),
            Tolerance::absolute(2e-5).set_relative(1e-4),
        );
    }

    /// Log-probs, values and the gradients of the head weight, the embeddings and the first
    /// layer's query projection, through the fused kernel or the generic path.
    #[cfg(feature = "flex")]
    fn run(tied: bool, fused: bool, temperature: f64) -> Vec<Vec<f32>> {
        let device = crate::test_device().autodiff();
        let mut cfg = ModelConfig::llama(300, 16, 24, 2, 4, 2);
        cfg.tie_word_embeddings = tied;
        let model = random_causal_lm(&cfg, 3, &device);
        let (rows, seq) = (3, 9);
        let ids: Vec<i64> = (0..rows * seq).map(|i| (i * 37 % 300) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, seq]), &device);
        // Row 1 is right-padded after 5 tokens; row 2 trains only on its last 3 targets.
        let padding = vec![
            vec![1; seq],
            [vec![1; 5], vec![0; 4]].concat(),
            vec![1; seq],
        ];
        let targets: Vec<i64> = (0..rows * (seq - 1))
            .map(|i| (i * 11 % 300) as i64)
            .collect();
        let mask: Vec<f32> = (0..rows * (seq - 1))
            .map(|i| {
                let (r, j) = (i / (seq - 1), i % (seq - 1));
                let on = match r {
                    0 => true,
                    1 => j < 4,
                    _ => j >= seq - 4,
                };
                f32::from(u8::from(on))
            })
            .collect();
        let dev: &Device = &device;
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, seq - 1]), dev);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, seq - 1]), dev);
        let hidden = model.model.forward(ids, Some(&padding), None);
        let p = if fused {
            model
                .fused_predictions(hidden, &targets, &mask, temperature)
                .expect("the fused head takes f32 flex tensors")
        } else {
            model.generic_predictions(hidden, &targets, &mask, temperature, true)
        };
        let projection: Vec<f32> = (0..rows * (seq - 1))
            .map(|i| (i % 5) as f32 - 2.0)
            .collect();
        let projection = Tensor::<2>::from_data(TensorData::new(projection, [rows, seq - 1]), dev);
        let grads = (p.logps.clone() * projection).sum().backward();
        let grad = |t: Tensor<2>| values(Tensor::from_inner(t.grad(&grads).unwrap()));
        let v = p.values.unwrap();
        let mut out = vec![values(p.logps), v.hits, v.entropy, v.log_sum_p2];
        out.push(grad(model.model.embed_tokens.weight.val()));
        if let Some(head) = &model.lm_head {
            out.push(grad(head.weight.val()));
        }
        out.push(grad(
            model.model.layers[0].self_attn.q_proj.base.weight.val(),
        ));
        out
    }

    #[cfg(feature = "flex")]
    #[test]
    fn predictions_match_the_generic_path_on_a_model() {
        for (tied, temperature) in [(false, 1.0), (true, 1.0), (true, 0.7)] {
            let (fused, generic) = (run(tied, true, temperature), run(tied, false, temperature));
            assert_eq!(fused.len(), generic.len());
            assert_eq!(fused[1], generic[1], "argmax hits, tied {tied}");
            for (a, b) in fused.iter().zip(&generic) {
                close(a, b);
            }
        }
    }
}
