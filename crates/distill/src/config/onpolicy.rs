//! The sections of the two stages that train on the student's own samples: on-policy
//! distillation (`[onpolicy]`, GKD) and reinforcement learning with the verifier's
//! reward (`[rl]`, GRPO).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::TrainSpec;

/// On-policy distillation (GKD, Agarwal et al. 2024): a `student-onpolicy` stage that
/// starts from the trained `student` and learns from its own samples, graded token by
/// token by the teacher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicyConfig {
    /// Train the `student-onpolicy` stage. Default false.
    pub enabled: bool,
    /// Fraction of steps that train on the student's own samples; the others train on
    /// the student's training data (the traces) with the same loss. Default 1.
    pub lambda: f64,
    /// The generalized JSD(beta) between teacher and student: 0 is forward KL, 1 reverse
    /// KL. Default 1.
    pub beta: f64,
    /// "full": the divergence over the teacher's distribution (or its `top_k`);
    /// "sampled_token": the reverse KL of the sampled token as a per-token advantage,
    /// which needs only the teacher's log-probability of each sampled token.
    pub estimator: Estimator,
    /// The teacher's k most likely tokens per position for the full estimator (with a
    /// tail bucket); 0 takes its whole distribution. Default 0.
    pub top_k: usize,
    /// Sampling temperature of the student's rollouts. Default 1.
    pub temperature: f64,
    /// Most tokens per rollout. Default 96.
    pub max_new_tokens: usize,
    /// The problems whose prompts the student samples on: "student" (default: the
    /// students' training problems, the last `student.train_examples`, which the teacher
    /// wrote traces for), "train" (every training problem, the teacher's too: a prompt
    /// needs no trace or answer) or "file" (the prompts of `prompts_path`).
    pub prompts: PromptPool,
    /// A JSONL file of `{"prompt": ...}` lines for `prompts = "file"`; a relative path
    /// is relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts_path: Option<PathBuf>,
    /// Also train `student-sft-more`: the SFT student trained further on its traces for
    /// as many student FLOPs as `student-onpolicy` spent (sampling included), with the
    /// same optimiser settings: the control for "more compute" against "on-policy data".
    /// Default false.
    pub sft_control: bool,
    /// Steps, rollouts per micro-batch (`batch_size`) and optimiser settings.
    pub train: TrainSpec,
}

impl Default for OnPolicyConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lambda: 1.0,
            beta: 1.0,
            estimator: Estimator::Full,
            top_k: 0,
            temperature: 1.0,
            max_new_tokens: 96,
            prompts: PromptPool::Student,
            prompts_path: None,
            sft_control: false,
            train: TrainSpec::default(),
        }
    }
}

/// How the on-policy stage turns the teacher's judgement into a loss.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    #[default]
    Full,
    SampledToken,
}

/// The prompts of the on-policy stage's samples.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptPool {
    #[default]
    Student,
    Train,
    File,
}

/// Reinforcement learning with the verifier's reward (GRPO, Shao et al. 2024), the
/// algorithm of DeepSeek-R1-Zero: a `student-rl` stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// Train the `student-rl` stage. Default false.
    pub enabled: bool,
    /// The trained stage it starts from: "baseline" (default: what a user without a
    /// teacher has) or "student" (RL after SFT, the R1 order).
    pub start: RlStart,
    /// Samples per prompt (G); advantages are normalised within each group. Default 8.
    pub group: usize,
    /// Clip range of the probability ratio. Default 0.2.
    pub clip: f64,
    /// Weight of the KL penalty to the starting model; 0 runs no reference model. Default 0.
    pub kl: f64,
    /// Sampling temperature of the rollouts. Default 1.
    pub temperature: f64,
    /// Most tokens per rollout. Default 96.
    pub max_new_tokens: usize,
    /// Steps, rollouts per micro-batch (`batch_size`, a multiple of `group`) and optimiser settings.
    pub train: TrainSpec,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            start: RlStart::Baseline,
            group: 8,
            clip: 0.2,
            kl: 0.0,
            temperature: 1.0,
            max_new_tokens: 96,
            train: TrainSpec::default(),
        }
    }
}

/// Which trained student the RL stage starts from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RlStart {
    #[default]
    Baseline,
    Student,
}

impl RlStart {
    pub fn stage(self) -> &'static str {
        match self {
            RlStart::Baseline => "baseline",
            RlStart::Student => "student",
        }
    }
}
