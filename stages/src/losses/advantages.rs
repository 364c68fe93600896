//! The advantage arithmetic of the online-RL kinds: TRL's whitening, generalised advantage
//! estimation (PPO), the leave-one-out baseline (RLOO) and group-normalised advantages (GRPO).

/// TRL's `masked_whiten` over every value of `rows`: `(x - mean) / sqrt(var + 1e-8)` with the
/// unbiased variance, the mean added back when `shift_mean` is false.
pub fn whiten(rows: &[Vec<f64>], shift_mean: bool) -> Vec<Vec<f64>> {
    let n: usize = rows.iter().map(Vec::len).sum();
    if n == 0 {
        return rows.to_vec();
    }
    let mean = rows.iter().flatten().sum::<f64>() / n as f64;
    let mut var = rows
        .iter()
        .flatten()
        .map(|x| (x - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    if n > 1 {
        var *= n as f64 / (n as f64 - 1.0);
    }
    let scale = 1.0 / (var + 1e-8).sqrt();
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|x| {
                    let w = (x - mean) * scale;
                    if shift_mean { w } else { w + mean }
                })
                .collect()
        })
        .collect()
}

/// Generalised advantage estimation on one response: `delta_t = r_t + gamma V_{t+1} - V_t`
/// (`V` after the last token is 0), `A_t = delta_t + gamma lam A_{t+1}`. Returns the advantages
/// and the returns `A + V`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut advantages = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        advantages[t] = last;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// RLOO's advantages: each reward minus the mean of the other rewards of its group
/// (consecutive groups of `k`).
pub fn leave_one_out(rewards: &[f64], k: usize) -> Vec<f64> {
    rewards
        .chunks(k)
        .flat_map(|g| {
            let sum: f64 = g.iter().sum();
            let others = (g.len().max(2) - 1) as f64;
            g.iter().map(move |r| {
                if g.len() < 2 {
                    0.0
                } else {
                    r - (sum - r) / others
                }
            })
        })
        .collect()
}

/// GRPO's advantages: each reward minus its group's mean, divided by the group's (unbiased)
/// standard deviation + 1e-4 when `scale`. Also returns each group's standard deviation.
pub fn group_advantages(rewards: &[f64], k: usize, scale: bool) -> (Vec<f64>, Vec<f64>) {
    let mut stds = Vec::new();
    let advantages = rewards
        .chunks(k)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let std = if g.len() > 1 {
                (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            stds.push(std);
            g.iter()
                .map(move |r| {
                    if scale {
                        (r - mean) / (std + 1e-4)
                    } else {
                        r - mean
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (advantages, stds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn whitening_uses_the_unbiased_variance() {
        // Values 1, 2, 3 (over two rows): mean 2, unbiased variance 1.
        let rows = vec![vec![1.0, 2.0], vec![3.0]];
        let w = whiten(&rows, true);
        let s = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert!(close(w[0][0], -s) && close(w[0][1], 0.0) && close(w[1][0], s));
        let kept = whiten(&rows, false);
        assert!(close(kept[0][0], 2.0 - s) && close(kept[1][0], 2.0 + s));
    }

    #[test]
    fn gae_matches_hand_computation() {
        // r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma 1, lam 0.5:
        // d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.4 - 0.2 = 0.2; d0 = 0 + 0.2 - 0.5 = -0.3
        // A2 = 0.6; A1 = 0.2 + 0.5 * 0.6 = 0.5; A0 = -0.3 + 0.5 * 0.5 = -0.05.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.5);
        assert!(
            close(a[0], -0.05) && close(a[1], 0.5) && close(a[2], 0.6),
            "{a:?}"
        );
        assert!(
            close(r[0], 0.45) && close(r[1], 0.7) && close(r[2], 1.0),
            "{r:?}"
        );
        // gamma 0.9, lam 1: A_t = sum gamma^k delta (Monte Carlo return minus V_t).
        let (a, _) = gae(&[1.0, 2.0], &[0.0, 0.0], 0.9, 1.0);
        assert!(close(a[1], 2.0) && close(a[0], 1.0 + 0.9 * 2.0), "{a:?}");
    }

    #[test]
    fn baselines_of_groups() {
        // Group [1, 2, 6]: others' means 4, 3.5, 1.5.
        let a = leave_one_out(&[1.0, 2.0, 6.0, 0.0, 0.0, 3.0], 3);
        assert!(
            close(a[0], -3.0) && close(a[1], -1.5) && close(a[2], 4.5),
            "{a:?}"
        );
        assert!(close(a[5], 3.0) && close(a[3], -1.5), "{a:?}");
        // Group [1, 3]: mean 2, unbiased std sqrt(2).
        let (g, std) = group_advantages(&[1.0, 3.0, 5.0, 5.0], 2, true);
        let s = 2f64.sqrt();
        assert!(close(std[0], s) && close(std[1], 0.0));
        assert!(close(g[0], -1.0 / (s + 1e-4)) && close(g[1], 1.0 / (s + 1e-4)));
        assert!(close(g[2], 0.0) && close(g[3], 0.0));
        let (g, _) = group_advantages(&[1.0, 3.0], 2, false);
        assert!(close(g[0], -1.0) && close(g[1], 1.0));
    }
}
