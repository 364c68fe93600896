//! The per-token KL estimators of Schulman's "Approximating KL divergence", from the sampled
//! token's log-probs under the policy and the reference (PPO's penalty, RLOO's reward term,
//! GRPO's k3 term).

/// k1 = log p - log q;
/// k3 = (q/p - 1) - log(q/p).
pub fn kl_k1(logp: f64, ref_logp: f64) -> f64 {
    logp - ref_logp
}

/// See [`kl_k1`].
pub fn kl_k3(logp: f64, ref_logp: f64) -> f64 {
    let logr = ref_logp - logp;
    logr.exp_m1() - logr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn kl_estimators_match_hand_values() {
        // p = 0.5, q = 0.25: k1 = ln 2; k3 = (0.5 - 1) - ln 0.5 = ln 2 - 0.5.
        let (lp, lq) = (0.5f64.ln(), 0.25f64.ln());
        assert!(close(kl_k1(lp, lq), 2f64.ln()));
        assert!(close(kl_k3(lp, lq), 2f64.ln() - 0.5));
        // Equal log-probs: both zero.
        assert_eq!(kl_k1(-1.3, -1.3), 0.0);
        assert_eq!(kl_k3(-1.3, -1.3), 0.0);
        // k3 is never negative even where k1 is.
        assert!(kl_k1(lq, lp) < 0.0 && kl_k3(lq, lp) > 0.0);
    }
}
