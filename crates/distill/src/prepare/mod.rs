//! The prepare stage's parts: the data sets and batching (`data`), the tokenizer
//! (`tokenizer`) and teachers from the Hugging Face Hub cache (`hub`).

pub mod data;
pub mod hub;
pub mod tokenizer;
