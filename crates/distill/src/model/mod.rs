//! Models: a trainable Llama-family decoder with Hugging Face tensor names.

pub mod attention;
pub mod fused;
pub mod gguf;
pub mod llama;
pub mod tape;

pub use llama::{KvCache, Llama, ModelConfig};
