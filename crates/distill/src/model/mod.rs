//! The model: a trainable Llama-family decoder with Hugging Face tensor names
//! (`llama`), its hand-written training backward (`tape`), GGUF import (`gguf`) and
//! sampling with a KV cache (`generate`).

pub mod generate;
pub mod gguf;
pub mod llama;
pub mod tape;

pub use llama::{KvCache, Llama, ModelConfig};
