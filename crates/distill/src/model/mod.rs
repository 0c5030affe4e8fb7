//! The model: a trainable Llama-family decoder with Hugging Face tensor names
//! (`llama`), its Hugging Face config files read as hostile input (`hf_json`), its
//! hand-written training backward (`tape`), GGUF import (`gguf`) and sampling with a
//! KV cache (`generate`).

pub mod generate;
pub mod gguf;
pub mod hf_json;
pub mod llama;
pub mod tape;

pub use llama::{KvCache, Llama, ModelConfig};
