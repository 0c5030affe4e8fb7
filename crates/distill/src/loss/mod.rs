//! Training losses. `reference` holds plain candle compositions; fused kernels
//! with analytic backward sit beside them and are checked against them:
//! `full` (the full teacher distribution; its ops in `ops`, its row kernels in `rows`),
//! `topk` (the teacher's top k plus a tail), `head` (from hidden states, never
//! materialising the logits) and `cuda` (the same kernels on the GPU).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod family;
pub mod full;
pub mod head;
pub mod ops;
pub mod reference;
pub mod rows;
pub mod topk;

pub use family::{divergence_rows_reference, top_k_divergence_rows_reference, Divergence};
pub use full::{cross_entropy_rows, distill_loss_fused, distill_loss_with, divergence_rows, TeacherTargets};
pub use reference::{distill_loss, LossParts};
pub use topk::{top_k_divergence_rows, top_k_of_logits, TopK};
