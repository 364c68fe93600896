//! PPO's clipped losses ("The N+ Implementation Details of RLHF with PPO"): the surrogate on
//! the probability ratio, which RLOO and GRPO use too, and the value model's clipped loss.

use burn::tensor::Tensor;

/// PPO's clipped surrogate per token: `max(-A r, -A clip(r, 1 - c, 1 + c))`, with both
/// terms (the second is larger where clipping is active).
pub fn clipped_policy_loss<const D: usize>(
    ratio: Tensor<D>,
    advantages: Tensor<D>,
    cliprange: f64,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let pg1 = advantages.clone().neg() * ratio.clone();
    let pg2 = advantages.neg() * ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
    (pg1.clone().max_pair(pg2.clone()), pg1, pg2)
}

/// The clipped value loss per token: `0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`,
/// with both squared errors.
pub fn clipped_value_loss<const D: usize>(
    vpred: Tensor<D>,
    old_values: Tensor<D>,
    returns: Tensor<D>,
    cliprange_value: f64,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let vclipped =
        old_values.clone() + (vpred.clone() - old_values).clamp(-cliprange_value, cliprange_value);
    let vf1 = (vpred - returns.clone()).powf_scalar(2.0);
    let vf2 = (vclipped - returns).powf_scalar(2.0);
    (vf1.clone().max_pair(vf2.clone()).mul_scalar(0.5), vf1, vf2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec().unwrap()
    }

    #[test]
    fn clipped_losses_match_hand_values() {
        let device = crate::test_device();
        let t = |v: [f32; 3]| Tensor::<1>::from_floats(v, &device);
        // Ratios 1.5, 0.5, 1.1 with advantages 1, 1, -2 and cliprange 0.2:
        // max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2.
        let (pg, pg1, pg2) = clipped_policy_loss(t([1.5, 0.5, 1.1]), t([1.0, 1.0, -2.0]), 0.2);
        let pg = host(pg);
        let want = [-1.2f32, -0.5, 2.2];
        for (a, b) in pg.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{pg:?}");
        }
        assert_eq!(host(pg2.greater(pg1).float()), vec![1.0, 0.0, 0.0]);
        // Old values 0, 0, 1; predictions 0.5, 0.1, 0.5; returns 1, 1, 0; cliprange 0.2:
        // row 0: (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.32 (clipped);
        // row 1: 0.81 vs 0.81 -> 0.405; row 2: 0.25 vs (0.8-0)^2 = 0.64 -> 0.32 (clipped).
        let (vf, vf1, vf2) = clipped_value_loss(
            t([0.5, 0.1, 0.5]),
            t([0.0, 0.0, 1.0]),
            t([1.0, 1.0, 0.0]),
            0.2,
        );
        let vf = host(vf);
        for (a, b) in vf.iter().zip([0.32f32, 0.405, 0.32]) {
            assert!((a - b).abs() < 1e-6, "{vf:?}");
        }
        assert_eq!(host(vf2.greater(vf1).float()), vec![1.0, 0.0, 1.0]);
    }
}
