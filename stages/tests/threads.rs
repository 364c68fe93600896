//! A stage's result does not depend on how many threads it runs on: training on the `cpu`
//! backend inside rayon pools of 1, 2 and 3 threads (what `rudder run -j` gives a stage) gives
//! the same bits, for SFT (causal attention) and DPO (padded rows).

use burn::tensor::{Int, Tensor, TensorData};
use rudder_stages::logps::PromptCompletion;
use rudder_stages::losses::DpoLossConfig;
use rudder_stages::model::{CausalLm, ModelConfig, random_causal_lm};
use rudder_stages::padding::Pad;
use rudder_stages::preference::{DpoExample, DpoObjective, TokenizedPair};
use rudder_stages::train::{Hooks, StepRecord, TrainConfig, train};
use rudder_stages::train::{SftObjective, SftSequence};

struct Losses(Vec<f64>);

impl Hooks for Losses {
    fn on_step(&mut self, record: &StepRecord, _: u64) {
        self.0.push(record.loss);
        self.0.push(record.grad_norm);
    }
}

fn config() -> ModelConfig {
    // 6 query heads over 2 KV heads: the grouped-query path.
    ModelConfig::llama(97, 24, 40, 2, 6, 2)
}

fn ids(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1 + (i * 31 + seed * 17) % 96)
        .collect()
}

/// Logits of the trained model on a fixed input, and the per-step losses and norms.
fn fingerprint(model: &CausalLm, losses: Vec<f64>) -> (Vec<f32>, Vec<f64>) {
    let device = model.device();
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids(9, 11).into_iter().map(i64::from).collect(), [1, 11]),
        &device,
    );
    let logits = model.forward(input, None, None);
    (logits.into_data().try_to_vec::<f32>().unwrap(), losses)
}

fn train_sft() -> (Vec<f32>, Vec<f64>) {
    let device = rudder_stages::test_device().autodiff();
    let examples: Vec<SftSequence> = (0..4)
        .map(|r| {
            let n = 9 + 3 * r;
            SftSequence {
                input_ids: ids(r as u32, n),
                target: vec![true; n],
                segments: None,
            }
        })
        .collect();
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        batch_size: 4,
        max_steps: Some(3),
        ..TrainConfig::default()
    };
    let mut hooks = Losses(Vec::new());
    let model = random_causal_lm(&config(), 0, &device);
    let (model, _) = train(
        &SftObjective { pad: Pad::exact(0) },
        model,
        &examples,
        &cfg,
        &device,
        None,
        &mut hooks,
    )
    .unwrap();
    fingerprint(&model, hooks.0)
}

fn train_dpo() -> (Vec<f32>, Vec<f64>) {
    let device = rudder_stages::test_device().autodiff();
    let examples: Vec<DpoExample> = (0..4)
        .map(|r| {
            let prompt = ids(r, 4 + r as usize);
            let side = |s: u32, n: usize| PromptCompletion {
                prompt: prompt.clone(),
                completion: ids(s, n),
            };
            let (chosen, rejected) = (side(r + 10, 5), side(r + 20, 3 + r as usize));
            DpoExample {
                reference_chosen: vec![-4.0; chosen.completion.len()],
                reference_rejected: vec![-4.5; rejected.completion.len()],
                pair: TokenizedPair {
                    row: r as usize,
                    chosen,
                    rejected,
                },
            }
        })
        .collect();
    let objective = DpoObjective {
        pad: Pad::exact(0),
        loss: DpoLossConfig::single(rudder_schema::kinds::DpoLossType::Sigmoid, 0.1),
        ld_alpha: None,
        use_weighting: false,
    };
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        batch_size: 4,
        max_steps: Some(3),
        ..TrainConfig::default()
    };
    let mut hooks = Losses(Vec::new());
    let model = random_causal_lm(&config(), 0, &device);
    let (model, _) = train(
        &objective, model, &examples, &cfg, &device, None, &mut hooks,
    )
    .unwrap();
    fingerprint(&model, hooks.0)
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn training_gives_the_same_bits_on_any_number_of_threads() {
    for run in [train_sft, train_dpo] {
        let one = in_pool(1, run);
        let two = in_pool(2, run);
        let three = in_pool(3, run);
        assert!(one.1.iter().all(|x| x.is_finite()));
        assert_eq!(one, two);
        assert_eq!(one, three);
        // And a rerun on the same pool size.
        assert_eq!(one, in_pool(2, run));
    }
}
