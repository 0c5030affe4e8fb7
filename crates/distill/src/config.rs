//! The run configuration: TOML in, validated `Config` out.
//!
//! Every key has a documented default (`#[serde(default)]` plus the `Default`
//! impls below); unknown keys are rejected with the key's name and the file.
//! `Config::load` validates the whole file before any heavy work starts, and
//! `Config::to_toml` writes the resolved config (defaults filled in) that is
//! saved beside every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub tokenizer: TokenizerConfig,
    pub teacher: TeacherConfig,
    pub student: StudentConfig,
    pub distill: DistillConfig,
    pub traces: TracesConfig,
    pub eval: EvalConfig,
    pub cost: CostConfig,
    /// Data parallelism across processes: `backend = "none" | "mpi" | "nccl"`.
    pub distributed: crate::distributed::DistributedConfig,
}

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
    /// dtype f32 (`model::fused`, `model::attention`); "plain": plain candle ops
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
    /// (`loss::fused_head`), never materialising the (tokens, vocabulary) logits of the
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

impl DistillConfig {
    /// The divergence with its parameter.
    pub fn divergence(&self) -> crate::loss::Divergence {
        use crate::loss::Divergence as D;
        match self.loss {
            LossKind::ForwardKl => D::ForwardKl,
            LossKind::ReverseKl => D::ReverseKl,
            LossKind::Jsd => D::Jsd { beta: self.beta },
            LossKind::SkewForwardKl => D::SkewForwardKl { skew: self.skew },
            LossKind::SkewReverseKl => D::SkewReverseKl { skew: self.skew },
            LossKind::Tvd => D::Tvd,
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
    /// Most tokens per sample; a sample that has not ended by then is rejected. Default 96.
    pub max_new_tokens: usize,
    /// "first": keep the first correct sample of each prompt (default); "all": every correct one.
    pub keep: crate::teacher::traces::Keep,
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
            max_new_tokens: 96,
            keep: crate::teacher::traces::Keep::First,
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
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            examples: 100,
            max_new_tokens: 96,
            batch_size: 32,
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
    /// detected GPU name). Defaults: H800 $2.00 (DeepSeek-R1, Nature 2025,
    /// supplementary), H100 $2.50, A100 $1.50.
    pub gpu_hour: std::collections::BTreeMap<String, f64>,
    /// Peak FLOP/s of one device (one GPU, or one CPU core) for the MFU column
    /// of the ledger. Default: the datasheet f32 peak of known GPUs, and for
    /// CPUs a GEMM probe at the start of the run (`distill peak`).
    pub peak_flops_per_device: Option<f64>,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            cpu_core_hour: 0.05,
            default_gpu_hour: 2.0,
            gpu_hour: [("H800", 2.0), ("H100", 2.5), ("A100", 1.5)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            peak_flops_per_device: None,
        }
    }
}

/// A `[run] dtype` / `--dtype` value: None for "auto".
pub fn parse_dtype(s: &str) -> Result<Option<candle_core::DType>> {
    use candle_core::DType;
    match s.trim() {
        "auto" => Ok(None),
        "f32" => Ok(Some(DType::F32)),
        "bf16" => Ok(Some(DType::BF16)),
        "f16" => Ok(Some(DType::F16)),
        other => Err(Error::Invalid(format!(
            "dtype {other:?}: use \"auto\" (bf16 on CUDA, f32 on CPU), \"f32\", \"bf16\" or \"f16\""
        ))),
    }
}

impl Config {
    /// `[run] kernels`, checked.
    pub fn kernels(&self) -> Result<crate::kernels::ops::Kernels> {
        crate::kernels::ops::Kernels::parse(&self.run.kernels).ok_or_else(|| {
            Error::Invalid(format!(
                "kernels {:?}: use {}",
                self.run.kernels,
                crate::kernels::ops::Kernels::NAMES
            ))
        })
    }

    /// The compute dtype on `device`: `[run] dtype`, with "auto" meaning bf16 on CUDA
    /// (tensor cores) and f32 on CPU (candle's CPU matmul widens bf16 to f32 anyway).
    pub fn compute_dtype(&self, device: &candle_core::Device) -> Result<candle_core::DType> {
        Ok(parse_dtype(&self.run.dtype)?.unwrap_or(if device.is_cuda() {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }))
    }

    /// Reads, parses and validates a config file. Relative data, tokenizer and
    /// teacher paths are resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let mut cfg = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut Option<PathBuf>| {
            if let Some(inner) = p.as_mut() {
                if inner.is_relative() && !inner.exists() {
                    *inner = base.join(&*inner);
                }
            }
        };
        rebase(&mut cfg.data.path);
        rebase(&mut cfg.tokenizer.path);
        rebase(&mut cfg.teacher.checkpoint);
        Ok(cfg)
    }

    /// Parses and validates TOML text; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The resolved config, every default written out.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Invalid(format!("cannot write config as TOML: {e}")))
    }

    /// Sets the run name (e.g. from `--name`), refusing one that would put the run
    /// directory anywhere but directly inside `out_dir`.
    pub fn set_run_name(&mut self, name: &str) -> Result<()> {
        if !is_plain_name(name) {
            return Err(Error::Invalid(format!(
                "run name {name:?} must be a plain folder name (no slashes, not . or ..): the run directory \
                 is <out_dir>/<name>; choose the parent folder with --out-dir"
            )));
        }
        self.run.name = name.to_string();
        Ok(())
    }

    /// The run directory, `<out_dir>/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.run.out_dir.join(&self.run.name)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let mut v = Validator { path, errors: vec![] };
        let r = &self.run;
        v.check(
            is_plain_name(&r.name),
            "run.name",
            "must be a plain folder name (no slashes, not . or ..)",
            &r.name,
        );
        v.check(
            r.keep_checkpoints >= 1,
            "run.keep_checkpoints",
            "must be >= 1",
            r.keep_checkpoints,
        );
        v.check(
            parse_dtype(&r.dtype).is_ok(),
            "run.dtype",
            "must be \"auto\", \"f32\", \"bf16\" or \"f16\"",
            &r.dtype,
        );
        v.check(
            crate::kernels::ops::Kernels::parse(&r.kernels).is_some(),
            "run.kernels",
            &format!("must be {}", crate::kernels::ops::Kernels::NAMES),
            &r.kernels,
        );
        v.check(
            crate::device::parse_device_name(&r.device).is_ok(),
            "run.device",
            "must be \"cpu\", \"cuda\" or \"cuda:N\"",
            &r.device,
        );

        let d = &self.data;
        match d.source {
            DataSource::Arithmetic => {
                v.check(
                    d.train_examples > 0,
                    "data.train_examples",
                    "must be > 0",
                    d.train_examples,
                );
                v.check(
                    d.eval_examples > 0,
                    "data.eval_examples",
                    "must be > 0",
                    d.eval_examples,
                );
                v.check(d.min_steps >= 1, "data.min_steps", "must be >= 1", d.min_steps);
                v.check(
                    d.max_steps >= d.min_steps,
                    "data.max_steps",
                    "must be >= data.min_steps",
                    d.max_steps,
                );
                v.check(d.max_steps <= 12, "data.max_steps", "must be <= 12", d.max_steps);
                v.check(
                    (2..=100_000).contains(&d.max_operand),
                    "data.max_operand",
                    "must be in 2..=100000",
                    d.max_operand,
                );
            }
            DataSource::Jsonl | DataSource::Text => {
                v.check(
                    d.path.is_some(),
                    "data.path",
                    "is required when data.source is \"jsonl\" or \"text\"",
                    "(missing)",
                );
            }
        }
        v.check(
            d.eval_fraction > 0.0 && d.eval_fraction < 1.0,
            "data.eval_fraction",
            "must be in (0, 1)",
            d.eval_fraction,
        );
        v.check(d.seq_len >= 8, "data.seq_len", "must be >= 8", d.seq_len);
        if self.tokenizer.path.is_none() {
            v.check(
                (300..=65_536).contains(&self.tokenizer.vocab_size),
                "tokenizer.vocab_size",
                "must be in 300..=65536 (byte-level BPE needs 256 bytes plus merges)",
                self.tokenizer.vocab_size,
            );
        }
        let tc = &self.teacher;
        if let Some(id) = &tc.hub {
            if let Err(e) = crate::prepare::hub::check_repo_id(id) {
                v.check(false, "teacher.hub", &e.to_string(), id);
            }
            v.check(
                tc.checkpoint.is_none(),
                "teacher.hub",
                "and teacher.checkpoint both name a teacher; keep one",
                id,
            );
        }
        if let Some(rev) = &tc.revision {
            if let Err(e) = crate::prepare::hub::check_revision(rev) {
                v.check(false, "teacher.revision", &e.to_string(), rev);
            }
            v.check(tc.hub.is_some(), "teacher.revision", "needs teacher.hub", rev);
        }
        if self.teacher.checkpoint.is_none() && self.teacher.hub.is_none() {
            v.model(&self.teacher.model, "teacher.model", d.seq_len);
            v.train(&self.teacher.train, "teacher.train");
        }
        if let Some(n) = self.teacher.train_examples {
            v.check(n > 0, "teacher.train_examples", "must be > 0", n);
        }
        if let Some(n) = self.student.train_examples {
            v.check(n > 0, "student.train_examples", "must be > 0", n);
        }
        let st = &self.student;
        if st.init != StudentInit::Random {
            v.check(
                st.calibration_examples > 0,
                "student.calibration_examples",
                "must be > 0",
                st.calibration_examples,
            );
        }
        if let Some(layers) = &st.prune_layers {
            v.check(
                layers.len() == st.model.num_layers,
                "student.prune_layers",
                &format!(
                    "lists {} layers, but student.model.num_layers is {}; list one teacher layer per student layer",
                    layers.len(),
                    st.model.num_layers
                ),
                format!("{layers:?}"),
            );
            v.check(
                st.init != StudentInit::Random,
                "student.prune_layers",
                "needs student.init = \"pruned\" or \"both\"",
                format!("{layers:?}"),
            );
        }
        v.model(&self.student.model, "student.model", d.seq_len);
        v.train(&self.student.train, "student.train");
        v.check(
            (0.0..=1.0).contains(&self.distill.ce_weight),
            "distill.ce_weight",
            "must be in [0, 1]",
            self.distill.ce_weight,
        );
        v.check(
            self.distill.temperature > 0.0 && self.distill.temperature.is_finite(),
            "distill.temperature",
            "must be > 0",
            self.distill.temperature,
        );
        let dc = &self.distill;
        v.check(
            (0.0..=1.0).contains(&dc.beta),
            "distill.beta",
            "must be in [0, 1]",
            dc.beta,
        );
        v.check(
            (0.0..1.0).contains(&dc.skew),
            "distill.skew",
            "must be in [0, 1)",
            dc.skew,
        );
        v.check(
            dc.fused || dc.loss == LossKind::ForwardKl,
            "distill.fused",
            "can be false only with loss = \"forward_kl\" (the plain reference composition implements no other divergence)",
            dc.fused,
        );
        v.check(
            dc.fused || !dc.fused_head,
            "distill.fused",
            "must be true with fused_head (the fused head runs the fused kernels chunk by chunk)",
            dc.fused,
        );
        v.check(
            dc.fused || dc.top_k == 0,
            "distill.fused",
            "must be true with top_k (the plain reference composition takes full teacher logits only)",
            dc.fused,
        );
        v.check(
            dc.top_k <= 1 << 20,
            "distill.top_k",
            "must be 0 (the full distribution) or a number of tokens below the vocabulary size",
            dc.top_k,
        );
        v.check(
            !dc.logit_cache || dc.top_k >= 1,
            "distill.logit_cache",
            "needs distill.top_k >= 1: the cache stores the teacher's top-k tokens (8 to 64 is usual)",
            dc.logit_cache,
        );
        v.check(
            !dc.logit_cache || !self.traces.enabled || self.traces.logit_kd,
            "distill.logit_cache",
            "has no student to serve: with [traces] enabled, only traces.logit_kd = true trains from teacher logits",
            dc.logit_cache,
        );
        let t = &self.traces;
        if t.enabled {
            v.check(
                (1..=1024).contains(&t.samples),
                "traces.samples",
                "must be in 1..=1024",
                t.samples,
            );
            v.check(
                t.temperature >= 0.0 && t.temperature.is_finite(),
                "traces.temperature",
                "must be >= 0 (0 decodes greedily)",
                t.temperature,
            );
            v.check(
                t.top_p > 0.0 && t.top_p <= 1.0,
                "traces.top_p",
                "must be in (0, 1]",
                t.top_p,
            );
            v.check(
                t.max_new_tokens > 0,
                "traces.max_new_tokens",
                "must be > 0",
                t.max_new_tokens,
            );
            v.check(t.batch_size > 0, "traces.batch_size", "must be > 0", t.batch_size);
            if let Some(m) = t.max_completion_tokens {
                v.check(m > 0, "traces.max_completion_tokens", "must be > 0", m);
            }
            v.check(
                d.source != DataSource::Text,
                "traces.enabled",
                "needs a task with a verifier (data.source = \"arithmetic\", or \"jsonl\" whose completions end in `#### N`); plain text has none",
                t.enabled,
            );
        }
        v.check(
            self.eval.max_new_tokens > 0,
            "eval.max_new_tokens",
            "must be > 0",
            self.eval.max_new_tokens,
        );
        v.check(
            self.eval.batch_size > 0,
            "eval.batch_size",
            "must be > 0",
            self.eval.batch_size,
        );
        let c = &self.cost;
        v.check(
            c.cpu_core_hour >= 0.0 && c.cpu_core_hour.is_finite(),
            "cost.cpu_core_hour",
            "must be >= 0",
            c.cpu_core_hour,
        );
        v.check(
            c.default_gpu_hour >= 0.0 && c.default_gpu_hour.is_finite(),
            "cost.default_gpu_hour",
            "must be >= 0",
            c.default_gpu_hour,
        );
        if let Some(p) = c.peak_flops_per_device {
            v.check(
                p > 0.0 && p.is_finite(),
                "cost.peak_flops_per_device",
                "must be > 0 (FLOP/s of one GPU or one CPU core)",
                p,
            );
        }
        for (k, p) in &c.gpu_hour {
            v.check(
                *p >= 0.0 && p.is_finite(),
                &format!("cost.gpu_hour.{k}"),
                "must be >= 0",
                p,
            );
        }
        v.finish()
    }
}

/// Collects every range error so that one run of the validator reports them all.
struct Validator<'a> {
    path: &'a Path,
    errors: Vec<String>,
}

impl Validator<'_> {
    fn check(&mut self, ok: bool, key: &str, rule: &str, got: impl std::fmt::Debug) {
        if !ok {
            self.errors.push(format!("key `{key}` {rule}, got {got:?}"));
        }
    }

    fn model(&mut self, m: &ModelSpec, prefix: &str, seq_len: usize) {
        let k = |s: &str| format!("{prefix}.{s}");
        self.check(m.hidden_size > 0, &k("hidden_size"), "must be > 0", m.hidden_size);
        self.check(
            m.intermediate_size > 0,
            &k("intermediate_size"),
            "must be > 0",
            m.intermediate_size,
        );
        self.check(m.num_layers > 0, &k("num_layers"), "must be > 0", m.num_layers);
        self.check(m.num_heads > 0, &k("num_heads"), "must be > 0", m.num_heads);
        if m.num_heads > 0 {
            self.check(
                m.hidden_size % m.num_heads == 0,
                &k("num_heads"),
                "must divide hidden_size",
                m.num_heads,
            );
            let head_dim = m.hidden_size / m.num_heads.max(1);
            self.check(
                head_dim % 2 == 0,
                &k("num_heads"),
                "must leave an even head size (hidden_size / num_heads) for rotary embeddings",
                m.num_heads,
            );
            let kv = m.num_kv_heads.unwrap_or(m.num_heads);
            self.check(
                kv > 0 && m.num_heads % kv.max(1) == 0,
                &k("num_kv_heads"),
                "must be > 0 and divide num_heads",
                kv,
            );
        }
        self.check(m.rope_theta > 0.0, &k("rope_theta"), "must be > 0", m.rope_theta);
        self.check(m.rms_norm_eps > 0.0, &k("rms_norm_eps"), "must be > 0", m.rms_norm_eps);
        self.check(
            m.init_std > 0.0 && m.init_std < 1.0,
            &k("init_std"),
            "must be in (0, 1)",
            m.init_std,
        );
        self.check(
            m.max_position_embeddings >= seq_len,
            &k("max_position_embeddings"),
            "must be >= data.seq_len",
            m.max_position_embeddings,
        );
    }

    fn train(&mut self, t: &TrainSpec, prefix: &str) {
        let k = |s: &str| format!("{prefix}.{s}");
        self.check(t.steps > 0, &k("steps"), "must be > 0", t.steps);
        self.check(t.batch_size > 0, &k("batch_size"), "must be > 0", t.batch_size);
        self.check(t.grad_accum > 0, &k("grad_accum"), "must be > 0", t.grad_accum);
        self.check(t.lr > 0.0 && t.lr < 1.0, &k("lr"), "must be in (0, 1)", t.lr);
        let min_lr = t.min_lr();
        self.check(
            (0.0..=t.lr).contains(&min_lr),
            &k("min_lr"),
            "must be in [0, lr]",
            min_lr,
        );
        self.check(
            t.warmup_steps() <= t.steps,
            &k("warmup_steps"),
            "must be <= steps",
            t.warmup_steps(),
        );
        self.check(
            (0.0..1.0).contains(&t.weight_decay),
            &k("weight_decay"),
            "must be in [0, 1)",
            t.weight_decay,
        );
        self.check((0.0..1.0).contains(&t.beta1), &k("beta1"), "must be in [0, 1)", t.beta1);
        self.check((0.0..1.0).contains(&t.beta2), &k("beta2"), "must be in [0, 1)", t.beta2);
        self.check(t.eps > 0.0, &k("eps"), "must be > 0", t.eps);
        self.check(
            t.grad_clip >= 0.0 && t.grad_clip.is_finite(),
            &k("grad_clip"),
            "must be >= 0",
            t.grad_clip,
        );
    }

    fn finish(self) -> Result<()> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                path: self.path.to_path_buf(),
                msg: self.errors.join("; "),
            })
        }
    }
}

/// A single path component that stays inside its parent: not empty, no separator,
/// not `.` or `..`, no NUL.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_documented_defaults() -> Result<()> {
        let c = parse("")?;
        assert_eq!(c, Config::default());
        assert_eq!(c.student.train.min_lr(), 1e-4);
        assert_eq!(c.cost.gpu_hour["H800"], 2.0);
        Ok(())
    }

    #[test]
    fn unknown_key_names_the_key_and_file() {
        let err = parse("[student.train]\nlearning_rate = 0.1\n").unwrap_err().to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = parse("[student.train]\nsteps = \"ten\"\n").unwrap_err().to_string();
        assert!(err.contains("steps"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_all_reported() {
        let err = parse("[student.train]\nlr = -1.0\nbatch_size = 0\n[distill]\nce_weight = 2.0\n")
            .unwrap_err()
            .to_string();
        for key in ["student.train.lr", "student.train.batch_size", "distill.ce_weight"] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn loss_family_is_selected_and_checked() -> Result<()> {
        let c = parse("[distill]\nloss = \"jsd\"\nbeta = 0.25\n")?;
        assert_eq!(c.distill.divergence(), crate::loss::Divergence::Jsd { beta: 0.25 });
        let err = parse("[distill]\nloss = \"skew_reverse_kl\"\nskew = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("distill.skew"), "{err}");
        let err = parse("[distill]\nloss = \"tvd\"\nfused = false\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("distill.fused"), "{err}");
        let err = parse("[distill]\nloss = \"kl\"\n").unwrap_err().to_string();
        assert!(err.contains("forward_kl"), "{err}");
        Ok(())
    }

    #[test]
    fn top_k_cache_and_ce_weight_keys() -> Result<()> {
        // `alpha` is the older name of `ce_weight` and still reads.
        assert_eq!(parse("[distill]\nalpha = 0.3\n")?.distill.ce_weight, 0.3);
        let c = parse("[distill]\nce_weight = 0.2\ntop_k = 16\nlogit_cache = true\n")?;
        assert_eq!(
            (c.distill.ce_weight, c.distill.top_k, c.distill.logit_cache),
            (0.2, 16, true)
        );
        for (text, key, hint) in [
            ("[distill]\nlogit_cache = true\n", "distill.logit_cache", "top_k"),
            (
                "[distill]\ntop_k = 8\nfused = false\n",
                "distill.fused",
                "full teacher logits",
            ),
            (
                "[traces]\nenabled = true\nlogit_kd = false\n[distill]\ntop_k = 8\nlogit_cache = true\n",
                "distill.logit_cache",
                "logit_kd",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(hint), "{text}: {err}");
        }
        Ok(())
    }

    #[test]
    fn traces_section_is_checked_only_when_enabled() -> Result<()> {
        let c = parse("[traces]\nsamples = 0\n")?;
        assert!(!c.traces.enabled);
        let err = parse("[traces]\nenabled = true\nsamples = 0\ntop_p = 1.5\nkeep = \"some\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep") && err.contains("first"), "{err}");
        let err = parse("[traces]\nenabled = true\nsamples = 0\ntop_p = 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("traces.samples") && err.contains("traces.top_p"), "{err}");
        let err = parse("[data]\nsource = \"text\"\npath = \"x.txt\"\n[traces]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("traces.enabled") && err.contains("verifier"), "{err}");
        Ok(())
    }

    #[test]
    fn heads_must_divide_width() {
        let err = parse("[student.model]\nhidden_size = 100\nnum_heads = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("student.model.num_heads"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() -> Result<()> {
        let c = parse("[run]\nname = \"x\"\n[student.train]\nsteps = 7\n")?;
        let again = parse(&c.to_toml()?)?;
        assert_eq!(c, again);
        Ok(())
    }
}
