//! The run configuration: TOML in, validated `Config` out.
//!
//! Every key has a documented default (`#[serde(default)]` plus the `Default`
//! impls below); unknown keys are rejected with the key's name and the file.
//! `Config::load` validates the whole file before any heavy work starts, and
//! `Config::to_toml` writes the resolved config (defaults filled in) that is
//! saved beside every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod keys;
mod onpolicy;
pub mod reference;
pub mod schema;
mod sections;
mod validate;

pub use onpolicy::*;
pub use sections::*;
use validate::is_plain_name;
pub use validate::{check_repo_id, check_revision};

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
    pub onpolicy: OnPolicyConfig,
    pub rl: RlConfig,
    pub eval: EvalConfig,
    pub cost: CostConfig,
    /// Data parallelism across processes: `backend = "none" | "mpi" | "nccl"`.
    pub distributed: DistributedConfig,
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
    pub fn kernels(&self) -> Result<Kernels> {
        Kernels::parse(&self.run.kernels)
            .ok_or_else(|| Error::Invalid(format!("kernels {:?}: use {}", self.run.kernels, Kernels::NAMES)))
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("cannot read it ({e}); `distill init FILE` writes a config with every key at its default"),
        })?;
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
        rebase(&mut cfg.onpolicy.prompts_path);
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
        assert_eq!(
            crate::loss::Divergence::of(&c.distill),
            crate::loss::Divergence::Jsd { beta: 0.25 }
        );
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
    fn an_onpolicy_prompts_file_needs_its_path_and_a_path_needs_the_file_pool() -> Result<()> {
        let on = "[onpolicy]\nenabled = true\n";
        let err = parse(&format!("{on}prompts = \"file\"\n")).unwrap_err().to_string();
        assert!(
            err.contains("onpolicy.prompts_path") && err.contains("required"),
            "{err}"
        );
        let err = parse(&format!("{on}prompts_path = \"p.jsonl\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("onpolicy.prompts_path") && err.contains("prompts = \"file\""),
            "{err}"
        );
        let c = parse(&format!("{on}prompts = \"file\"\nprompts_path = \"p.jsonl\"\n"))?;
        assert_eq!(c.onpolicy.prompts, PromptPool::File);
        assert_eq!(
            parse(&format!("{on}prompts = \"train\"\n"))?.onpolicy.prompts,
            PromptPool::Train
        );
        assert_eq!(parse(on)?.onpolicy.prompts, PromptPool::Student, "the default");
        let err = parse(&format!("{on}prompts = \"all\"\n")).unwrap_err().to_string();
        assert!(err.contains("prompts") && err.contains("train"), "{err}");
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            format!("{on}prompts = \"file\"\nprompts_path = \"no-such-dir/p.jsonl\"\n"),
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let c = Config::load(&file)?;
        assert_eq!(
            c.onpolicy.prompts_path,
            Some(dir.path().join("no-such-dir/p.jsonl")),
            "relative to the config file"
        );
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

    #[test]
    fn int8_teacher_weights_are_checked_against_device_dtype_and_widths() -> Result<()> {
        let c =
            parse("[teacher]\nmatmul_weights = \"int8\"\n[teacher.model]\nhidden_size = 64\nintermediate_size = 96\n")?;
        assert_eq!(c.teacher.matmul_weights, MatmulWeights::Int8);
        for (extra, key_or_word) in [
            ("[run]\ndevice = \"cuda\"\n", "CPU only"),
            ("[run]\ndtype = \"bf16\"\n", "run.dtype"),
            (
                "[teacher.model]\nhidden_size = 64\nintermediate_size = 100\n",
                "multiples of 32",
            ),
        ] {
            let err = parse(&format!("{extra}[teacher]\nmatmul_weights = \"int8\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("teacher.matmul_weights") && err.contains(key_or_word),
                "{err}"
            );
        }
        let err = parse("[teacher]\nmatmul_weights = \"q4\"\n").unwrap_err().to_string();
        assert!(err.contains("matmul_weights") && err.contains("int8"), "{err}");
        Ok(())
    }

    #[test]
    fn kernels_names_parse() {
        assert_eq!(Kernels::parse("fused"), Some(Kernels::Fused));
        assert_eq!(Kernels::parse("fast"), None);
    }

    #[test]
    fn parses_device_names() -> Result<()> {
        assert_eq!(parse_device_name("cpu")?, DeviceName::Cpu);
        assert_eq!(parse_device_name("cuda")?, DeviceName::Cuda(0));
        assert_eq!(parse_device_name("cuda:3")?, DeviceName::Cuda(3));
        assert!(parse_device_name("gpu").is_err());
        assert!(parse_device_name("cuda:x").is_err());
        Ok(())
    }
}
