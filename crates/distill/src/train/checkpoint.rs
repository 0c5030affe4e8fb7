//! Checkpoint directories that stand on their own and load in Hugging Face
//! transformers and candle-transformers as they are:
//!
//! ```text
//! model.safetensors        weights, HF names, f32, metadata {"format": "pt"}
//! config.json              HF LlamaConfig (or Qwen2Config with q/k/v biases)
//! generation_config.json   bos/eos/pad ids
//! tokenizer.json           the tokenizer
//! tokenizer_config.json    what AutoTokenizer needs to load it
//! distill.toml             the resolved run config
//! trainer_state.json       step, data position, seed, stage totals
//! optimizer.safetensors    AdamW moments ("m.<name>", "v.<name>")
//! ```
//!
//! A directory is written under a temporary name, every file fsynced, then
//! renamed into place, so a crash never leaves half a checkpoint under the
//! real name.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsio::{check_safetensors_header, safetensors_shapes, sha256_hex, sync_dir, write_file};
use crate::model::{Llama, ModelConfig};
use crate::prepare::tokenizer::Tokenizer;
use crate::train::optim::AdamW;

/// Where a training stage stood when the checkpoint was written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub stage: String,
    /// Optimiser steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Micro-batches consumed: the data position (the order is a pure function of it and the seed).
    pub micro_batches: usize,
    /// Seed of the data order and of the initial weights.
    pub seed: u64,
    pub tokens_seen: usize,
    pub last_loss: Option<f32>,
    /// FLOPs of the stage so far (trained model) and of its teacher's forward
    /// passes, so that a resumed stage reports the whole stage's work.
    #[serde(default)]
    pub flops: f64,
    #[serde(default)]
    pub teacher_flops: f64,
    /// The sampling and scoring of an on-policy stage so far.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rollout: crate::train::rollout::RolloutTotals,
    /// SHA-256 of `model.safetensors` and `optimizer.safetensors` as written,
    /// so that a damaged checkpoint is detected before training resumes from it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Everything a checkpoint holds beyond the model.
pub struct SaveExtras<'a> {
    pub tokenizer: &'a Tokenizer,
    pub resolved_config: &'a str,
    pub state: Option<&'a TrainerState>,
    pub optimizer: Option<&'a AdamW>,
}

/// Writes `model` and `extras` to `dir` atomically (temp dir, fsync, rename).
pub fn save(dir: &Path, model: &Llama, extras: &SaveExtras) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir
        .file_name()
        .ok_or_else(|| err(dir, "checkpoint path has no folder name"))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    if let Err(e) = write_contents(&tmp, model, extras) {
        // A full disk (or any failed write) must not leave a half checkpoint taking
        // the space the next attempt needs; the checkpoint in `dir`, if any, is untouched.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err(
            dir,
            format!(
                "could not be written ({e}); nothing was replaced, so the previous checkpoint is intact. \
                 Free disk space (or raise the file-size limit) and continue with `distill resume RUN_DIR`"
            ),
        ));
    }

    // Swap into place: the old copy is only removed once the new one is live.
    let old = parent.join(format!(".{name}.old"));
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        std::fs::rename(dir, &old).at(dir)?;
    }
    std::fs::rename(&tmp, dir).at(dir)?;
    sync_dir(parent);
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// The files of a checkpoint, into the (temporary) folder `tmp`.
fn write_contents(tmp: &Path, model: &Llama, extras: &SaveExtras) -> Result<()> {
    write_safetensors(&tmp.join("model.safetensors"), &model.tensors()?)?;
    let cfg = &model.cfg;
    write_file(&tmp.join("config.json"), &pretty(&cfg.to_hf_json())?)?;
    let gen = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    });
    write_file(&tmp.join("generation_config.json"), &pretty(&gen)?)?;
    let tok_path = tmp.join("tokenizer.json");
    extras.tokenizer.save(&tok_path)?;
    File::open(&tok_path).and_then(|f| f.sync_all()).at(&tok_path)?;
    let tok_cfg = extras.tokenizer.hf_config(cfg.max_position_embeddings);
    write_file(&tmp.join("tokenizer_config.json"), &pretty(&tok_cfg)?)?;
    write_file(&tmp.join("distill.toml"), extras.resolved_config.as_bytes())?;
    if let Some(opt) = extras.optimizer {
        let mut moments = BTreeMap::new();
        for (k, t) in &opt.m {
            moments.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &opt.v {
            moments.insert(format!("v.{k}"), t.clone());
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), opt.step.to_string());
        write_safetensors_meta(&tmp.join("optimizer.safetensors"), &moments, meta)?;
    }
    // The training state goes last and carries the checksums of the weights
    // and moments written above.
    if let Some(state) = extras.state {
        let mut state = state.clone();
        state.checksums = checksums(tmp)?;
        let json = serde_json::to_value(&state).map_err(|e| Error::Invalid(e.to_string()))?;
        write_file(&tmp.join("trainer_state.json"), &pretty(&json)?)?;
    }
    sync_dir(tmp);
    Ok(())
}

fn pretty(v: &serde_json::Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    s.push(b'\n');
    Ok(s)
}

const CHECKSUMMED: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// SHA-256 of the weights and optimizer files present in `dir`.
fn checksums(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in CHECKSUMMED {
        let p = dir.join(f);
        if p.is_file() {
            out.insert(f.to_string(), sha256_hex(&p)?);
        }
    }
    Ok(out)
}

/// Reads `trainer_state.json` and checks the weights and optimizer files
/// against the checksums it records. A checkpoint that fails this must not be
/// resumed from.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let sp = require(dir, "trainer_state.json")?;
    let text = std::fs::read_to_string(&sp).at(&sp)?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| err(&sp, format!("malformed: {e}")))?;
    for f in CHECKSUMMED {
        let want = state
            .checksums
            .get(f)
            .ok_or_else(|| err(dir, format!("trainer_state.json has no checksum for {f}")))?;
        let got = sha256_hex(&require(dir, f)?)?;
        if &got != want {
            return Err(err(
                dir,
                format!("{f} does not match the checksum in trainer_state.json (the file is damaged)"),
            ));
        }
    }
    Ok(state)
}

/// The content id of a teacher: `sha256:` and the full SHA-256 of every byte of its
/// weights, read in streams: the GGUF file, `model.safetensors`, or every shard the
/// sharded index lists, in the index's order. Records made from a teacher (traces, the
/// logit cache) carry it, so that they trace to the exact weights, and shards of
/// different teachers are refused together (`distill merge`, a reopened cache).
pub fn content_id(dir: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let files: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else if !dir.join("model.safetensors").is_file() && dir.join(crate::prepare::hub::SHARD_INDEX).is_file() {
        let index = dir.join(crate::prepare::hub::SHARD_INDEX);
        crate::prepare::hub::shard_files(&index)?
            .iter()
            .map(|f| require(dir, f))
            .collect::<Result<_>>()?
    } else {
        vec![require(dir, "model.safetensors")?]
    };
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in &files {
        let mut f = File::open(path).at(path)?;
        loop {
            let n = f.read(&mut buf).at(path)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
    }
    Ok(format!("sha256:{:x}", hash.finalize()))
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors_meta(path, tensors, meta)
}

fn write_safetensors_meta(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| err(path, format!("cannot build tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(path, format!("cannot serialise: {e}")))?;
    write_file(path, &bytes)
}

fn read_safetensors(path: &Path, device: &Device) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    check_safetensors_header(path)?;
    let bytes = std::fs::read(path).at(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        err(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| err(path, format!("cannot read tensors: {e}")))?;
    Ok((tensors.into_iter().collect(), meta))
}

fn require(dir: &Path, file: &str) -> Result<PathBuf> {
    let p = dir.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(err(
            dir,
            format!(
                "{file} is missing; a checkpoint directory needs model.safetensors, config.json and tokenizer.json"
            ),
        ))
    }
}

/// Whether `path` is a GGUF file rather than a checkpoint directory.
fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `load` for a model that samples and scores, with the matmul weights held as `weights`
/// says: a GGUF file loads frozen, tensor by tensor, straight into its f32 or int8 weights
/// (no second copy of the model); a checkpoint directory is loaded, then converted
/// (`Llama::with_matmul_weights`).
pub fn load_with(dir: &Path, device: &Device, weights: crate::config::MatmulWeights) -> Result<(Llama, Tokenizer)> {
    if is_gguf(dir) {
        if weights != crate::config::MatmulWeights::Dense && !device.is_cpu() {
            return Err(err(
                dir,
                "int8 matmul weights run on the CPU only in this version; use dense",
            ));
        }
        return crate::model::gguf::load_gguf_with(dir, device, weights);
    }
    let (model, tok) = load(dir, device)?;
    Ok((model.with_matmul_weights(weights)?, tok))
}

/// Loads the model and tokenizer of a checkpoint directory (ours, or a Hugging
/// Face Llama/Qwen2 directory with `model.safetensors` or sharded weights), or of a
/// GGUF file (a quantized Llama, dequantized to f32, `model::gguf`).
pub fn load(dir: &Path, device: &Device) -> Result<(Llama, Tokenizer)> {
    if is_gguf(dir) {
        return crate::model::gguf::load_gguf(dir, device);
    }
    if !dir.is_dir() {
        return Err(err(
            dir,
            "not a directory (expected a checkpoint directory such as runs/NAME/student)",
        ));
    }
    let cfg_path = require(dir, "config.json")?;
    let index = dir.join(crate::prepare::hub::SHARD_INDEX);
    let weights = if !dir.join("model.safetensors").is_file() && index.is_file() {
        index.clone()
    } else {
        require(dir, "model.safetensors")?
    };
    let tok_path = require(dir, "tokenizer.json")?;
    let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(&cfg_path, format!("not valid JSON: {e}")))?;
    let cfg = ModelConfig::from_hf_json(&json, &cfg_path)?;
    let tokenizer = Tokenizer::load(&tok_path)?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(err(
            dir,
            format!(
                "tokenizer.json has {} tokens but config.json vocab_size is {}; the files come from different models",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ),
        ));
    }
    check_generation_config(dir, cfg.vocab_size)?;
    let files = if weights == index {
        // Sharded (Hugging Face's layout for large models): the index lists the shards.
        let mut files = Vec::new();
        for shard in crate::prepare::hub::shard_files(&index)? {
            let p = dir.join(&shard);
            if !p.is_file() {
                return Err(err(&index, format!("lists {shard}, which is not in {}", dir.display())));
            }
            files.push(p);
        }
        files
    } else {
        vec![weights.clone()]
    };
    // Every size config.json gives is checked against the tensors' shapes, read from the
    // headers, before any tensor is read or anything sized from the config.
    let mut shapes = BTreeMap::new();
    for p in &files {
        shapes.extend(safetensors_shapes(p)?);
    }
    cfg.check_shapes(&shapes).map_err(|m| {
        err(
            &cfg_path,
            format!(
                "{m} in {}: config.json does not describe these weights (files of different models, or an edited \
                 config.json); restore config.json from the model's source",
                weights.display()
            ),
        )
    })?;
    let mut tensors = BTreeMap::new();
    for p in &files {
        tensors.extend(read_safetensors(p, device)?.0);
    }
    let model = Llama::from_tensors(cfg, tensors, device).map_err(|e| err(&weights, e.to_string()))?;
    Ok((model, tokenizer))
}

/// Checks `generation_config.json`, when the directory has one (`hf_json::check_generation_config`).
fn check_generation_config(dir: &Path, vocab_size: usize) -> Result<()> {
    let p = dir.join("generation_config.json");
    if !p.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&p).at(&p)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(&p, format!("not valid JSON: {e}")))?;
    crate::model::hf_json::check_generation_config(&json, &p, vocab_size)
}

/// Reads `trainer_state.json` and the optimiser moments of a checkpoint.
pub fn load_training_state(dir: &Path, opt: &mut AdamW, device: &Device) -> Result<TrainerState> {
    let sp = require(dir, "trainer_state.json")?;
    let text = std::fs::read_to_string(&sp).at(&sp)?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| err(&sp, format!("malformed: {e}")))?;
    let op = require(dir, "optimizer.safetensors")?;
    let (mut tensors, meta) = read_safetensors(&op, device)?;
    opt.step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err(&op, "metadata key `step` is missing"))?;
    for (prefix, map) in [("m", &mut opt.m), ("v", &mut opt.v)] {
        for (name, slot) in map.iter_mut() {
            let t = tensors
                .remove(&format!("{prefix}.{name}"))
                .ok_or_else(|| err(&op, format!("moment {prefix}.{name} is missing")))?;
            if t.dims() != slot.dims() {
                return Err(err(
                    &op,
                    format!(
                        "moment {prefix}.{name} has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    ),
                ));
            }
            *slot = t;
        }
    }
    Ok(state)
}
