//! `distill`: teacher -> student knowledge distillation on candle, with a cost
//! ledger. The pipeline reads top to bottom in `pipeline.rs`:
//! data -> tokenizer -> model -> loss -> train -> checkpoint -> cost -> report.

pub mod config;
pub mod cost;
pub mod device;
pub mod distributed;
pub mod error;
pub mod evaluate;
pub mod fsio;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod prepare;
pub mod progress;
pub mod run;
pub mod teacher;
#[cfg(test)]
mod test_util;
pub mod train;

pub use config::Config;
pub use error::{Error, Result};

/// The tensor library, re-exported so that callers use the same version.
pub use candle_core as candle;

// Only here to switch on gemm's AVX-512 kernels (feature x86-v4) for candle.
use gemm as _;
