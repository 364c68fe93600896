//! Everything of rudder that runs on Burn: the Llama-family model and Hugging Face model
//! directories, tokenizers and chat templates, generation, datasets, the training loops, the
//! losses, and one module per stage kind (`kinds`), plugged into the engine through the typed
//! kind interface (`kind`). The engine above knows nothing of Burn.
//!
//! ```text
//!   kinds/*            one module per kind (and its parts)
//!     |  uses
//!   inputs sampling preference rl train losses artifacts seeds   shared machinery
//!     |  uses
//!   model generate logps padding tokenizer data judge backend    the model layer
//!   precision
//! ```

pub mod artifacts;
pub mod backend;
pub mod bench;
pub mod data;
pub mod error;
pub mod generate;
pub mod inputs;
pub mod judge;
pub mod kind;
pub mod kinds;
pub mod logps;
pub mod losses;
pub mod model;
pub mod padding;
pub mod precision;
pub mod preference;
pub mod rl;
pub mod sampling;
pub mod seeds;
pub mod tokenizer;
pub mod train;

pub use error::StageError;
pub use generate::{Completion, FinishReason, GenerateOptions, generate, generate_with_tokenizer};
pub use kinds::register;
pub use tokenizer::Tokenizer;

/// The CPU device that unit and integration tests run on.
#[doc(hidden)]
#[cfg(feature = "flex")]
pub fn test_device() -> burn::tensor::Device {
    backend::cpu()
}
