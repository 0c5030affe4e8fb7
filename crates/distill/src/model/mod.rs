//! Models: a trainable Llama-family decoder with Hugging Face tensor names.

pub mod gguf;
pub mod llama;

pub use llama::{KvCache, Llama, ModelConfig};
