//! SimPO and CPO (`simpo`), as TRL 1.16's experimental CPO trainer: a margin loss on the
//! policy's (average, for SimPO and IPO) log-probs of chosen and rejected completions, with
//! `loss_type` simpo, sigmoid, hinge or ipo and an optional NLL term (`cpo_alpha`). No
//! reference model; the objective is `preference::reference_free`'s.

use burn::tensor::Device;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::SimpoParams;

use crate::kind::{Stage, StageKind};
use crate::losses::CpoLossConfig;
use crate::preference::{ReferenceFreeLoss, reference_free};
use crate::train::TrainError;

pub struct Simpo;

impl StageKind for Simpo {
    type Params = SimpoParams;
    const VERSION: u32 = 4;

    fn run(stage: &Stage<'_, SimpoParams>, device: &Device) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let loss = ReferenceFreeLoss::Cpo(CpoLossConfig::from(p));
        reference_free::train::<_>(stage, loss, p.learning_rate, &p.tokens, &p.train, device)
    }
}
