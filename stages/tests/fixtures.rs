//! Parity with the reference fixtures written by transformers/TRL (../shared/fixtures): forward
//! logits and hidden states, padded batches, save/load round trips, tokenisation, greedy
//! generation with and without the KV cache, and the reward head.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rudder_schema::Backend;
use rudder_stages::generate::{GenerateOptions, generate_ids};
use rudder_stages::model::{
    CausalLm, load_causal_lm, load_reward_model, save_causal_lm, save_reward_model,
};
use rudder_stages::tokenizer::Tokenizer;
use rudder_stages::{FinishReason, StageError, generate};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
    .to_path_buf()
}

fn device() -> Device {
    rudder_stages::test_device()
}

/// A tensor of a safetensors file as (shape, f32 values); int64 ids are converted.
fn read_tensor(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f64>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let view = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture has {name}"));
    let data = view.data();
    let values = match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

fn ids_tensor(rows: &[Vec<i64>]) -> Tensor<2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(
        TensorData::new(flat, [rows.len(), rows[0].len()]),
        &device(),
    )
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

struct Golden {
    ids: Vec<Vec<i64>>,
    logits: Vec<Vec<f64>>,
    hidden: Vec<Option<Vec<f64>>>,
}

fn golden(file: &str) -> Golden {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let n = st
        .names()
        .iter()
        .filter(|n| n.starts_with("input_ids_"))
        .count();
    let mut g = Golden {
        ids: vec![],
        logits: vec![],
        hidden: vec![],
    };
    for i in 0..n {
        let (_, ids) = read_tensor(&bytes, &format!("input_ids_{i}"));
        g.ids.push(ids.iter().map(|&v| v as i64).collect());
        g.logits.push(read_tensor(&bytes, &format!("logits_{i}")).1);
        let hidden_name = format!("hidden_{i}");
        g.hidden.push(
            st.names()
                .contains(&hidden_name.as_str())
                .then(|| read_tensor(&bytes, &hidden_name).1),
        );
    }
    g
}

fn check_logits(model: &CausalLm, g: &Golden) -> f64 {
    let mut worst = 0.0f64;
    for (i, ids) in g.ids.iter().enumerate() {
        let logits = to_vec(model.forward(ids_tensor(std::slice::from_ref(ids)), None, None));
        let d = max_abs_diff(&logits, &g.logits[i]);
        assert!(d < 1e-4, "sequence {i}: logits max abs diff {d}");
        worst = worst.max(d);
        if let Some(hidden) = &g.hidden[i] {
            let states = model
                .model
                .hidden_states(ids_tensor(std::slice::from_ref(ids)), None);
            let per_state = hidden.len() / states.len();
            assert_eq!(states.len(), 4, "embedding, 2 layers, final norm");
            for (s, state) in states.into_iter().enumerate() {
                let d = max_abs_diff(&to_vec(state), &hidden[s * per_state..(s + 1) * per_state]);
                assert!(d < 1e-4, "sequence {i}, hidden state {s}: max abs diff {d}");
                worst = worst.max(d);
            }
        }
    }
    worst
}

#[test]
fn policy_logits_and_hidden_states_match_transformers() {
    let (cfg, model) = load_causal_lm(&fixtures().join("policy"), &device()).unwrap();
    assert!(!cfg.tie_word_embeddings && model.lm_head.is_some());
    let worst = check_logits(&model, &golden("logits.safetensors"));
    eprintln!("policy: max abs diff {worst:e}");
}

#[test]
fn tied_policy_logits_match_transformers() {
    let (cfg, model) = load_causal_lm(&fixtures().join("policy_tied"), &device()).unwrap();
    assert!(cfg.tie_word_embeddings && model.lm_head.is_none());
    let worst = check_logits(&model, &golden("logits_tied.safetensors"));
    eprintln!("policy_tied: max abs diff {worst:e}");
}

#[test]
fn right_padded_batch_matches_single_sequences() {
    let (_, model) = load_causal_lm(&fixtures().join("policy"), &device()).unwrap();
    let g = golden("logits.safetensors");
    let longest = g.ids.iter().map(Vec::len).max().unwrap();
    let rows: Vec<Vec<i64>> = g
        .ids
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.resize(longest, 0);
            r
        })
        .collect();
    let padding: Vec<Vec<u8>> = g
        .ids
        .iter()
        .map(|r| {
            let mut m = vec![1u8; r.len()];
            m.resize(longest, 0);
            m
        })
        .collect();
    let logits = to_vec(model.forward(ids_tensor(&rows), Some(&padding), None));
    let vocab = 512;
    for (i, ids) in g.ids.iter().enumerate() {
        let start = i * longest * vocab;
        let real = &logits[start..start + ids.len() * vocab];
        let d = max_abs_diff(real, &g.logits[i]);
        assert!(d < 1e-4, "padded row {i}: max abs diff {d}");
    }
}

fn all_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name} saved as fp32");
            (name, v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn save_then_load_is_bit_identical() {
    for name in ["policy", "policy_tied"] {
        let src = fixtures().join(name);
        let (cfg, model) = load_causal_lm(&src, &device()).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_causal_lm(&model, &cfg, out.path()).unwrap();
        // Same names, shapes and bytes as the transformers-written file.
        assert_eq!(
            all_tensors(&out.path().join("model.safetensors")),
            all_tensors(&src.join("model.safetensors")),
            "{name}"
        );
        let (cfg2, again) = load_causal_lm(out.path(), &device()).unwrap();
        assert_eq!(cfg2.tie_word_embeddings, cfg.tie_word_embeddings);
        assert_eq!(cfg2.rope_theta, cfg.rope_theta);
        let ids = ids_tensor(&[vec![1, 5, 9, 200, 3]]);
        assert_eq!(
            to_vec(model.forward(ids.clone(), None, None)),
            to_vec(again.forward(ids, None, None))
        );
    }
    let src = fixtures().join("rm_init");
    let (cfg, rm) = load_reward_model(&src, &device()).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_reward_model(&rm, &cfg, out.path()).unwrap();
    assert_eq!(
        all_tensors(&out.path().join("model.safetensors")),
        all_tensors(&src.join("model.safetensors"))
    );
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(saved["rope_parameters"]["rope_theta"], 10000.0);
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tokenizer")).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_saves_and_reloads() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    let again = Tokenizer::from_dir(dir.path()).unwrap();
    let text = "Question: What color is the sky?<|eos|>";
    assert_eq!(
        tok.encode_prompt(text).unwrap(),
        again.encode_prompt(text).unwrap()
    );
    assert_eq!(again.eos_token.as_deref(), Some("<|eos|>"));
    assert_eq!(again.pad_id(), Some(0));
}

#[test]
fn tokenisation_matches_trl() {
    let tok = tokenizer();
    assert_eq!(
        (tok.pad_id(), tok.bos_id(), tok.eos_id()),
        (Some(0), Some(1), Some(2))
    );
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("dpo_golden.json")).unwrap())
            .unwrap();
    let examples = golden["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 16);
    for ex in examples {
        let prompt = ex["prompt"].as_str().unwrap();
        for side in ["chosen", "rejected"] {
            let completion = ex[side].as_str().unwrap();
            let split = tok.split_prompt_completion(prompt, completion).unwrap();
            assert!(split.prefix_matched);
            assert_eq!(split.prompt_ids, ids_of(&ex["prompt_ids"]));
            assert_eq!(split.completion_ids, ids_of(&ex[format!("{side}_ids")]));
            // DESIGN's convention gives the same tokens on this data.
            assert_eq!(tok.encode_prompt(prompt).unwrap(), split.prompt_ids);
            assert_eq!(
                tok.encode_completion(completion).unwrap(),
                split.completion_ids
            );
        }
    }
}

fn greedy_golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("greedy.json")).unwrap()).unwrap()
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_cache() {
    let golden = greedy_golden();
    let tok = tokenizer();
    for name in ["policy", "policy_tied"] {
        let (_, model) = load_causal_lm(&fixtures().join(name), &device()).unwrap();
        let rows = golden["models"][name].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| tok.encode_prompt(r["prompt"].as_str().unwrap()).unwrap())
            .collect();
        for (p, r) in prompts.iter().zip(rows) {
            assert_eq!(p, &ids_of(&r["prompt_ids"]));
        }
        let expected: Vec<Vec<u32>> = rows.iter().map(|r| ids_of(&r["new_ids"])).collect();
        for use_cache in [true, false] {
            // Batched (left-padded: the prompts differ in length) and one at a time.
            for batch_size in [3, 1] {
                let opts = GenerateOptions {
                    max_new_tokens: 16,
                    temperature: 0.0,
                    batch_size,
                    use_cache,
                    ..Default::default()
                };
                let out = generate_ids(&model, &prompts, &[2], 0, &opts).unwrap();
                let got: Vec<Vec<u32>> = out.iter().map(|g| g.ids.clone()).collect();
                assert_eq!(
                    got, expected,
                    "{name}, cache {use_cache}, batch {batch_size}"
                );
            }
        }
    }
}

#[test]
fn generate_entry_point_reads_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixtures().join("policy").join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    let golden = greedy_golden();
    let rows = golden["models"]["policy"].as_array().unwrap();
    let prompts: Vec<rudder_stages::data::Turns> = rows
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().into())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let out = generate(dir.path(), &prompts, &opts, Backend::Cpu).unwrap();
    for (c, r) in out.iter().zip(rows) {
        assert_eq!(c.completion_ids, ids_of(&r["new_ids"]));
        assert_eq!(c.completion, r["text"].as_str().unwrap());
        assert_eq!(c.finish_reason, FinishReason::Length);
    }
    let json = serde_json::to_value(&out[0]).unwrap();
    assert_eq!(json["finish_reason"], "length");

    // Sampling is reproducible for a seed and changes with it.
    let sample = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed,
            ..Default::default()
        };
        generate(dir.path(), &prompts, &opts, Backend::Cpu)
            .unwrap()
            .into_iter()
            .map(|c| c.completion_ids)
            .collect::<Vec<_>>()
    };
    assert_eq!(sample(11), sample(11));
    assert_ne!(sample(11), sample(12));
}

#[test]
fn reward_head_reads_the_last_real_token() {
    let (_, rm) = load_reward_model(&fixtures().join("rm_init"), &device()).unwrap();
    let tok = tokenizer();
    let a = tok.encode_prompt("The sky is blue.").unwrap();
    let b = tok
        .encode_prompt("Once upon a time there was a fox.")
        .unwrap();
    let longest = a.len().max(b.len());
    let pad = |r: &[u32]| {
        let mut v: Vec<i64> = r.iter().map(|&t| t as i64).collect();
        v.resize(longest, 0);
        v
    };
    let mask = |r: &[u32]| {
        let mut m = vec![1u8; r.len()];
        m.resize(longest, 0);
        m
    };
    let rewards = to_vec(rm.forward(ids_tensor(&[pad(&a), pad(&b)]), Some(&[mask(&a), mask(&b)])));
    assert!(rewards.iter().all(|r| r.is_finite()));
    // Each equals the value at the sequence's last token when run alone.
    for (r, ids) in rewards.iter().zip([&a, &b]) {
        let alone = ids_tensor(&[ids.iter().map(|&t| t as i64).collect()]);
        let values = to_vec(rm.values(alone, None));
        assert!(
            (r - values[ids.len() - 1]).abs() < 1e-5,
            "{r} vs {values:?}"
        );
    }
}

#[test]
fn reward_model_from_a_causal_lm_gets_a_seeded_head() {
    let dir = fixtures().join("policy");
    let (cfg, a) = rudder_stages::model::reward_model_from_causal_lm(&dir, 5, &device()).unwrap();
    let (_, b) = rudder_stages::model::reward_model_from_causal_lm(&dir, 5, &device()).unwrap();
    let (_, c) = rudder_stages::model::reward_model_from_causal_lm(&dir, 6, &device()).unwrap();
    assert!(cfg.architecture.is_sequence_classifier());
    let head = |m: &rudder_stages::model::RewardModel| to_vec(m.score.weight.val());
    assert_eq!(head(&a), head(&b));
    assert_ne!(head(&a), head(&c));
    // The backbone is the policy's: same final hidden states.
    let (_, policy) = load_causal_lm(&dir, &device()).unwrap();
    let ids = ids_tensor(&[vec![1, 7, 42, 300]]);
    assert_eq!(
        to_vec(policy.model.forward(ids.clone(), None, None)),
        to_vec(a.model.forward(ids.clone(), None, None))
    );
    assert!(to_vec(a.forward(ids, None))[0].is_finite());
}

fn copy_dir(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

#[test]
fn bad_model_directories_give_clear_errors() {
    // Unsupported architecture, named.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("policy"), dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_causal_lm(dir.path(), &device()).unwrap_err();
    assert!(matches!(err, StageError::UnsupportedArchitecture { .. }));
    assert!(err.to_string().contains("GPT2LMHeadModel"));

    // A missing tensor is named: an untied config over the tied checkpoint lacks lm_head.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("policy_tied"), dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = Value::Bool(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_causal_lm(dir.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("lm_head.weight"), "{err}");

    // A shape mismatch names the tensor and both shapes.
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("policy/config.json")).unwrap(),
    )
    .unwrap();
    cfg["intermediate_size"] = serde_json::json!(100);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("policy/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = load_causal_lm(dir.path(), &device()).unwrap_err();
    match &err {
        StageError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[100, 64][..], &[176, 64][..])
            );
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }

    // No weights at all; a missing directory.
    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("policy/config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    assert!(matches!(
        load_causal_lm(empty.path(), &device()).unwrap_err(),
        StageError::MissingWeights { .. }
    ));
    assert!(matches!(
        load_causal_lm(Path::new("/nonexistent/model"), &device()).unwrap_err(),
        StageError::Io { .. }
    ));
}

/// Greedy decoding of `steps` tokens by hand (EOS does not stop it), the prompts left-padded to
/// `width` and the cache grown in buckets of `bucket`: the tokens and every step's last logits.
fn greedy_with_bucket(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    width: usize,
    bucket: usize,
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<f32>) {
    use rudder_stages::model::KvCache;
    let device = device();
    let batch = prompts.len();
    let mut ids = Vec::new();
    let mut padding = Vec::new();
    for p in prompts {
        ids.extend(std::iter::repeat_n(0i64, width - p.len()));
        ids.extend(p.iter().map(|&t| i64::from(t)));
        let mut mask = vec![0u8; width - p.len()];
        mask.resize(width, 1);
        padding.push(mask);
    }
    let mut cache = KvCache::with_bucket(model.model.layers.len(), bucket);
    let mut input = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, width]), &device);
    let mut tokens = vec![Vec::new(); batch];
    let mut all_logits = Vec::new();
    for _ in 0..steps {
        let [_, seq] = input.dims();
        let hidden = model.model.forward(input, Some(&padding), Some(&mut cache));
        let d = hidden.dims()[2];
        let logits = model.head(hidden.slice([0..batch, seq - 1..seq, 0..d]));
        let values: Vec<f32> = logits.into_data().try_to_vec().unwrap();
        let vocab = values.len() / batch;
        let next: Vec<u32> = values
            .chunks(vocab)
            .map(|row| {
                let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter().position(|&x| x == best).unwrap() as u32
            })
            .collect();
        all_logits.extend(values);
        for (row, &t) in tokens.iter_mut().zip(&next) {
            row.push(t);
        }
        let flat: Vec<i64> = next.iter().map(|&t| i64::from(t)).collect();
        input = Tensor::from_data(TensorData::new(flat, [batch, 1]), &device);
        padding = vec![vec![1u8]; batch];
    }
    (tokens, all_logits)
}

#[test]
fn a_cache_grown_in_buckets_of_64_decodes_as_one_grown_token_by_token() {
    let golden = greedy_golden();
    let tok = tokenizer();
    use rudder_schema::Precision;
    let cases = ["policy", "policy_tied"]
        .into_iter()
        .flat_map(|name| [(name, Precision::Fp32), (name, Precision::Bf16)]);
    for (name, precision) in cases {
        let (_, model) = rudder_stages::precision::scoped(precision, || {
            load_causal_lm(&fixtures().join(name), &device()).unwrap()
        });
        let prompts: Vec<Vec<u32>> = golden["models"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| tok.encode_prompt(r["prompt"].as_str().unwrap()).unwrap())
            .collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        // 80 new tokens after a 64-wide prompt batch cross two bucket boundaries (64, 128).
        let (exact_tokens, exact_logits) = greedy_with_bucket(&model, &prompts, longest, 1, 80);
        let (tokens, logits) = greedy_with_bucket(&model, &prompts, 64, 64, 80);
        let name = format!("{name} in {}", precision.as_str());
        assert_eq!(tokens, exact_tokens, "{name}: greedy tokens");
        let diff = exact_logits
            .iter()
            .zip(&logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name}: bucketed cache logits differ by {diff:.1e}");
        assert!(diff < 1e-6, "{name}: logits differ by {diff:e}");
    }
}
