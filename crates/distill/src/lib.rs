//! `distill`: teacher -> student knowledge distillation on candle, with a cost ledger.
//!
//! A run (`run::run`) is an ordered list of stages, each recorded in the cost ledger:
//!
//! 1. **prepare** (`prepare`): the data, the tokenizer, the teacher to load;
//! 2. **teacher** (`train`): the teacher trained, or loaded from a checkpoint;
//! 3. **prune** (`teacher::prune`, optional): a student cut from the teacher;
//! 4. **traces** (`teacher::traces`, the R1 recipe): the teacher's verified solutions;
//! 5. **teacher-logits** (`teacher::logit_cache`, optional): its top-k logits, cached;
//! 6. **students** (`train`, with `loss`): each student and the baselines;
//! 7. **eval** (`evaluate`): held-out loss and accuracy of every model;
//! 8. the **report** (`evaluate::report`), with each stage's cost (`cost`).
//!
//! Below the stages: the model (`model`), the losses (`loss`), the CPU kernels
//! (`kernels`), and the leaves `config`, `error`, `fsio` and `progress`, which import
//! nothing else of the crate.

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
