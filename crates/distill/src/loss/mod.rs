//! Training losses. `reference` holds plain candle compositions; fused kernels
//! with analytic backward sit beside them and are checked against them.

pub mod reference;

pub use reference::{distill_loss, LossParts};
