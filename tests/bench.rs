//! `rudder bench` end to end: the JSON report has exactly its keys and sane values, on a fresh
//! configuration and on a Hugging Face directory, and bad requests are usage errors.

mod common;

use std::path::Path;

use common::Scratch;

fn report(s: &Scratch, args: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let out = s.ok(args);
    let value: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    value.as_object().expect("an object").clone()
}

fn check_sane(r: &serde_json::Map<String, serde_json::Value>, kind: &str, params: u64) {
    check_resident(r, kind, params, 12.0);
}

/// `bytes_per_param`: what must be resident per parameter (12 when AdamW's moments are).
fn check_resident(
    r: &serde_json::Map<String, serde_json::Value>,
    kind: &str,
    params: u64,
    bytes_per_param: f64,
) {
    let mut keys: Vec<&str> = r.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "backend",
            "kind",
            "params",
            "peak_rss_mib",
            "precision",
            "step_seconds",
            "tokens_per_second",
            "warmup_seconds"
        ]
    );
    // The first step's extra time is a finite number of seconds (never asserted as a time).
    assert!(
        r["warmup_seconds"].as_f64().is_some_and(f64::is_finite),
        "{r:?}"
    );
    assert_eq!(r["kind"], kind);
    assert_eq!(r["backend"], "cpu");
    assert_eq!(r["params"].as_u64(), Some(params));
    let step = r["step_seconds"].as_f64().unwrap();
    let tps = r["tokens_per_second"].as_f64().unwrap();
    let rss = r["peak_rss_mib"].as_f64().unwrap();
    assert!(step > 0.0 && step.is_finite(), "{r:?}");
    assert!(tps > 0.0 && tps.is_finite(), "{r:?}");
    // At least the parameters (4 bytes each), and for training their AdamW moments, are resident.
    assert!(
        rss * 1024.0 * 1024.0 > bytes_per_param * params as f64,
        "{r:?}"
    );
    assert!(rss < 64.0 * 1024.0, "{r:?}");
}

/// bench4m: embeddings 2048 x 256, lm_head 256 x 2048, 4 layers of 737,536 + 512, final norm.
const BENCH4M_LM_PARAMS: u64 =
    2 * 2048 * 256 + 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 704 + 512) + 256;
/// The reward (or value) model trades the LM head for a scalar score head.
const BENCH4M_REWARD_PARAMS: u64 = BENCH4M_LM_PARAMS - 256 * 2048 + 256;

#[test]
fn fresh_model_steps_report_tokens_per_second() {
    let s = Scratch::new();
    let lm_params = BENCH4M_LM_PARAMS;
    for kind in ["sft", "dpo", "kto", "orpo", "simpo"] {
        let r = report(
            &s,
            &[
                "bench",
                kind,
                "--model",
                "fresh:bench4m",
                "--batch",
                "2",
                "--seq",
                "16",
                "--steps",
                "1",
                "--json",
            ],
        );
        check_sane(&r, kind, lm_params);
        // 2 sequences (sft) or 2 pairs of 16 tokens per step.
        let tokens = if kind == "sft" { 32.0 } else { 64.0 };
        let step = r["step_seconds"].as_f64().unwrap();
        let tps = r["tokens_per_second"].as_f64().unwrap();
        assert!((tps * step - tokens).abs() < 1e-6 * tokens, "{r:?}");
    }
    // The reward model trades the LM head for a scalar score head.
    let r = report(
        &s,
        &[
            "bench",
            "reward",
            "--model",
            "fresh:bench4m",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
            "--json",
        ],
    );
    check_sane(&r, "reward", BENCH4M_REWARD_PARAMS);
    assert_eq!(r["precision"], "fp32");
    // bf16: the same step on bf16 activations, its fp32 weights and AdamW moments resident.
    let r = report(
        &s,
        &[
            "bench",
            "sft",
            "--model",
            "fresh:bench4m",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
            "--precision",
            "bf16",
            "--json",
        ],
    );
    check_sane(&r, "sft", lm_params);
    assert_eq!(r["precision"], "bf16");
}

#[test]
fn ppo_and_generation_are_benchmarked() {
    let s = Scratch::new();
    let lm_params = BENCH4M_LM_PARAMS;
    let value_params = BENCH4M_REWARD_PARAMS;
    let args = |kind: &'static str| {
        [
            "bench",
            kind,
            "--model",
            "fresh:bench4m",
            "--batch",
            "2",
            "--seq",
            "16",
            "--new-tokens",
            "5",
            "--steps",
            "1",
            "--json",
        ]
    };
    // The rollout runs the policy; the update trains the policy and the value model.
    for (kind, params, tokens, bytes) in [
        ("ppo-rollout", lm_params, 32.0, 4.0),
        ("ppo-update", lm_params + value_params, 32.0, 12.0),
        ("generate", lm_params, 10.0, 4.0),
    ] {
        let r = report(&s, &args(kind));
        check_resident(&r, kind, params, bytes);
        let step = r["step_seconds"].as_f64().unwrap();
        let tps = r["tokens_per_second"].as_f64().unwrap();
        assert!((tps * step - tokens).abs() < 1e-6 * tokens, "{kind}: {r:?}");
    }
    let out = s.rudder(&[
        "bench",
        "generate",
        "--model",
        "fresh:bench4m",
        "--new-tokens",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_hugging_face_directory_is_benchmarked() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/policy");
    let s = Scratch::new();
    let r = report(
        &s,
        &[
            "bench",
            "sft",
            "--model",
            fixtures.to_str().unwrap(),
            "--batch",
            "2",
            "--seq",
            "8",
            "--steps",
            "1",
            "--json",
        ],
    );
    let params = r["params"].as_u64().unwrap();
    check_sane(&r, "sft", params);
    assert!(params > 0);
    // The human-readable form names the numbers.
    let text = s.ok(&[
        "bench",
        "sft",
        "--model",
        fixtures.to_str().unwrap(),
        "--batch",
        "1",
        "--seq",
        "8",
        "--steps",
        "1",
    ]);
    assert!(
        text.contains("tokens/s") && text.contains("s/step"),
        "{text}"
    );
}

#[test]
fn bad_requests_are_usage_errors() {
    let s = Scratch::new();
    for args in [
        &["bench", "ppo2", "--model", "fresh:bench4m"][..],
        &["bench", "sft", "--model", "fresh:nope"],
        &["bench", "sft", "--model", "fresh:bench4m", "--seq", "1"],
        &[
            "bench",
            "sft",
            "--model",
            "fresh:bench4m",
            "--backend",
            "tpu",
        ],
        &[
            "bench",
            "sft",
            "--model",
            "fresh:bench4m",
            "--precision",
            "fp8",
        ],
    ] {
        let out = s.rudder(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("error"));
    }
    // A directory that holds no model is a failure to run, not a crash.
    let out = s.rudder(&["bench", "sft", "--model", "no-such-dir", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
