//! The sections of the TOML file, one type each, with their documented defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; outputs go to `<out_dir>/<name>/`. Default "run".
    pub name: String,
    /// Master seed: data, initial weights and data order derive from it. Default 1234.
    pub seed: u64,
    /// Parent folder of run directories. Default "runs".
    pub out_dir: PathBuf,
    /// "cpu", "cuda" or "cuda:N"; the `--device` flag overrides it. Default "cpu".
    pub device: String,
    /// Periodic checkpoints (`[*.train] save_every`) kept per stage, newest
    /// first; `distill resume` continues from the newest one that passes its
    /// checksums. Default 2.
    pub keep_checkpoints: usize,
    /// Compute precision: "auto" (default: bf16 on CUDA, f32 on CPU), "f32", "bf16" or
    /// "f16". With bf16/f16, matmuls and activations run in it while master weights,
    /// optimizer state, norms, softmax and the loss stay f32; a teacher that is only run
    /// (loaded, or once trained) is stored in it. The `--dtype` flag overrides it.
    pub dtype: String,
    /// "fused" (default): RMSNorm, rope, causal attention and SwiGLU run as fused CPU
    /// kernels with hand-written backward where the device is the CPU and the compute
    /// dtype f32 (`kernels::ops`, `kernels::attention`); "plain": plain candle ops
    /// everywhere, the reference the kernels are tested against. The `--kernels` flag
    /// overrides it.
    pub kernels: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 1234,
            out_dir: "runs".into(),
            device: "cpu".into(),
            keep_checkpoints: 2,
            dtype: "auto".into(),
            kernels: "fused".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Built-in seeded arithmetic word problems with a verifier.
    Arithmetic,
    /// A JSONL file of `{"prompt": ..., "completion": ...}` records.
    Jsonl,
    /// A plain-text file, cut into `seq_len` token windows (language modelling).
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "arithmetic" (default), "jsonl" or "text".
    pub source: DataSource,
    /// Data file for "jsonl" and "text"; relative paths are relative to the config file.
    pub path: Option<PathBuf>,
    /// Training examples to generate (arithmetic). Default 2000.
    pub train_examples: usize,
    /// Held-out examples (arithmetic), never seen in training. Default 200.
    pub eval_examples: usize,
    /// Share of a JSONL/text file held out for evaluation. Default 0.05.
    pub eval_fraction: f64,
    /// Longest training sequence in tokens; longer examples are truncated. Default 128.
    pub seq_len: usize,
    /// Fewest arithmetic steps in a problem. Default 2.
    pub min_steps: usize,
    /// Most arithmetic steps in a problem. Default 3.
    pub max_steps: usize,
    /// Largest number that appears as a starting amount or operand. Default 20.
    pub max_operand: u32,
    /// Whether problems may double or triple an amount. Default true.
    pub allow_multiply: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::Arithmetic,
            path: None,
            train_examples: 2000,
            eval_examples: 200,
            eval_fraction: 0.05,
            seq_len: 128,
            min_steps: 2,
            max_steps: 3,
            max_operand: 20,
            allow_multiply: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// An existing `tokenizer.json` to use instead of training one.
    pub path: Option<PathBuf>,
    /// Vocabulary size of a trained byte-level BPE tokenizer. Default 384.
    pub vocab_size: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            path: None,
            vocab_size: 384,
        }
    }
}

/// Architecture of a Llama-family decoder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// Model width. Default 128.
    pub hidden_size: usize,
    /// SwiGLU inner width. Default 344 (about 8/3 of the width).
    pub intermediate_size: usize,
    /// Decoder layers. Default 2.
    pub num_layers: usize,
    /// Query heads; must divide hidden_size. Default 4.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention); must divide num_heads. Default: num_heads.
    pub num_kv_heads: Option<usize>,
    /// Share the embedding matrix with the output head. Default false.
    pub tie_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2 style). Default false.
    pub attention_bias: bool,
    /// Rotary embedding base. Default 10000.
    pub rope_theta: f64,
    /// RMSNorm epsilon. Default 1e-5.
    pub rms_norm_eps: f64,
    /// Longest position the model supports. Default 512.
    pub max_position_embeddings: usize,
    /// Standard deviation of the initial weights (Hugging Face's initializer_range). Default 0.02.
    pub init_std: f64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            intermediate_size: 344,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: None,
            tie_embeddings: false,
            attention_bias: false,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 512,
            init_std: 0.02,
        }
    }
}

/// Optimiser, schedule and loop settings of one training stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Optimiser steps. Default 200.
    pub steps: usize,
    /// Sequences per micro-batch. Default 16.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step. Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Final learning rate of the cosine decay. Default: lr / 10.
    pub min_lr: Option<f64>,
    /// Linear warmup steps. Default: steps / 20.
    pub warmup_steps: Option<usize>,
    /// Decoupled AdamW weight decay, applied to matrices only. Default 0.1.
    pub weight_decay: f64,
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.95.
    pub beta2: f64,
    /// Default 1e-8.
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables. Default 1.0.
    pub grad_clip: f64,
    /// Held-out loss every this many steps; 0 = only at the end. Default 0.
    pub eval_every: usize,
    /// Write a checkpoint every this many steps; 0 = only at the end. Default 0.
    pub save_every: usize,
    /// What a non-finite loss or gradient norm does: "stop" (default) ends the
    /// stage with an error naming the step and the loss term, keeping the last
    /// checkpoint; "skip" drops that step's update and goes on (at most 10
    /// steps in a row).
    pub on_nonfinite: NonFinitePolicy,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    #[default]
    Stop,
    Skip,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: None,
            warmup_steps: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 0,
            save_every: 0,
            on_nonfinite: NonFinitePolicy::Stop,
        }
    }
}

impl TrainSpec {
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps.unwrap_or(self.steps / 20)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    /// Load the teacher from this checkpoint directory (ours or a Hugging Face Llama /
    /// Qwen2 folder) or GGUF file (`*.gguf`, e.g. from scripts/fetch-teacher.sh) instead
    /// of training it.
    pub checkpoint: Option<PathBuf>,
    /// Or from the Hugging Face Hub: `ORG/NAME`, resolved through the Hub cache
    /// (`HF_HOME`; `HF_HUB_OFFLINE=1` uses the cache only).
    pub hub: Option<String>,
    /// The revision of `hub`: a branch, tag or commit. Default "main".
    pub revision: Option<String>,
    /// Train the teacher on only the first N training examples. Default: all of them.
    pub train_examples: Option<usize>,
    /// How the teacher holds its matmul weights once it only samples and scores (traces,
    /// logits, on-policy scoring, its evaluation): "dense" (default) or "int8".
    pub matmul_weights: MatmulWeights,
    pub model: ModelSpec,
    pub train: TrainSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// Train the students on only the last N training examples (the "transfer
    /// set"). With `teacher.train_examples` this sets up the usual distillation
    /// setting: the teacher learned from data the students never see, and the
    /// students learn from a smaller set. Default: all of them.
    pub train_examples: Option<usize>,
    /// The student architecture; the baseline uses the same one and the same initial weights.
    pub model: ModelSpec,
    /// Training settings shared by the distilled student and the baseline.
    pub train: TrainSpec,
    /// Initial weights of the distilled student: "random" (default); "pruned", cut from
    /// the teacher (its layers `prune_layers`, then its most important heads, MLP
    /// neurons and embedding channels down to `[student.model]`'s sizes, as NVIDIA's
    /// Minitron did); or "both", which trains a `student-pruned` stage beside the
    /// random-init `student` so the report compares them. With pruning, every student
    /// (and the baseline) has the pruned architecture: the teacher's head size, group
    /// size and vocabulary with `[student.model]`'s widths and depth.
    pub init: StudentInit,
    /// Teacher layers the pruned student keeps (0-based, increasing); its length is the
    /// student's depth. Default: `student.model.num_layers` layers spread evenly from the
    /// first to the last.
    pub prune_layers: Option<Vec<usize>>,
    /// Training examples whose activations score the teacher's heads, neurons and
    /// channels for width pruning. Default 32.
    pub calibration_examples: usize,
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            train_examples: None,
            model: ModelSpec::default(),
            train: TrainSpec::default(),
            init: StudentInit::Random,
            prune_layers: None,
            calibration_examples: 32,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StudentInit {
    #[default]
    Random,
    Pruned,
    Both,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Weight of the hard-label cross-entropy; (1 - ce_weight) weighs the KD term.
    /// Default 0.5. `alpha`, its older name, is still read.
    #[serde(alias = "alpha")]
    pub ce_weight: f64,
    /// Softmax temperature of the KD term (scaled by T^2, as Hinton et al. 2015). Default 2.0.
    pub temperature: f64,
    /// The divergence between teacher and student: "forward_kl" (default, Hinton),
    /// "reverse_kl" (MiniLLM), "jsd" (GKD, with `beta`), "skew_forward_kl" and
    /// "skew_reverse_kl" (DistiLLM, with `skew`), "tvd".
    pub loss: LossKind,
    /// Generalized JSD weight: 0 gives forward KL, 1 reverse KL. Default 0.5.
    pub beta: f64,
    /// Skew of the skew KL losses, in [0, 1). Default 0.1.
    pub skew: f64,
    /// Use the fused CPU kernels (one pass per row, analytic backward). false
    /// uses the plain candle composition, which implements forward_kl only. Default true.
    pub fused: bool,
    /// Distil from the teacher's k most likely tokens per position (and the rest of its
    /// mass as one tail category, see `loss::topk`) instead of its full distribution.
    /// 0 (default) uses the full distribution.
    pub top_k: usize,
    /// Compute the loss from the final hidden states and the head weight chunk by chunk
    /// (`loss::head`), never materialising the (tokens, vocabulary) logits of the
    /// student or of a full-distribution teacher: ~80% less peak memory at V = 49152.
    /// Default false. Needs `fused`.
    pub fused_head: bool,
    /// Write the teacher's top-k log-probabilities over the distilled student's data to
    /// an offline cache (`teacher-logits` stage, `<run>/logit-cache/`) and train that
    /// student from the cache instead of running the teacher. Needs `top_k` >= 1.
    pub logit_cache: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    ForwardKl,
    ReverseKl,
    Jsd,
    SkewForwardKl,
    SkewReverseKl,
    Tvd,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            ce_weight: 0.5,
            temperature: 2.0,
            loss: LossKind::ForwardKl,
            beta: 0.5,
            skew: 0.1,
            fused: true,
            top_k: 0,
            fused_head: false,
            logit_cache: false,
        }
    }
}

/// The DeepSeek-R1 distillation recipe: the teacher writes K solutions per
/// student prompt, the verifier keeps the correct ones (rejection sampling),
/// and the students learn from those. With `enabled = true` the students are:
/// `student` (fine-tuned on the kept traces), `student-kd` (the same traces
/// plus logit distillation with the `[distill]` settings), `baseline` (the
/// same prompts with final answers only, no teacher) and `oracle` (the task's
/// own step-by-step gold solutions, no teacher).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// Use the recipe above instead of plain logit distillation. Default false.
    pub enabled: bool,
    /// Samples drawn per prompt (K). Default 4.
    pub samples: usize,
    /// Sampling temperature. Default 0.7.
    pub temperature: f64,
    /// Nucleus (top-p) mass; 1 keeps the whole distribution. Default 0.95.
    pub top_p: f64,
    /// Sample from the k most likely tokens only (before top_p); 0 keeps them all. Default 0.
    pub top_k: usize,
    /// Most tokens per sample; a sample that has not ended by then is rejected. Default 96.
    pub max_new_tokens: usize,
    /// "first": keep the first correct sample of each prompt (default); "all": every correct one.
    pub keep: Keep,
    /// Reject correct samples longer than this many tokens. Default: no limit.
    pub max_completion_tokens: Option<usize>,
    /// Samples decoded together. Default 64.
    pub batch_size: usize,
    /// Train `student-kd` (traces plus logit distillation). Default true.
    pub logit_kd: bool,
    /// Train `oracle` on the gold solutions. Default true.
    pub oracle: bool,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            samples: 4,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            max_new_tokens: 96,
            keep: Keep::First,
            max_completion_tokens: None,
            batch_size: 64,
            logit_kd: true,
            oracle: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Held-out problems solved by greedy generation for the accuracy figure. Default 100.
    pub examples: usize,
    /// Generation stops after this many new tokens. Default 96.
    pub max_new_tokens: usize,
    /// Prompts decoded together. Default 32.
    pub batch_size: usize,
    /// The first N held-out problems are also solved at every `eval_every` step of the
    /// students' stages, for the accuracy-against-dollars curve of the report; 0 draws
    /// no curve. Default 0.
    pub curve_examples: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            examples: 100,
            max_new_tokens: 96,
            batch_size: 32,
            curve_examples: 0,
        }
    }
}

/// Prices used by the cost ledger, in dollars per device-hour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// Price of one CPU core for one hour. Default $0.05, a round figure near
    /// on-demand cloud vCPU prices; set your own.
    pub cpu_core_hour: f64,
    /// Price of one GPU-hour when the GPU name is not in `gpu_hour`. Default $2.00.
    pub default_gpu_hour: f64,
    /// Price per GPU-hour by name fragment (matched case-insensitively against the
    /// detected GPU name; the longest matching fragment wins). Defaults: on-demand
    /// rental prices, each with its source and date in docs/cost.md: H800 $2.00 (the
    /// price DeepSeek-R1 assumed), H200 $6.31, B200 $8.60, H100 $6.16, A100 $2.70,
    /// L40S $2.25, A10G $1.006, L4 $0.8048. A GPU matching none is billed at
    /// `default_gpu_hour`, with a warning and a note in the ledger.
    pub gpu_hour: std::collections::BTreeMap<String, f64>,
    /// Peak FLOP/s of one device (one GPU, or one CPU core) for the MFU column
    /// of the ledger. Default: the datasheet f32 peak of known GPUs, and for
    /// CPUs a GEMM probe at the start of the run (`distill peak`).
    pub peak_flops_per_device: Option<f64>,
}

/// On-demand prices per GPU-hour; docs/cost.md gives each one's source and date.
const DEFAULT_GPU_HOUR: [(&str, f64); 8] = [
    ("H800", 2.0),
    ("H200", 6.31),
    ("B200", 8.60),
    ("H100", 6.16),
    ("A100", 2.70),
    ("L40S", 2.25),
    ("A10G", 1.006),
    ("L4", 0.8048),
];

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            cpu_core_hour: 0.05,
            default_gpu_hour: 2.0,
            gpu_hour: DEFAULT_GPU_HOUR.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            peak_flops_per_device: None,
        }
    }
}

/// `[distributed] backend`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One process.
    #[default]
    None,
    /// MPI between processes (CPU tensors); needs a build with `--features mpi`.
    Mpi,
    /// NCCL between GPUs; needs a build with `--features cuda`.
    Nccl,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::None => "none",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        })
    }
}

/// `[distributed]` in the config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// "none" (default), "mpi" or "nccl".
    pub backend: Backend,
}

/// Which verified samples of a prompt are kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The first correct sample of each prompt.
    First,
    /// Every correct sample (a prompt may then appear several times).
    All,
}

/// Which implementation of RMSNorm, rope, attention and SwiGLU a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fused kernels of `kernels::ops` and `kernels::attention`, where the device is
    /// the CPU and the compute dtype f32; the plain ops elsewhere.
    #[default]
    Fused,
    /// Plain candle ops everywhere: the reference the fused kernels are checked against.
    Plain,
}

impl Kernels {
    pub const NAMES: &'static str = "\"fused\" or \"plain\"";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fused" => Some(Self::Fused),
            "plain" => Some(Self::Plain),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::Plain => "plain",
        }
    }
}

/// How a model that only samples or scores (a teacher) stores its matmul weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulWeights {
    /// Dense tensors in the compute dtype (f32 by default): what training uses.
    #[default]
    Dense,
    /// 8-bit weights with one f32 scale per 32 inputs (ggml's Q8_0 scheme), f32
    /// activations (`kernels::int8`): a quarter of the bytes to read per token. A GGUF
    /// file's Q4_1 weights are re-quantized to it, within half a step of their values.
    /// CPU and f32 compute only.
    Int8,
}

impl MatmulWeights {
    pub const NAMES: &'static str = "\"dense\" or \"int8\"";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dense" => Some(Self::Dense),
            "int8" => Some(Self::Int8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::Int8 => "int8",
        }
    }
}

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

pub fn parse_device_name(s: &str) -> Result<DeviceName> {
    match s.trim() {
        "cpu" => Ok(DeviceName::Cpu),
        "cuda" => Ok(DeviceName::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceName::Cuda)
            .ok_or_else(|| Error::Device(format!("unknown device {other:?}; use \"cpu\", \"cuda\" or \"cuda:N\""))),
    }
}
