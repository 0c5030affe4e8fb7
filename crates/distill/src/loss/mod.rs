//! Training losses. `reference` holds plain candle compositions; fused kernels
//! with analytic backward sit beside them and are checked against them:
//! `policy` (the policy-gradient loss of the on-policy and RL stages, on candle's graph),
//! `full` (the full teacher distribution; its ops in `ops`, its row kernels in `rows`),
//! `topk` (the teacher's top k plus a tail), `head` (from hidden states, never
//! materialising the logits) and `cuda` (the same kernels on the GPU).
//!
//! Every loss takes the same two things: a `LossSpec` (what to compute) and, when it
//! distils, a `Teacher` (what the teacher says about the rows).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod family;
pub mod full;
pub mod head;
pub mod ops;
pub mod policy;
pub mod reference;
pub mod rows;
pub mod topk;

use candle_core::Tensor;

use crate::config::DistillConfig;

pub use family::{divergence_rows_reference, top_k_divergence_rows_reference, Divergence};
pub use full::{cross_entropy_rows, distill_loss_fused, distill_loss_with, divergence_rows};
pub use reference::{distill_loss, LossParts};
pub use topk::{top_k_divergence_rows, top_k_of_logits, TopK};

/// The loss `ce_weight * CE(labels) + (1 - ce_weight) * T^2 * D(p_teacher,T, q_student,T)`,
/// divided by the step's valid tokens. Without a teacher it is the cross-entropy alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSpec {
    /// Weight of the hard-label cross-entropy; `1 - ce_weight` weighs the distillation term.
    pub ce_weight: f64,
    /// Softmax temperature T of the distillation term (scaled by T^2, Hinton et al. 2015).
    pub temperature: f64,
    /// The divergence D of the distillation term.
    pub divergence: Divergence,
}

impl LossSpec {
    pub fn new(ce_weight: f64, temperature: f64, divergence: Divergence) -> Self {
        Self {
            ce_weight,
            temperature,
            divergence,
        }
    }

    /// Forward KL, the divergence of Hinton et al. 2015 and of `reference::distill_loss`.
    pub fn forward_kl(ce_weight: f64, temperature: f64) -> Self {
        Self::new(ce_weight, temperature, Divergence::ForwardKl)
    }

    /// Cross-entropy alone, as a stage without a teacher trains.
    pub const CE_ONLY: Self = Self {
        ce_weight: 1.0,
        temperature: 1.0,
        divergence: Divergence::ForwardKl,
    };

    /// The loss `[distill]` describes.
    pub fn of(d: &DistillConfig) -> Self {
        Self::new(d.ce_weight, d.temperature, Divergence::of(d))
    }
}

/// What the teacher says about the rows a loss scores: `Option<Teacher>`, None when a
/// stage trains without one.
#[derive(Clone, Copy, Debug)]
pub enum Teacher<'a> {
    /// Full logits (N, V) (or any shape with N * V elements and V last), tempered inside
    /// the loss.
    Logits(&'a Tensor),
    /// The teacher's final hidden states (N, Ht) and its head weight (V, Ht): its logits
    /// are computed chunk by chunk, like the student's (the fused head, `head`, and the
    /// one-pass step only). Ht may differ from the student's.
    Hidden { hidden: &'a Tensor, weight: &'a Tensor },
    /// The top k tokens per row with their tempered log-probabilities (`topk`): from the
    /// online teacher or the offline logit cache.
    TopK(&'a TopK),
}
