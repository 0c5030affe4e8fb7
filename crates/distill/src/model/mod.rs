//! The model: a trainable Llama-family decoder with Hugging Face tensor names
//! (`llama`), its Hugging Face config files read as hostile input (`hf_json`), its
//! hand-written training backward (`tape`), GGUF import (`gguf`), quantized matmul
//! weights for a model that only runs forward (`quant`) and the rollout
//! engine: sampling (`generate`) with continuous batching (`engine`) over a slotted KV
//! cache (`slots`).

mod engine;
pub mod generate;
pub mod gguf;
pub mod hf_json;
pub mod llama;
pub(crate) mod quant;
pub mod slots;
pub mod tape;

pub use llama::{Llama, ModelConfig};
