//! Odds-ratio preference optimisation (`orpo`), as TRL 1.16's experimental ORPO trainer: the
//! NLL of the chosen sequences minus `beta` times the log-sigmoid of the log odds ratio of the
//! chosen and rejected completions' average log-probs. No reference model; the objective is
//! `preference::reference_free`'s.

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::OrpoParams;

use crate::kind::{Stage, StageKind};
use crate::preference::{ReferenceFreeLoss, reference_free};
use crate::train::TrainError;

pub struct Orpo;

impl StageKind for Orpo {
    type Params = OrpoParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, OrpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let loss = ReferenceFreeLoss::Orpo { beta: p.beta };
        reference_free::train::<_>(stage, loss, p.learning_rate, &p.tokens, &p.train, device)
    }
}
