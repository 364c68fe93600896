//! What the offline preference kinds share: pairs (and unpaired rows) tokenised as TRL does,
//! the frozen reference's cached log-probs, and the objectives used by more than one kind (DPO
//! by `dpo` and `iterative_dpo`, the reference-free one by `orpo` and `simpo`). The loss math is
//! `losses`'; each kind's own steps are in its module under `kinds`.

pub mod dpo;
pub mod pairs;
pub mod reference;
pub mod reference_free;

pub use dpo::{DpoExample, DpoObjective, SyncedReferenceDpo, mix_parameters};
pub use pairs::{TokenizedPair, TokenizedPairs, UnpairedRow, tokenize_pairs, tokenize_unpaired};
pub use reference::{REF_LOGPS_FILE, RefLogps};
pub use reference_free::{ReferenceFreeLoss, ReferenceFreeObjective};
