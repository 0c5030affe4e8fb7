//! Range checks of a parsed config, section by section. Every violation is collected,
//! so that one run reports them all, each naming its key.

use std::path::Path;

use super::*;

impl Config {
    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        let mut v = Validator { path, errors: vec![] };
        v.run(&self.run);
        v.data(&self.data);
        v.tokenizer(self);
        v.teacher(self);
        v.student(self);
        v.distill(self);
        v.traces(self);
        v.onpolicy(self);
        v.rl(self);
        v.eval(&self.eval);
        v.cost(&self.cost);
        v.finish()
    }
}

/// The checks of each section. A section whose rules depend on another takes the whole
/// config.
impl Validator<'_> {
    fn run(&mut self, r: &RunConfig) {
        self.check(
            is_plain_name(&r.name),
            "run.name",
            "must be a plain folder name (no slashes, not . or ..)",
            &r.name,
        );
        self.check(
            r.keep_checkpoints >= 1,
            "run.keep_checkpoints",
            "must be >= 1",
            r.keep_checkpoints,
        );
        self.check(
            parse_dtype(&r.dtype).is_ok(),
            "run.dtype",
            "must be \"auto\", \"f32\", \"bf16\" or \"f16\"",
            &r.dtype,
        );
        self.check(
            Kernels::parse(&r.kernels).is_some(),
            "run.kernels",
            &format!("must be {}", Kernels::NAMES),
            &r.kernels,
        );
        self.check(
            parse_device_name(&r.device).is_ok(),
            "run.device",
            "must be \"cpu\", \"cuda\" or \"cuda:N\"",
            &r.device,
        );
    }

    fn data(&mut self, d: &DataConfig) {
        match d.source {
            DataSource::Arithmetic => {
                self.check(
                    d.train_examples > 0,
                    "data.train_examples",
                    "must be > 0",
                    d.train_examples,
                );
                self.check(
                    d.eval_examples > 0,
                    "data.eval_examples",
                    "must be > 0",
                    d.eval_examples,
                );
                self.check(d.min_steps >= 1, "data.min_steps", "must be >= 1", d.min_steps);
                self.check(
                    d.max_steps >= d.min_steps,
                    "data.max_steps",
                    "must be >= data.min_steps",
                    d.max_steps,
                );
                self.check(d.max_steps <= 12, "data.max_steps", "must be <= 12", d.max_steps);
                self.check(
                    (2..=100_000).contains(&d.max_operand),
                    "data.max_operand",
                    "must be in 2..=100000",
                    d.max_operand,
                );
            }
            DataSource::Jsonl | DataSource::Text => {
                self.check(
                    d.path.is_some(),
                    "data.path",
                    "is required when data.source is \"jsonl\" or \"text\"",
                    "(missing)",
                );
            }
        }
        self.check(
            d.eval_fraction > 0.0 && d.eval_fraction < 1.0,
            "data.eval_fraction",
            "must be in (0, 1)",
            d.eval_fraction,
        );
        self.check(d.seq_len >= 8, "data.seq_len", "must be >= 8", d.seq_len);
    }

    fn tokenizer(&mut self, cfg: &Config) {
        if cfg.tokenizer.path.is_none() {
            self.check(
                (300..=65_536).contains(&cfg.tokenizer.vocab_size),
                "tokenizer.vocab_size",
                "must be in 300..=65536 (byte-level BPE needs 256 bytes plus merges)",
                cfg.tokenizer.vocab_size,
            );
        }
    }

    fn teacher(&mut self, cfg: &Config) {
        let d = &cfg.data;
        let tc = &cfg.teacher;
        if let Some(id) = &tc.hub {
            if let Err(e) = check_repo_id(id) {
                self.check(false, "teacher.hub", &e.to_string(), id);
            }
            self.check(
                tc.checkpoint.is_none(),
                "teacher.hub",
                "and teacher.checkpoint both name a teacher; keep one",
                id,
            );
        }
        if let Some(rev) = &tc.revision {
            if let Err(e) = check_revision(rev) {
                self.check(false, "teacher.revision", &e.to_string(), rev);
            }
            self.check(tc.hub.is_some(), "teacher.revision", "needs teacher.hub", rev);
        }
        if cfg.teacher.checkpoint.is_none() && cfg.teacher.hub.is_none() {
            self.model(&cfg.teacher.model, "teacher.model", d.seq_len);
            self.train(&cfg.teacher.train, "teacher.train");
        }
        if let Some(n) = cfg.teacher.train_examples {
            self.check(n > 0, "teacher.train_examples", "must be > 0", n);
        }
        if tc.matmul_weights == MatmulWeights::Int8 {
            self.int8_teacher(cfg);
        }
    }

    /// `teacher.matmul_weights = "int8"`: CPU, f32, and (for a teacher trained here)
    /// widths the 32-weight blocks divide. A loaded teacher's widths are checked on load.
    fn int8_teacher(&mut self, cfg: &Config) {
        let key = "teacher.matmul_weights";
        let cpu = parse_device_name(&cfg.run.device).is_ok_and(|d| d == DeviceName::Cpu);
        self.check(
            cpu,
            key,
            "\"int8\" runs on the CPU only; use \"dense\" on a GPU",
            &cfg.run.device,
        );
        let f32 = matches!(cfg.run.dtype.as_str(), "auto" | "f32");
        self.check(
            f32,
            key,
            "\"int8\" needs run.dtype \"f32\" (or \"auto\" on the CPU)",
            &cfg.run.dtype,
        );
        if cfg.teacher.checkpoint.is_none() && cfg.teacher.hub.is_none() {
            let m = &cfg.teacher.model;
            let widths = [m.hidden_size, m.intermediate_size];
            self.check(
                widths.iter().all(|w| w % 32 == 0),
                key,
                "\"int8\" needs teacher.model.hidden_size and intermediate_size to be multiples of 32",
                widths,
            );
        }
    }

    fn student(&mut self, cfg: &Config) {
        let d = &cfg.data;
        if let Some(n) = cfg.student.train_examples {
            self.check(n > 0, "student.train_examples", "must be > 0", n);
        }
        let st = &cfg.student;
        if st.init != StudentInit::Random {
            self.check(
                st.calibration_examples > 0,
                "student.calibration_examples",
                "must be > 0",
                st.calibration_examples,
            );
        }
        if let Some(layers) = &st.prune_layers {
            self.check(
                layers.len() == st.model.num_layers,
                "student.prune_layers",
                &format!(
                    "lists {} layers, but student.model.num_layers is {}; list one teacher layer per student layer",
                    layers.len(),
                    st.model.num_layers
                ),
                format!("{layers:?}"),
            );
            self.check(
                st.init != StudentInit::Random,
                "student.prune_layers",
                "needs student.init = \"pruned\" or \"both\"",
                format!("{layers:?}"),
            );
        }
        self.model(&cfg.student.model, "student.model", d.seq_len);
        self.train(&cfg.student.train, "student.train");
    }

    fn distill(&mut self, cfg: &Config) {
        self.check(
            (0.0..=1.0).contains(&cfg.distill.ce_weight),
            "distill.ce_weight",
            "must be in [0, 1]",
            cfg.distill.ce_weight,
        );
        self.check(
            cfg.distill.temperature > 0.0 && cfg.distill.temperature.is_finite(),
            "distill.temperature",
            "must be > 0",
            cfg.distill.temperature,
        );
        let dc = &cfg.distill;
        self.check(
            (0.0..=1.0).contains(&dc.beta),
            "distill.beta",
            "must be in [0, 1]",
            dc.beta,
        );
        self.check(
            (0.0..1.0).contains(&dc.skew),
            "distill.skew",
            "must be in [0, 1)",
            dc.skew,
        );
        self.check(
        dc.fused || dc.loss == LossKind::ForwardKl,
        "distill.fused",
        "can be false only with loss = \"forward_kl\" (the plain reference composition implements no other divergence)",
        dc.fused,
    );
        self.check(
            dc.fused || !dc.fused_head,
            "distill.fused",
            "must be true with fused_head (the fused head runs the fused kernels chunk by chunk)",
            dc.fused,
        );
        self.check(
            dc.fused || dc.top_k == 0,
            "distill.fused",
            "must be true with top_k (the plain reference composition takes full teacher logits only)",
            dc.fused,
        );
        self.check(
            dc.top_k <= 1 << 20,
            "distill.top_k",
            "must be 0 (the full distribution) or a number of tokens below the vocabulary size",
            dc.top_k,
        );
        self.check(
            !dc.logit_cache || dc.top_k >= 1,
            "distill.logit_cache",
            "needs distill.top_k >= 1: the cache stores the teacher's top-k tokens (8 to 64 is usual)",
            dc.logit_cache,
        );
        self.check(
            !dc.logit_cache || !cfg.traces.enabled || cfg.traces.logit_kd,
            "distill.logit_cache",
            "has no student to serve: with [traces] enabled, only traces.logit_kd = true trains from teacher logits",
            dc.logit_cache,
        );
    }

    fn traces(&mut self, cfg: &Config) {
        let d = &cfg.data;
        let t = &cfg.traces;
        if t.enabled {
            self.check(
                (1..=1024).contains(&t.samples),
                "traces.samples",
                "must be in 1..=1024",
                t.samples,
            );
            self.check(
                t.temperature >= 0.0 && t.temperature.is_finite(),
                "traces.temperature",
                "must be >= 0 (0 decodes greedily)",
                t.temperature,
            );
            self.check(
                t.top_p > 0.0 && t.top_p <= 1.0,
                "traces.top_p",
                "must be in (0, 1]",
                t.top_p,
            );
            self.check(
                t.max_new_tokens > 0,
                "traces.max_new_tokens",
                "must be > 0",
                t.max_new_tokens,
            );
            self.check(t.batch_size > 0, "traces.batch_size", "must be > 0", t.batch_size);
            if let Some(m) = t.max_completion_tokens {
                self.check(m > 0, "traces.max_completion_tokens", "must be > 0", m);
            }
            self.check(
            d.source != DataSource::Text,
            "traces.enabled",
            "needs a task with a verifier (data.source = \"arithmetic\", or \"jsonl\" whose completions end in `#### N`); plain text has none",
            t.enabled,
        );
        }
    }

    fn onpolicy(&mut self, cfg: &Config) {
        let o = &cfg.onpolicy;
        if !o.enabled {
            return;
        }
        self.check(
            (0.0..=1.0).contains(&o.lambda),
            "onpolicy.lambda",
            "must be in [0, 1]",
            o.lambda,
        );
        self.check(
            (0.0..=1.0).contains(&o.beta),
            "onpolicy.beta",
            "must be in [0, 1]",
            o.beta,
        );
        self.rollouts(o.temperature, o.max_new_tokens, "onpolicy");
        let file = o.prompts == PromptPool::File;
        self.check(
            !file || o.prompts_path.is_some(),
            "onpolicy.prompts_path",
            "is required when onpolicy.prompts = \"file\"",
            "(missing)",
        );
        self.check(
            file || o.prompts_path.is_none(),
            "onpolicy.prompts_path",
            "is read only when onpolicy.prompts = \"file\"; set that, or remove the path",
            &o.prompts_path,
        );
        self.check(
            o.top_k == 0 || o.estimator == Estimator::Full,
            "onpolicy.top_k",
            "applies to estimator = \"full\" only; the sampled-token estimator reads one log-probability per token",
            o.top_k,
        );
        self.check(
            cfg.distill.fused || o.estimator == Estimator::SampledToken,
            "distill.fused",
            "must be true for [onpolicy] (the plain reference loss implements forward_kl only)",
            cfg.distill.fused,
        );
        self.train(&o.train, "onpolicy.train");
    }

    fn rl(&mut self, cfg: &Config) {
        let r = &cfg.rl;
        if !r.enabled {
            return;
        }
        self.check(
            cfg.traces.enabled,
            "rl.enabled",
            "needs [traces] enabled = true: the reward is the verifier's, and the baseline it starts from is the R1 recipe's",
            r.enabled,
        );
        self.check(
            (2..=1024).contains(&r.group),
            "rl.group",
            "must be in 2..=1024",
            r.group,
        );
        self.check((0.0..1.0).contains(&r.clip), "rl.clip", "must be in [0, 1)", r.clip);
        self.check(r.kl >= 0.0 && r.kl.is_finite(), "rl.kl", "must be >= 0", r.kl);
        self.rollouts(r.temperature, r.max_new_tokens, "rl");
        self.check(
            r.group > 0 && r.train.batch_size.is_multiple_of(r.group.max(1)),
            "rl.train.batch_size",
            "must be a multiple of rl.group (whole groups of samples per micro-batch)",
            r.train.batch_size,
        );
        self.train(&r.train, "rl.train");
    }

    fn rollouts(&mut self, temperature: f64, max_new_tokens: usize, section: &str) {
        self.check(
            temperature > 0.0 && temperature.is_finite(),
            &format!("{section}.temperature"),
            "must be > 0 (the stage learns from samples, not from greedy decoding)",
            temperature,
        );
        self.check(
            max_new_tokens > 0,
            &format!("{section}.max_new_tokens"),
            "must be > 0",
            max_new_tokens,
        );
    }

    fn eval(&mut self, e: &EvalConfig) {
        self.check(
            e.max_new_tokens > 0,
            "eval.max_new_tokens",
            "must be > 0",
            e.max_new_tokens,
        );
        self.check(e.batch_size > 0, "eval.batch_size", "must be > 0", e.batch_size);
    }

    fn cost(&mut self, c: &CostConfig) {
        self.check(
            c.cpu_core_hour >= 0.0 && c.cpu_core_hour.is_finite(),
            "cost.cpu_core_hour",
            "must be >= 0",
            c.cpu_core_hour,
        );
        self.check(
            c.default_gpu_hour >= 0.0 && c.default_gpu_hour.is_finite(),
            "cost.default_gpu_hour",
            "must be >= 0",
            c.default_gpu_hour,
        );
        if let Some(p) = c.peak_flops_per_device {
            self.check(
                p > 0.0 && p.is_finite(),
                "cost.peak_flops_per_device",
                "must be > 0 (FLOP/s of one GPU or one CPU core)",
                p,
            );
        }
        for (k, p) in &c.gpu_hour {
            self.check(
                *p >= 0.0 && p.is_finite(),
                &format!("cost.gpu_hour.{k}"),
                "must be >= 0",
                p,
            );
        }
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
                m.hidden_size.is_multiple_of(m.num_heads),
                &k("num_heads"),
                "must divide hidden_size",
                m.num_heads,
            );
            let head_dim = m.hidden_size / m.num_heads.max(1);
            self.check(
                head_dim.is_multiple_of(2),
                &k("num_heads"),
                "must leave an even head size (hidden_size / num_heads) for rotary embeddings",
                m.num_heads,
            );
            let kv = m.num_kv_heads.unwrap_or(m.num_heads);
            self.check(
                kv > 0 && m.num_heads.is_multiple_of(kv.max(1)),
                &k("num_kv_heads"),
                "must be > 0 and divide num_heads",
                kv,
            );
        }
        // The ranges `ModelConfig::check` holds every model to, config.json's included.
        self.check(
            m.rope_theta.is_finite() && m.rope_theta >= 1.0,
            &k("rope_theta"),
            "must be a finite number >= 1 (Llama uses 10000 or 500000)",
            m.rope_theta,
        );
        self.check(
            m.rms_norm_eps > 0.0 && m.rms_norm_eps < 1.0 && (m.rms_norm_eps as f32) > 0.0,
            &k("rms_norm_eps"),
            "must be in (0, 1) and above 1e-38 (f32), e.g. 1e-5",
            m.rms_norm_eps,
        );
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
pub(super) fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}

/// `ORG/NAME`: each part starts with a letter or digit and holds letters, digits, `-`,
/// `_` and `.` (no `..`), at most 96 characters, as the Hub allows.
pub fn check_repo_id(id: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.contains("..")
    };
    match id.split_once('/') {
        Some((org, name)) if part_ok(org) && part_ok(name) => Ok(()),
        _ => Err(Error::Invalid(format!(
            "hub model id {id:?} must look like ORG/NAME (letters, digits, - _ . in each part), \
             e.g. HuggingFaceTB/SmolLM2-135M-Instruct; for a folder on disk use `checkpoint` instead"
        ))),
    }
}

/// A branch, tag or commit: letters, digits, `-_./`, no `..` component, not absolute.
pub fn check_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 256
        && !rev.starts_with('/')
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "hub revision {rev:?} must be a branch, tag or commit hash (letters, digits, - _ . /, no ..)"
        )))
    }
}
