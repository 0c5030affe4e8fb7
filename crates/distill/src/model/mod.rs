//! Models: a trainable Llama-family decoder with Hugging Face tensor names.

pub mod llama;

pub use llama::{KvCache, Llama, ModelConfig};
