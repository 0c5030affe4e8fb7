//! What a running stage reports: optimiser steps, generation progress and messages.
//! The CLI draws them as bars; the run's heartbeat (`cost::heartbeat`) also bills and
//! logs them; tests stay silent. A leaf of the crate.

/// One logged optimiser step (a line of `metrics/<stage>.jsonl`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub ce: f32,
    pub kd: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub eval_loss: Option<f32>,
    /// Greedy accuracy on the curve's held-out problems (`[eval] curve_examples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean verifier reward of an RL step's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// What the whole run has cost so far, in dollars; filled in by the pipeline.
    pub dollars: f64,
    /// Tokens and FLOPs (trained model and teacher) this process has spent on the stage
    /// so far: a killed segment is billed its work from them (`cost::heartbeat`).
    #[serde(skip)]
    pub segment_tokens: u64,
    #[serde(skip)]
    pub segment_flops: f64,
}

/// Receives progress; the CLI draws bars, tests stay silent.
pub trait Progress {
    fn stage_start(&self, _stage: &str, _total_steps: usize) {}
    fn step(&self, _log: &StepLog) {}
    /// Progress of a stage that is not a training loop (e.g. generation).
    fn advance(&self, _done: usize, _msg: &str) {}
    fn message(&self, _msg: &str) {}
    fn stage_end(&self) {}
}

/// Prints nothing.
pub struct Silent;

impl Progress for Silent {}
