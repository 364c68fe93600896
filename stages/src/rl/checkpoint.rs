//! Resumable state of an online-RL stage: the policy (and value model) with their optimisers,
//! the step records, and what the loop itself carries (the adaptive KL coefficient, the saved
//! rollouts), written together so that they always belong to the same iteration.

use burn::module::Module;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::train::adamw::AdamW;
use crate::train::{Checkpointing, StepRecord, TrainError};

/// What an RL checkpoint restores besides the models and optimisers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RlState {
    /// The (possibly adapted) KL coefficient for the next iteration.
    pub kl_coef: f64,
    /// `rollouts.jsonl` lines so far.
    pub rollouts: Vec<String>,
}

const RL_STATE_FILE: &str = "rl_state.json";

/// Resumable state of an RL stage under `DIR`: `policy/` and `value/` (the training loop's
/// checkpoint format: parameters, AdamW state, step records) and `rl_state.json`. The three are
/// written into `DIR.partial` and renamed together, so they always belong to the same iteration.
pub struct RlCheckpoint {
    pub dir: PathBuf,
    pub every: u64,
}

/// A restored module and its optimiser.
pub struct Restored<M> {
    pub model: M,
    pub optim: AdamW,
    pub steps: Vec<StepRecord>,
}

impl RlCheckpoint {
    pub fn new(work_dir: &Path, every: u64) -> Self {
        let dir = work_dir.join("checkpoint");
        // A run killed between the two renames of `save` left the previous checkpoint here.
        let old = dir.with_extension("old");
        if !dir.exists() && old.is_dir() {
            let _ = std::fs::rename(&old, &dir);
        }
        Self { dir, every }
    }

    fn part(dir: &Path, name: &str) -> Checkpointing {
        Checkpointing {
            dir: dir.join(name),
            every: 0,
        }
    }

    /// Saves after `steps.len()` iterations.
    #[allow(clippy::too_many_arguments)]
    pub fn save<P: Module, V: Module>(
        &self,
        policy: (&P, &AdamW),
        value: Option<(&V, &AdamW)>,
        steps: &[StepRecord],
        prompts: usize,
        total: u64,
        state: &RlState,
    ) -> Result<(), TrainError> {
        let tmp = self.dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        Self::part(&tmp, "policy").save::<P>(policy.0, policy.1, steps, prompts, total)?;
        if let Some((model, optim)) = value {
            Self::part(&tmp, "value").save::<V>(model, optim, steps, prompts, total)?;
        }
        let path = tmp.join(RL_STATE_FILE);
        let text = serde_json::to_string(state).expect("the state serialises");
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        // The previous checkpoint stays until the new one is in place: a kill between the two
        // renames leaves `.old`, which `state` and `load` fall back to.
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.dir.exists() {
            std::fs::rename(&self.dir, &old).map_err(|e| TrainError::io(&self.dir, e))?;
        }
        std::fs::rename(&tmp, &self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The saved state, when a checkpoint exists.
    pub fn state(&self) -> Result<Option<RlState>, TrainError> {
        let path = self.dir.join(RL_STATE_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Checkpoint {
                path,
                message: e.to_string(),
            })
    }

    /// Restores one module (`policy` or `value`) and its optimiser; the module is returned
    /// unchanged with a fresh optimiser when there is no checkpoint.
    pub fn load<M: Module>(
        &self,
        name: &str,
        model: M,
        optim: AdamW,
        prompts: usize,
        total: u64,
        device: &Device,
    ) -> Result<Restored<M>, TrainError> {
        if !self.dir.join(RL_STATE_FILE).is_file() {
            return Ok(Restored {
                model,
                optim,
                steps: Vec::new(),
            });
        }
        let (model, resumed) =
            Self::part(&self.dir, name).load::<M>(model, prompts, total, device)?;
        let resumed = resumed.ok_or_else(|| TrainError::Checkpoint {
            path: self.dir.join(name),
            message: "missing; delete the checkpoint to start over".into(),
        })?;
        Ok(Restored {
            model,
            optim: AdamW {
                config: optim.config,
                step: resumed.optimizer_step,
                moments: resumed.moments,
            },
            steps: resumed.steps,
        })
    }
}
