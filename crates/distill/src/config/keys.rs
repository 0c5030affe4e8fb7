//! What each config key means and which values it takes: the text of the configuration
//! reference. Names, types and defaults are not written here; they come from the config
//! types (`schema`, and the serialized default config). `[teacher.model]` and
//! `[student.model]` share the `model.*` entries, `[teacher.train]` and
//! `[student.train]` the `train.*` ones. Tests fail when a key of the types has no entry
//! here, or an entry names no key.

/// The documentation of one key.
pub struct KeyDoc {
    /// `section.name`; `model.*` and `train.*` stand for both the teacher's and the student's.
    pub key: &'static str,
    /// The values validation accepts (`config::validate`), in words.
    pub range: &'static str,
    /// What the key does, in one line.
    pub doc: &'static str,
    /// For a key that may be left unset: what unset means, and an example value.
    pub unset: Option<Unset>,
}

pub struct Unset {
    pub means: &'static str,
    pub example: &'static str,
}

const fn k(key: &'static str, range: &'static str, doc: &'static str) -> KeyDoc {
    KeyDoc {
        key,
        range,
        doc,
        unset: None,
    }
}

const fn opt(
    key: &'static str,
    range: &'static str,
    doc: &'static str,
    means: &'static str,
    example: &'static str,
) -> KeyDoc {
    KeyDoc {
        key,
        range,
        doc,
        unset: Some(Unset { means, example }),
    }
}

/// Every key, in the order of the reference.
pub static DOCS: &[KeyDoc] = &[
    // [run]
    k("run.name", "a plain folder name: no slashes, not . or ..", "Run name; the run writes to `<out_dir>/<name>/`. `--name` overrides it."),
    k("run.seed", ">= 0", "Master seed: data, initial weights, data order and sampling derive from it. `--seed` overrides it."),
    k("run.out_dir", "a path", "Folder that holds the run directories. `--out-dir` overrides it."),
    k("run.device", "\"cpu\", \"cuda\" or \"cuda:N\"", "Where to compute. `--device` overrides it; a cuda device that cannot open is an error, never a silent fall back to the CPU."),
    k("run.keep_checkpoints", ">= 1", "Periodic checkpoints kept per stage, newest first, for `distill resume`."),
    k("run.dtype", "\"auto\", \"f32\", \"bf16\" or \"f16\"", "Compute precision; \"auto\" is bf16 on CUDA and f32 on CPU. Master weights, optimizer state, norms, softmax and the loss stay f32. `--dtype` overrides it."),
    k("run.kernels", "\"fused\" or \"plain\"", "\"fused\": the fused CPU kernels (f32 on the CPU); \"plain\": plain candle ops everywhere, the reference they are tested against. `--kernels` overrides it."),
    // [data]
    k("data.source", "", "The data: built-in arithmetic word problems (with a verifier), a JSONL file of {\"prompt\", \"completion\"} records, or a plain-text file."),
    opt("data.path", "a readable file; needed for \"jsonl\" and \"text\"", "Data file of the \"jsonl\" and \"text\" sources; a relative path is relative to the config file.", "none (the arithmetic source needs no file)", "\"data/train.jsonl\""),
    k("data.train_examples", "> 0 (arithmetic)", "Training problems to generate (arithmetic source)."),
    k("data.eval_examples", "> 0 (arithmetic)", "Held-out problems to generate (arithmetic source); none of them is in the training set."),
    k("data.eval_fraction", "in (0, 1)", "Share of a JSONL or text file held out for evaluation."),
    k("data.seq_len", ">= 8, and <= every model's max_position_embeddings", "Longest training sequence in tokens; longer examples are cut."),
    k("data.min_steps", ">= 1 (arithmetic)", "Fewest arithmetic steps in a problem."),
    k("data.max_steps", "min_steps to 12 (arithmetic)", "Most arithmetic steps in a problem."),
    k("data.max_operand", "2 to 100000 (arithmetic)", "Largest starting amount or operand in a problem."),
    k("data.allow_multiply", "", "Whether problems may double or triple an amount."),
    // [tokenizer]
    opt("tokenizer.path", "a tokenizer.json file", "Use this tokenizer instead of training one (a loaded teacher brings its own).", "none: train a byte-level BPE tokenizer on the data", "\"tokenizer.json\""),
    k("tokenizer.vocab_size", "300 to 65536", "Vocabulary size of the byte-level BPE tokenizer trained on the data."),
    // [teacher]
    opt("teacher.checkpoint", "a checkpoint directory (ours, or a Hugging Face Llama / Qwen2 folder) or a .gguf file", "Load the teacher from here instead of training it; a relative path is relative to the config file.", "none: train the teacher (or take it from teacher.hub)", "\"runs/small/teacher\""),
    opt("teacher.hub", "ORG/NAME; not together with teacher.checkpoint", "Load the teacher from the Hugging Face Hub through its cache ($HF_HOME; HF_HUB_OFFLINE=1 reads the cache only).", "none", "\"HuggingFaceTB/SmolLM2-135M-Instruct\""),
    opt("teacher.revision", "a branch, tag or commit; needs teacher.hub", "Revision of teacher.hub.", "\"main\"", "\"main\""),
    opt("teacher.train_examples", "> 0", "Train the teacher on the first N training examples only.", "all of them", "1000"),
    k("teacher.matmul_weights", "\"dense\" or \"int8\"; \"int8\" needs the CPU, f32 and widths that are multiples of 32", "How the teacher holds its matmul weights once it only samples and scores (traces, logits, on-policy scoring and its evaluation): \"dense\" in the compute dtype, or \"int8\", 8-bit weights with an f32 scale per 32 inputs and f32 activations, a quarter of the bytes to read per decoded token (docs/rollout.md). The report names which was used."),
    // [teacher.model] and [student.model]
    k("model.hidden_size", "> 0, a multiple of num_heads", "Model width."),
    k("model.intermediate_size", "> 0", "Inner width of the SwiGLU MLP."),
    k("model.num_layers", "> 0", "Decoder layers."),
    k("model.num_heads", "> 0; divides hidden_size, with an even quotient (the head size)", "Query heads."),
    opt("model.num_kv_heads", "> 0, divides num_heads", "Key/value heads (grouped-query attention).", "num_heads (no grouping)", "2"),
    k("model.tie_embeddings", "", "Share the embedding matrix with the output head."),
    k("model.attention_bias", "", "Biases on the q/k/v projections (Qwen2 style)."),
    k("model.rope_theta", ">= 1, finite", "Base of the rotary position embedding."),
    k("model.rms_norm_eps", "in (0, 1), above 1e-38", "RMSNorm epsilon."),
    k("model.max_position_embeddings", ">= data.seq_len", "Longest sequence the model supports."),
    k("model.init_std", "in (0, 1)", "Standard deviation of the random initial weights (Hugging Face's initializer_range)."),
    // [teacher.train] and [student.train]
    k("train.steps", "> 0", "Optimizer steps."),
    k("train.batch_size", "> 0", "Sequences per micro-batch (the global batch under [distributed])."),
    k("train.grad_accum", "> 0", "Micro-batches accumulated per optimizer step."),
    k("train.lr", "in (0, 1)", "Peak learning rate, reached after the warmup; cosine decay follows."),
    opt("train.min_lr", "in [0, lr]", "Learning rate at the end of the cosine decay.", "lr / 10", "1e-4"),
    opt("train.warmup_steps", "<= steps", "Steps of linear warmup.", "steps / 20", "10"),
    k("train.weight_decay", "in [0, 1)", "Decoupled AdamW weight decay, on matrices only."),
    k("train.beta1", "in [0, 1)", "AdamW first-moment decay."),
    k("train.beta2", "in [0, 1)", "AdamW second-moment decay."),
    k("train.eps", "> 0", "AdamW epsilon."),
    k("train.grad_clip", ">= 0; 0 disables", "Clip the global gradient norm to this value."),
    k("train.eval_every", "0 = only at the end", "Measure the held-out loss every this many steps."),
    k("train.save_every", "0 = only at the end", "Write a periodic checkpoint every this many steps (for `distill resume`)."),
    k("train.on_nonfinite", "", "On a NaN or infinite loss or gradient norm: \"stop\" ends with an error (the last checkpoint stays), \"skip\" drops that step (at most 10 in a row)."),
    // [student]
    opt("student.train_examples", "> 0", "Train the students on the last N training examples only (the transfer set).", "all of them", "1000"),
    k("student.init", "", "Initial weights of the distilled student: random, pruned from the teacher (Minitron), or both (adds a student-pruned stage)."),
    opt("student.prune_layers", "one teacher layer (0-based, increasing) per student layer; needs init \"pruned\" or \"both\"", "Teacher layers the pruned student keeps.", "num_layers layers spread evenly, first and last included", "[0, 3]"),
    k("student.calibration_examples", "> 0 when pruning", "Training examples whose activations rank the teacher's heads, neurons and channels for width pruning."),
    // [distill]
    k("distill.ce_weight", "in [0, 1]", "Weight of the cross-entropy on labels; 1 - ce_weight weighs the KD term. Also read as `alpha`."),
    k("distill.temperature", "> 0", "Softmax temperature of the KD term, which is scaled by T^2."),
    k("distill.loss", "", "The divergence between teacher and student (docs/losses.md)."),
    k("distill.beta", "in [0, 1]", "Weight of the generalized JSD: 0 is forward KL, 1 reverse KL."),
    k("distill.skew", "in [0, 1)", "Skew of skew_forward_kl and skew_reverse_kl."),
    k("distill.fused", "false only with loss \"forward_kl\", top_k 0 and fused_head false", "Use the fused loss kernels; false uses the plain candle composition (forward KL only)."),
    k("distill.top_k", "0, or fewer than the vocabulary size", "Distil from the teacher's top-k tokens per position plus one tail category; 0 uses its full distribution."),
    k("distill.fused_head", "needs fused", "Compute the loss from hidden states and the head weight in chunks, never holding the whole (tokens, vocabulary) logits."),
    k("distill.logit_cache", "needs top_k >= 1", "Write the teacher's top-k log-probabilities once (teacher-logits stage) and train the student from that cache."),
    // [traces]
    k("traces.enabled", "needs data with a verifier (not \"text\")", "Run the DeepSeek-R1 recipe: the teacher samples solutions, the verified ones are kept, students learn from them (docs/r1-recipe.md)."),
    k("traces.samples", "1 to 1024", "Samples the teacher draws per prompt (K)."),
    k("traces.temperature", ">= 0; 0 decodes greedily", "Sampling temperature."),
    k("traces.top_p", "in (0, 1]", "Nucleus (top-p) mass; 1 keeps the whole distribution."),
    k("traces.top_k", "0 keeps every token", "Sample from the k most likely tokens only; top_p then applies to what they hold."),
    k("traces.max_new_tokens", "> 0", "Most tokens per sample; a sample not finished by then is rejected."),
    k("traces.keep", "", "Keep the first correct sample of each prompt, or every correct one."),
    opt("traces.max_completion_tokens", "> 0", "Reject correct samples longer than this many tokens.", "no limit", "64"),
    k("traces.batch_size", "> 0", "Samples decoded together."),
    k("traces.logit_kd", "", "Also train student-kd: the traces plus logit distillation with the [distill] settings."),
    k("traces.oracle", "", "Also train oracle on the task's gold solutions, without the teacher."),
    // [onpolicy]
    k("onpolicy.enabled", "", "Train student-onpolicy: the trained student learns from its own samples, graded token by token by the teacher (GKD; docs/onpolicy.md)."),
    k("onpolicy.lambda", "in [0, 1]", "Fraction of steps on the student's own samples; the others take the student's training data with the same loss."),
    k("onpolicy.beta", "in [0, 1]", "Generalized JSD(beta) between teacher and student: 0 is forward KL, 1 reverse KL."),
    k("onpolicy.estimator", "", "full: the divergence over the teacher's distribution; sampled_token: the reverse KL of the sampled token as a per-token advantage (needs only the teacher's log-probabilities)."),
    k("onpolicy.top_k", ">= 0; estimator = \"full\" only", "The teacher's k most likely tokens per position plus a tail bucket; 0 takes its whole distribution."),
    k("onpolicy.temperature", "> 0", "Sampling temperature of the student's rollouts."),
    k("onpolicy.max_new_tokens", "> 0", "Most tokens per rollout."),
    k("onpolicy.prompts", "", "The problems the student samples on: the students' training problems (the last student.train_examples, which the teacher wrote traces for), every training problem, the teacher's too (a prompt needs no trace), or the prompts of onpolicy.prompts_path."),
    opt("onpolicy.prompts_path", "a JSONL file of {\"prompt\": ...} lines; with prompts = \"file\" only", "The prompts the student samples on when onpolicy.prompts = \"file\", in the format of distill generate --input (an answer or completion on a line is not used). A relative path is relative to the config file.", "none", "\"data/prompts.jsonl\""),
    k("onpolicy.sft_control", "", "Also train student-sft-more: the SFT student trained further on its traces for the student FLOPs student-onpolicy spent, the control for more compute against on-policy data."),
    // [rl]
    k("rl.enabled", "needs [traces] enabled", "Train student-rl with GRPO on the verifier's reward, the RL of DeepSeek-R1-Zero (docs/onpolicy.md)."),
    k("rl.start", "", "The trained stage RL starts from: the baseline (no teacher, the R1-Zero side of the comparison) or the student (RL after SFT)."),
    k("rl.group", "2 to 1024", "Samples per prompt (G); advantages are normalised within each group."),
    k("rl.clip", "in [0, 1)", "Clip range of the probability ratio."),
    k("rl.kl", ">= 0", "Weight of the KL penalty to the starting model; 0 runs no reference model."),
    k("rl.temperature", "> 0", "Sampling temperature of the rollouts."),
    k("rl.max_new_tokens", "> 0", "Most tokens per rollout."),
    // [eval]
    k("eval.examples", "0 skips accuracy", "Held-out problems decoded greedily for the accuracy figure."),
    k("eval.max_new_tokens", "> 0", "Decoding stops after this many new tokens."),
    k("eval.batch_size", "> 0", "Prompts decoded together."),
    k("eval.curve_examples", "0 draws no curve", "The first N held-out problems are also solved at every eval_every step of the student stages, for the report's accuracy-against-dollars chart."),
    // [cost]
    k("cost.cpu_core_hour", ">= 0", "Dollars per CPU core-hour; a CPU run bills one device-hour per core it may use. Set your own."),
    k("cost.default_gpu_hour", ">= 0", "Dollars per GPU-hour for a GPU whose name matches no entry of gpu_hour (with a warning)."),
    k("cost.gpu_hour", "each price >= 0", "Dollars per GPU-hour by name fragment, matched case-insensitively, longest match first; sources and dates in docs/cost.md."),
    opt("cost.peak_flops_per_device", "> 0", "Peak FLOP/s of one device (a GPU, or a CPU core) for the MFU column.", "the datasheet peak of a known GPU; a GEMM probe on a CPU (`distill peak`)", "1.0e12"),
    // [distributed]
    k("distributed.backend", "\"mpi\" needs a build with --features mpi, \"nccl\" one with --features cuda", "Data parallelism across processes started by a launcher (mpirun, srun): none, MPI (CPU) or NCCL (GPUs); docs/distributed.md."),
];

/// The entry of a dotted key (`student.train.lr` -> `train.lr`): the `model` and
/// `train` tables of every stage share one set of entries.
pub fn doc_for(key: &str) -> Option<&'static KeyDoc> {
    const SHARED: [&str; 6] = [
        "teacher.model.",
        "student.model.",
        "teacher.train.",
        "student.train.",
        "onpolicy.train.",
        "rl.train.",
    ];
    let wanted = match SHARED.iter().find_map(|p| key.strip_prefix(p).map(|rest| (p, rest))) {
        Some((prefix, rest)) => {
            let table = prefix.trim_end_matches('.').rsplit('.').next().unwrap_or("");
            format!("{table}.{rest}")
        }
        None => key.to_string(),
    };
    DOCS.iter().find(|d| d.key == wanted)
}
