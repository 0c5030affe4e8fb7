//! `distill`: teacher -> student knowledge distillation on candle, with a cost
//! ledger. The pipeline reads top to bottom in `pipeline.rs`:
//! data -> tokenizer -> model -> loss -> train -> checkpoint -> cost -> report.

pub mod charts;
pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod data;
pub mod device;
pub mod distributed;
pub mod error;
pub mod generate;
pub mod hub;
pub mod logit_cache;
pub mod loss;
pub mod model;
pub mod optim;
pub mod peak;
pub mod pipeline;
pub mod projection;
pub mod prune;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod traces;
pub mod train;

pub use config::Config;
pub use error::{Error, Result};

/// The tensor library, re-exported so that callers use the same version.
pub use candle_core as candle;

// Only here to switch on gemm's AVX-512 kernels (feature x86-v4) for candle.
use gemm as _;
