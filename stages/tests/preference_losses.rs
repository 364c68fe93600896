//! The preference family's loss math against TRL 1.16's values in
//! `shared/fixtures/dpo_golden.json`: every DPO loss type (with MPO mixes, f-divergences, LD-DPO
//! and WPO), CPO/SimPO, ORPO and KTO, fed the golden sequence log-probs.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use rudder_schema::kinds::{CpoLossType, DpoLossType, FDivergenceType, KtoLossType};
use rudder_stages::losses::{
    CpoLossConfig, DpoLossConfig, KtoLossConfig, PairLogps, cpo_loss, cpo_uses_average_logps,
    dpo_loss, kto_kl, kto_loss, kto_metrics, kto_uses_kl, ld_logps, orpo_loss, pair_metrics,
    token_mean_nll,
};
use serde_json::Value;

/// Relative tolerance on losses, rewards and metrics; absolute below [`ABS`].
const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/dpo_golden.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("dpo_golden.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor(v: &[f32]) -> Tensor<1> {
    Tensor::from_floats(v, &Default::default())
}

fn values(x: Tensor<1>) -> Vec<f64> {
    x.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .unwrap()
}

/// Per-example golden values of the 16 pairs.
fn column(golden: &Value, key: &str) -> Vec<f32> {
    golden["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e[key]
                .as_f64()
                .unwrap_or_else(|| panic!("examples[*].{key}")) as f32
        })
        .collect()
}

/// Collects mismatches so one run reports them all.
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
    compared: usize,
    /// Largest relative error among values above [`ABS`] in magnitude.
    worst_rel: f64,
    /// Largest error of the absolute comparisons.
    worst_abs: f64,
}

impl Checks {
    fn near(&mut self, what: &str, got: f64, want: f64) {
        self.compared += 1;
        let err = (got - want).abs();
        if want.abs() > ABS {
            self.worst_rel = self.worst_rel.max(err / want.abs());
        }
        if !(err <= ABS || err <= REL * want.abs()) {
            self.failures.push(format!(
                "{what}: got {got}, want {want} (abs {err:.3e}, rel {:.3e})",
                err / want.abs()
            ));
        }
    }

    fn near_abs(&mut self, what: &str, got: f64, want: f64, tol: f64) {
        self.compared += 1;
        self.worst_abs = self.worst_abs.max((got - want).abs());
        if (got - want).abs() > tol {
            self.failures
                .push(format!("{what}: got {got}, want {want}"));
        }
    }

    fn all(&mut self, what: &str, got: &[f64], want: &Value) {
        let want = floats(want);
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            self.near(&format!("{what}[{i}]"), *g, *w as f64);
        }
    }

    /// The metrics TRL logged, for the names `ours` has.
    fn metrics(&mut self, what: &str, ours: &[(&str, f64)], trl: &Value) {
        for (name, value) in ours {
            let want = trl[*name]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: TRL logged no {name}"));
            self.near(&format!("{what} {name}"), *value, want);
        }
    }

    fn finish(self, section: &str) {
        assert!(self.compared > 0);
        assert!(
            self.failures.is_empty(),
            "{section}: {} of {} values differ:\n{}",
            self.failures.len(),
            self.compared,
            self.failures.join("\n")
        );
        println!(
            "{section}: {} values within tolerance, worst relative error {:.2e}, worst absolute \
             (absolute checks) {:.2e}",
            self.compared, self.worst_rel, self.worst_abs
        );
    }
}

fn dpo_config(trl: &Value) -> DpoLossConfig {
    let types: Vec<DpoLossType> = serde_json::from_value(trl["loss_type"].clone()).unwrap();
    let weights = trl["loss_weights"]
        .as_array()
        .map(|w| w.iter().map(|x| x.as_f64().unwrap()).collect())
        .unwrap_or_else(|| vec![1.0; types.len()]);
    let mut config = DpoLossConfig::single(types[0], trl["beta"].as_f64().unwrap());
    config.losses = types.into_iter().zip(weights).collect();
    if let Some(ls) = trl["label_smoothing"].as_f64() {
        config.label_smoothing = ls;
    }
    if let Some(tau) = trl["discopop_tau"].as_f64() {
        config.discopop_tau = tau;
    }
    if !trl["f_divergence_type"].is_null() {
        config.f_divergence_type =
            serde_json::from_value::<FDivergenceType>(trl["f_divergence_type"].clone()).unwrap();
    }
    if let Some(alpha) = trl["f_alpha_divergence_coef"].as_f64() {
        config.f_alpha_divergence_coef = alpha;
    }
    config
}

#[test]
fn every_dpo_variant_matches_trl() {
    let golden = golden();
    let mut checks = Checks::default();
    let known = [
        "loss_type",
        "loss_weights",
        "beta",
        "label_smoothing",
        "discopop_tau",
        "f_divergence_type",
        "f_alpha_divergence_coef",
        "ld_alpha",
        "use_weighting",
    ];
    for (name, variant) in golden["dpo"].as_object().unwrap() {
        let trl = &variant["trl_config"];
        for key in trl.as_object().unwrap().keys() {
            assert!(
                known.contains(&key.as_str()),
                "{name}: unhandled setting {key}"
            );
        }
        let config = dpo_config(trl);
        let ld = trl["ld_alpha"].as_f64().is_some();
        let side = |key: &str| {
            if ld {
                tensor(&floats(&variant[format!("ld_{key}")]))
            } else {
                tensor(&column(&golden, key))
            }
        };
        let logps = PairLogps {
            policy_chosen: side("policy_chosen_logps"),
            policy_rejected: side("policy_rejected_logps"),
            reference_chosen: side("reference_chosen_logps"),
            reference_rejected: side("reference_rejected_logps"),
            chosen_tokens: tensor(&column(&golden, "chosen_completion_tokens")),
            rejected_tokens: tensor(&column(&golden, "rejected_completion_tokens")),
            sft_chosen: ld.then(|| tensor(&column(&golden, "policy_chosen_logps"))),
        };
        let weights = (trl["use_weighting"] == Value::Bool(true)).then(|| {
            tensor(&floats(&variant["wpo_chosen_weights"]))
                * tensor(&floats(&variant["wpo_rejected_weights"]))
        });
        let out = dpo_loss(&logps, &config, weights);

        checks.near(
            &format!("{name} loss"),
            values(out.loss())[0],
            variant["loss"].as_f64().unwrap(),
        );
        let per_example = values(out.per_example.clone());
        if !variant["per_example_loss"].is_null() {
            checks.all(
                &format!("{name} per_example_loss"),
                &per_example,
                &variant["per_example_loss"],
            );
        }
        if !variant["per_sorted_index_loss"].is_null() {
            checks.all(
                &format!("{name} per_sorted_index_loss"),
                &per_example,
                &variant["per_sorted_index_loss"],
            );
        }
        // TRL's logged rewards use the log-probs the loss used (LD-weighted under ld_alpha).
        checks.all(
            &format!("{name} chosen_rewards"),
            &values(out.chosen_rewards.clone()),
            &variant["chosen_rewards"],
        );
        checks.all(
            &format!("{name} rejected_rewards"),
            &values(out.rejected_rewards.clone()),
            &variant["rejected_rewards"],
        );
        let metrics = pair_metrics(
            out.chosen_rewards,
            out.rejected_rewards,
            logps.policy_chosen,
            logps.policy_rejected,
        );
        checks.near(
            &format!("{name} reward_accuracy"),
            metrics[2].1,
            variant["reward_accuracy"].as_f64().unwrap(),
        );
        checks.metrics(name, &metrics, &variant["trl_metrics"]);
    }
    checks.finish("dpo");
}

/// The `sft` term is the token-mean NLL of the batch's chosen completions.
#[test]
fn sft_term_is_the_token_mean_nll() {
    let golden = golden();
    let nll = token_mean_nll(
        tensor(&column(&golden, "policy_chosen_logps")),
        tensor(&column(&golden, "chosen_completion_tokens")),
    );
    let mut checks = Checks::default();
    checks.near(
        "sft",
        values(nll)[0],
        golden["dpo"]["sft"]["loss"].as_f64().unwrap(),
    );
    checks.finish("sft");
}

/// LD-DPO's sequence log-probs from the golden per-token log-probs (an independent full-logits
/// computation whose sums agree with TRL's to `self_checks.ld_logps_trl_vs_full_logits_max_abs_diff`).
#[test]
fn ld_logps_from_token_logps_match_trl() {
    let golden = golden();
    let variant = &golden["dpo"]["sigmoid_ld_alpha_0.5"];
    let alpha = variant["trl_config"]["ld_alpha"].as_f64().unwrap();
    let tol = 4.0
        * golden["self_checks"]["ld_logps_trl_vs_full_logits_max_abs_diff"]
            .as_f64()
            .unwrap();
    let examples = golden["examples"].as_array().unwrap();
    // Right-padded [n, T] per-token log-probs with garbage in the padding, and their masks.
    let padded = |key: &str| {
        let rows: Vec<Vec<f32>> = examples.iter().map(|e| floats(&e[key])).collect();
        let width = rows.iter().map(Vec::len).max().unwrap() + 2;
        let (mut logps, mut mask) = (Vec::new(), Vec::new());
        for row in &rows {
            for j in 0..width {
                logps.push(row.get(j).copied().unwrap_or(-1e4));
                mask.push(if j < row.len() { 1.0f32 } else { 0.0 });
            }
        }
        let shape = [rows.len(), width];
        let device = rudder_stages::test_device();
        (
            Tensor::<2>::from_data(TensorData::new(logps, shape), &device),
            Tensor::<2>::from_data(TensorData::new(mask, shape), &device),
        )
    };
    let mut checks = Checks::default();
    for model in ["policy", "reference"] {
        let (c, cm) = padded(&format!("{model}_chosen_token_logps"));
        let (r, rm) = padded(&format!("{model}_rejected_token_logps"));
        let (chosen, rejected) = ld_logps(c, cm, r, rm, alpha);
        for (side, got) in [("chosen", chosen), ("rejected", rejected)] {
            let want = floats(&variant[format!("ld_{model}_{side}_logps")]);
            for (i, (g, w)) in values(got).iter().zip(want).enumerate() {
                checks.near_abs(&format!("ld {model} {side}[{i}]"), *g, w as f64, tol);
            }
        }
    }
    checks.finish("ld_alpha");
}

#[test]
fn every_cpo_variant_matches_trl() {
    let golden = golden();
    let mut checks = Checks::default();
    let chosen_sums = column(&golden, "policy_chosen_logps");
    let chosen_tokens = column(&golden, "chosen_completion_tokens");
    for (name, variant) in golden["cpo"].as_object().unwrap() {
        let trl = &variant["trl_config"];
        let config = CpoLossConfig {
            loss_type: serde_json::from_value::<CpoLossType>(trl["loss_type"].clone()).unwrap(),
            beta: trl["beta"].as_f64().unwrap(),
            simpo_gamma: trl["simpo_gamma"].as_f64().unwrap_or(0.5),
            cpo_alpha: trl["cpo_alpha"].as_f64().unwrap_or(1.0),
            label_smoothing: trl["label_smoothing"].as_f64().unwrap_or(0.0),
        };
        let average = cpo_uses_average_logps(config.loss_type);
        assert_eq!(Value::Bool(average), variant["average_log_prob"], "{name}");
        let suffix = if average { "_avg" } else { "" };
        let chosen = column(&golden, &format!("policy_chosen_logps{suffix}"));
        let rejected = column(&golden, &format!("policy_rejected_logps{suffix}"));
        checks.all(
            &format!("{name} policy_chosen_logps"),
            &chosen.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            &variant["policy_chosen_logps"],
        );
        let nll = token_mean_nll(tensor(&chosen_sums), tensor(&chosen_tokens));
        if config.cpo_alpha != 0.0 {
            checks.near(
                &format!("{name} nll_loss"),
                values(nll.clone())[0],
                variant["nll_loss"].as_f64().unwrap(),
            );
        }
        let out = cpo_loss(tensor(&chosen), tensor(&rejected), Some(nll), &config);
        checks.near(
            &format!("{name} loss"),
            values(out.loss)[0],
            variant["loss"].as_f64().unwrap(),
        );
        checks.all(
            &format!("{name} per_example_loss"),
            &values(out.per_example),
            &variant["per_example_loss"],
        );
        checks.all(
            &format!("{name} chosen_rewards"),
            &values(out.chosen_rewards.clone()),
            &variant["chosen_rewards"],
        );
        checks.all(
            &format!("{name} rejected_rewards"),
            &values(out.rejected_rewards.clone()),
            &variant["rejected_rewards"],
        );
        let metrics = pair_metrics(
            out.chosen_rewards,
            out.rejected_rewards,
            tensor(&chosen),
            tensor(&rejected),
        );
        checks.metrics(name, &metrics, &variant["trl_metrics"]);
    }
    checks.finish("cpo");
}

#[test]
fn orpo_matches_trl() {
    let golden = golden();
    let orpo = &golden["orpo"];
    let mut checks = Checks::default();
    let chosen = column(&golden, "policy_chosen_logps_avg");
    let rejected = column(&golden, "policy_rejected_logps_avg");
    checks.all(
        "orpo policy_chosen_logps_avg",
        &chosen.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &orpo["policy_chosen_logps_avg"],
    );
    let nll = orpo["chosen_nll_loss"].as_f64().unwrap() as f32;
    let out = orpo_loss(
        tensor(&chosen),
        tensor(&rejected),
        tensor(&[nll]),
        orpo["trl_config"]["beta"].as_f64().unwrap(),
    );
    checks.near(
        "orpo loss",
        values(out.loss)[0],
        orpo["loss"].as_f64().unwrap(),
    );
    checks.all("orpo log_odds", &values(out.log_odds), &orpo["log_odds"]);
    checks.all(
        "orpo per_example_or_term",
        &values(out.per_example_or_term),
        &orpo["per_example_or_term"],
    );
    checks.all(
        "orpo chosen_rewards",
        &values(out.chosen_rewards.clone()),
        &orpo["chosen_rewards"],
    );
    checks.all(
        "orpo rejected_rewards",
        &values(out.rejected_rewards.clone()),
        &orpo["rejected_rewards"],
    );
    checks.near(
        "orpo log_odds_ratio_mean",
        out.log_odds_ratio,
        orpo["log_odds_ratio_mean"].as_f64().unwrap(),
    );
    checks.near(
        "orpo log_odds_chosen_mean",
        out.log_odds_chosen,
        orpo["log_odds_chosen_mean"].as_f64().unwrap(),
    );
    let mut metrics = pair_metrics(
        out.chosen_rewards,
        out.rejected_rewards,
        tensor(&chosen),
        tensor(&rejected),
    );
    metrics.push(("log_odds_ratio", out.log_odds_ratio));
    metrics.push(("log_odds_chosen", out.log_odds_chosen));
    metrics.push(("nll_loss", nll as f64));
    checks.metrics("orpo", &metrics, &orpo["trl_metrics"]);
    checks.finish("orpo");
}

#[test]
fn every_kto_variant_matches_trl() {
    let golden = golden();
    let mut checks = Checks::default();
    for (name, variant) in golden["kto"].as_object().unwrap() {
        let trl = &variant["trl_config"];
        let config = KtoLossConfig {
            loss_type: serde_json::from_value::<KtoLossType>(trl["loss_type"].clone()).unwrap(),
            beta: trl["beta"].as_f64().unwrap(),
            desirable_weight: trl["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: trl["undesirable_weight"].as_f64().unwrap(),
        };
        let labels: Vec<bool> = variant["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["label"].as_bool().unwrap())
            .collect();
        let kl = kto_uses_kl(config.loss_type).then(|| {
            kto_kl(
                tensor(&floats(&variant["policy_KL_logps"])),
                tensor(&floats(&variant["reference_KL_logps"])),
            )
        });
        if let Some(kl) = &kl {
            checks.near(
                &format!("{name} kl"),
                values(kl.clone())[0],
                variant["kl"].as_f64().unwrap(),
            );
        }
        let policy = tensor(&floats(&variant["policy_logps"]));
        let out = kto_loss(
            policy.clone(),
            tensor(&floats(&variant["reference_logps"])),
            &labels,
            kl.clone(),
            &config,
        );
        checks.near(
            &format!("{name} loss"),
            values(out.loss())[0],
            variant["loss"].as_f64().unwrap(),
        );
        checks.all(
            &format!("{name} per_example_loss"),
            &values(out.per_example.clone()),
            &variant["per_example_loss"],
        );
        checks.all(
            &format!("{name} rewards"),
            &values(out.rewards.clone()),
            &variant["rewards"],
        );
        let metrics = kto_metrics(out.rewards, policy, &labels, kl);
        checks.metrics(name, &metrics, &variant["trl_metrics"]);
    }
    checks.finish("kto");
}
