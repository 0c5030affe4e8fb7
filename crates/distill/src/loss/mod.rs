//! Training losses. `reference` holds plain candle compositions; fused kernels
//! with analytic backward sit beside them and are checked against them.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod family;
pub mod fused;
pub mod fused_head;
pub mod reference;
pub mod topk;

pub use family::{divergence_rows_reference, top_k_divergence_rows_reference, Divergence};
pub use fused::{cross_entropy_rows, distill_loss_fused, distill_loss_with, divergence_rows, TeacherTargets};
pub use reference::{distill_loss, LossParts};
pub use topk::{top_k_divergence_rows, top_k_of_logits, TopK};
