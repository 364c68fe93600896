//! The Bradley-Terry loss of reward modelling, as TRL's `RewardTrainer` computes it.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

/// Per-pair Bradley-Terry losses `-logsigmoid(r_c - r_r - margin) + coef * (r_c + r_r)^2`.
pub fn bradley_terry(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    margin: Option<Tensor<1>>,
    center_coefficient: Option<f64>,
) -> Tensor<1> {
    let mut diff = chosen.clone() - rejected.clone();
    if let Some(m) = margin {
        diff = diff - m;
    }
    let mut loss = log_sigmoid(diff).neg();
    if let Some(coef) = center_coefficient {
        loss = loss + (chosen + rejected).powi_scalar(2).mul_scalar(coef);
    }
    loss
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_data(
            TensorData::new(v.to_vec(), [v.len()]),
            &crate::test_device(),
        )
    }

    fn values(x: Tensor<1>) -> Vec<f32> {
        x.into_data().try_to_vec().unwrap()
    }

    #[test]
    fn bradley_terry_by_hand() {
        // r_c - r_r = 0 -> ln 2; = ln 3 -> -ln(3/4) = ln(4/3).
        let loss = values(bradley_terry(
            t(&[1.0, 3f32.ln()]),
            t(&[1.0, 0.0]),
            None,
            None,
        ));
        assert!((loss[0] - 2f32.ln()).abs() < 1e-6);
        assert!((loss[1] - (4f32 / 3.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn margin_and_centering_terms() {
        // diff 1, margin 1 -> ln 2; centring 0.5 * (1 + 0)^2 = 0.5.
        let loss = values(bradley_terry(
            t(&[1.0]),
            t(&[0.0]),
            Some(t(&[1.0])),
            Some(0.5),
        ));
        assert!((loss[0] - (2f32.ln() + 0.5)).abs() < 1e-6, "{loss:?}");
        let sum: f32 = bradley_terry(t(&[1.0]), t(&[0.0]), None, None)
            .sum()
            .into_scalar::<f32>();
        assert!((sum - (1.0 + (-1f32).exp()).ln()).abs() < 1e-6);
    }
}
