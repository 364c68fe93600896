//! Resumable training state: the model's parameters, the AdamW moments and step count, and the
//! records of the steps taken, saved into a stage's work directory so that an interrupted run
//! continues where it stopped and ends with exactly the parameters and `metrics.jsonl` of an
//! uninterrupted one. The data order needs no saving: the loop's plan is a function of the
//! seed. A checkpoint is written to a temporary directory and renamed into place, so a crash
//! while saving leaves the previous checkpoint intact.
//!
//! ```text
//! DIR/model.bpk           parameters (a Burn record in the burnpack format)
//! DIR/optimizer.safetensors   "<i>.exp_avg", "<i>.exp_avg_sq" by parameter visiting order
//! DIR/state.json          format, examples, total_steps, optimizer_step, steps (records)
//! ```

use burn::module::Module;
use std::collections::HashMap;
use std::path::PathBuf;

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::tensor::Device;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, Moments};
use super::{StepRecord, TrainError};

// 3: linear layers are `LoraLinear`s, so their weights are recorded under `base.`.
const FORMAT: u32 = 3;
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const MODEL_FILE: &str = "model.bpk";

/// Where checkpoints go and how often (in optimiser steps; 0 saves only when interrupted).
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpointing {
    pub dir: PathBuf,
    pub every: u64,
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    examples: usize,
    total_steps: u64,
    optimizer_step: u64,
    steps: Vec<StepRecord>,
}

/// What a checkpoint restores besides the model.
pub struct Resumed {
    pub optimizer_step: u64,
    pub moments: HashMap<ParamId, Moments>,
    pub steps: Vec<StepRecord>,
}

impl Checkpointing {
    fn err(&self, message: impl ToString) -> TrainError {
        TrainError::Checkpoint {
            path: self.dir.clone(),
            message: message.to_string(),
        }
    }

    /// Saves the state after `steps.len()` updates.
    pub fn save<M: Module>(
        &self,
        model: &M,
        optim: &AdamW,
        steps: &[StepRecord],
        examples: usize,
        total_steps: u64,
    ) -> Result<(), TrainError> {
        self.save_with::<M>(model, optim, steps, examples, total_steps, |_| Ok(()))
    }

    /// Like [`Checkpointing::save`], with `extra` writing more state (an objective's own) into the
    /// checkpoint directory before it is renamed into place.
    pub fn save_with<M: Module>(
        &self,
        model: &M,
        optim: &AdamW,
        steps: &[StepRecord],
        examples: usize,
        total_steps: u64,
        extra: impl FnOnce(&std::path::Path) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let tmp = self.dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        model
            .clone()
            .save_file(tmp.join(MODEL_FILE))
            .map_err(|e| self.err(e))?;

        let mut tensors: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (i, id) in param_ids::<M>(model).iter().enumerate() {
            if let Some(m) = optim.moments.get(id) {
                for (name, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
                    let values: Vec<f32> = t
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_to_vec::<f32>()
                        .map_err(|e| self.err(format!("{e:?}")))?;
                    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    tensors.push((format!("{i}.{name}"), bytes, values.len()));
                }
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes, len)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![*len],
                    bytes,
                )
                .expect("the byte length matches the shape");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &tmp.join(OPTIMIZER_FILE))
            .map_err(|e| self.err(e))?;

        let state = State {
            format: FORMAT,
            examples,
            total_steps,
            optimizer_step: optim.step,
            steps: steps.to_vec(),
        };
        let text = serde_json::to_string(&state).expect("the state serialises");
        let path = tmp.join(STATE_FILE);
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        extra(&tmp)?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        }
        std::fs::rename(&tmp, &self.dir).map_err(|e| TrainError::io(&self.dir, e))
    }

    /// Loads a checkpoint into `model` when one exists; returns the model unchanged otherwise.
    /// A checkpoint of another run (other data size or length) is an error, not silently used.
    #[allow(clippy::type_complexity)]
    pub fn load<M: Module>(
        &self,
        model: M,
        examples: usize,
        total_steps: u64,
        device: &Device,
    ) -> Result<(M, Option<Resumed>), TrainError> {
        let state_path = self.dir.join(STATE_FILE);
        if !state_path.is_file() {
            return Ok((model, None));
        }
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: State = serde_json::from_str(&text).map_err(|e| self.err(e))?;
        if state.format != FORMAT || state.examples != examples || state.total_steps != total_steps
        {
            return Err(self.err(format!(
                "written for another run ({} examples, {} steps; this run has {examples}, {total_steps}); delete it to start over",
                state.examples, state.total_steps
            )));
        }
        let model = model
            .try_load_file(self.dir.join(MODEL_FILE))
            .map_err(|e| self.err(e))?;
        let opt_path = self.dir.join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&opt_path).map_err(|e| TrainError::io(&opt_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| self.err(e))?;
        let mut moments = HashMap::new();
        for (i, id) in param_ids::<M>(&model).iter().enumerate() {
            let read = |name: &str| -> Result<Option<Tensor<1>>, TrainError> {
                let Ok(view) = st.tensor(&format!("{i}.{name}")) else {
                    return Ok(None);
                };
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                let len = values.len();
                Ok(Some(Tensor::from_data(
                    TensorData::new(values, [len]),
                    device,
                )))
            };
            if let (Some(m), Some(v)) = (read("exp_avg")?, read("exp_avg_sq")?) {
                moments.insert(
                    *id,
                    Moments {
                        exp_avg: m,
                        exp_avg_sq: v,
                    },
                );
            }
        }
        Ok((
            model,
            Some(Resumed {
                optimizer_step: state.optimizer_step,
                moments,
                steps: state.steps,
            }),
        ))
    }
}

/// The parameters' ids in visiting order, which is stable across saving and loading.
fn param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}
