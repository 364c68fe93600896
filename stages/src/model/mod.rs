//! The Llama model family: configuration, layers, the decoder with its two heads, the KV cache,
//! and Hugging Face directory I/O. Training losses and stage logic live elsewhere.

pub mod attention;
pub mod cache;
pub mod config;
pub mod head;
#[cfg(feature = "flex")]
pub mod hf;
#[cfg(feature = "flex")]
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod mask;
pub mod mlp;
pub mod rms_norm;
pub mod rope;

pub use cache::KvCache;
pub use config::{Architecture, ModelConfig, WeightDtype};
pub use hf::{
    load_causal_lm, load_config, load_reward_model, random_causal_lm, random_reward_model,
    reward_model_from_causal_lm, save_causal_lm, save_reward_model,
};
pub use llama::{CausalLm, DecoderLayer, Llama, RewardModel};
