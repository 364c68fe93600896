//! Generation (`generate`): `num_samples` completions for every prompt of a dataset, written as
//! `completions.jsonl`, a dataset that later stages read (`prompt`, `completion`, `sample`,
//! `finish_reason`, and `row`, the 0-based position of the prompt's row in the source data).

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::GenerateParams;
use serde_json::json;

use crate::artifacts::write_jsonl;
use crate::kind::{Stage, StageKind};
use crate::sampling::{Sampler, generate_options, length_stats};
use crate::train::TrainError;

/// The dataset a `generate` stage writes.
pub const COMPLETIONS_FILE: &str = "completions.jsonl";

pub struct Generate;

impl StageKind for Generate {
    type Params = GenerateParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, GenerateParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let model = stage.inputs.model("model")?;
        let prompts = stage.inputs.rows("data")?.prompts()?;
        let opts = generate_options(&p.sampling, p.batch_size, stage.seed());
        stage.progress().set_length(prompts.len() as u64);
        let sampler = Sampler::load(&model, &device.clone().inner())?;
        let interrupted = || stage.is_interrupted();
        let generated = sampler.samples(
            &prompts,
            p.num_samples as usize,
            &opts,
            stage.progress(),
            &interrupted,
            0,
        )?;
        let lines: Vec<_> = generated
            .iter()
            .map(|g| {
                // A conversational prompt stays a conversation, its answer an assistant turn.
                json!({
                    "prompt": prompts[g.row].to_json(),
                    "completion": prompts[g.row].answer(&g.completion.completion).to_json(),
                    "sample": g.sample,
                    "finish_reason": g.completion.finish_reason,
                    "row": g.row,
                })
            })
            .collect();
        write_jsonl(&stage.out_dir().join(COMPLETIONS_FILE), &lines)?;
        let (length, eos_fraction) = length_stats(&generated);
        let summary = [
            ("samples".to_string(), generated.len() as f64),
            ("length".to_string(), length),
            ("eos_fraction".to_string(), eos_fraction),
        ]
        .into_iter()
        .collect();
        Ok(StageOutcome { summary })
    }
}
