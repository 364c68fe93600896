//! The model layer of rudder: the Llama-family decoder on Burn, Hugging Face model directories,
//! tokenizers and chat templates, generation, and the choice of compute backend. Stage kinds (SFT,
//! DPO, ...) build on these; the engine above knows nothing of Burn.

pub mod backend;
pub mod constitutional;
pub mod cpo;
pub mod data;
pub mod dpo;
pub mod error;
pub mod evaluate;
pub mod export_stage;
pub mod generate;
pub mod generate_stage;
pub mod iterative_dpo;
pub mod judge;
pub mod kto;
pub mod logps;
pub mod model;
pub mod ppo;
pub mod preference;
pub mod preference_data;
pub mod pretrain;
pub mod ref_logps;
pub mod reward;
pub mod rl;
pub mod runner;
pub mod sft;
pub mod tokenizer;
pub mod tokenizer_stage;
pub mod train;

pub use backend::BackendKind;
pub use error::StageError;
pub use generate::{Completion, FinishReason, GenerateOptions, generate, generate_with_tokenizer};
pub use runner::register;
pub use tokenizer::Tokenizer;

/// The CPU backend that unit and integration tests run on.
#[doc(hidden)]
#[cfg(any(feature = "flex", feature = "ndarray"))]
pub type TestBackend = backend::CpuBackend;
