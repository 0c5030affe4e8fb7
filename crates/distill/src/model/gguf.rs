//! Loads a GGUF Llama (llama.cpp's format, e.g. SmolLM2-135M-Instruct Q4_1) as
//! our `Llama` (trainable, or frozen for sampling and scoring, in f32 or int8 matmul
//! weights), with its byte-level BPE tokenizer rebuilt from the GGUF metadata.
//!
//! candle-transformers' `quantized_llama` runs such files but returns only the
//! last position's logits and has no backward pass; distillation needs the
//! teacher's logits at every position, so here every tensor is dequantized to
//! f32 and renamed to Hugging Face's names. Two conversions undo what
//! llama.cpp's `convert_hf_to_gguf.py` did to a Hugging Face checkpoint:
//!
//! - names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...
//! - q/k rows: llama.cpp applies RoPE to interleaved pairs (2i, 2i+1) ("NORM"
//!   rope, candle's `rope_i`), Hugging Face to (i, i + D/2) (rotate-half). The
//!   converter therefore permutes the rows of each head of `q_proj` and `k_proj`
//!   (`llama_cpp_permute` below); `llama_cpp_unpermute` takes them back, after
//!   which our rotate-half RoPE computes exactly what llama.cpp computes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor, Var};
use rayon::iter::{ParallelBridge, ParallelIterator};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::config::MatmulWeights;
use crate::error::{Error, IoContext, Result};
use crate::kernels::int8::Int8Weight;
use crate::model::{quant, Llama, ModelConfig};
use crate::prepare::tokenizer::Tokenizer;

/// Magic (4 bytes) + version (u32) + tensor count (u64) + metadata count (u64).
const HEADER_BYTES: u64 = 24;

/// GGUF token types (llama.cpp's `llama_token_type`) that are added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Loads a GGUF Llama checkpoint: the model with every tensor dequantized to f32
/// on `device` (trainable, logits at every position) and its tokenizer.
///
/// Supported: `general.architecture = "llama"` without experts or RoPE scaling
/// tensors, any tensor type candle can dequantize, and `tokenizer.ggml.model =
/// "gpt2"` (byte-level BPE) with the pre-tokenizers in `pre_tokenizer`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(Llama, Tokenizer)> {
    load_gguf_as(path, device, MatmulWeights::Dense, Use::Train)
}

/// `load_gguf` for a model that only samples and scores: frozen, with the matmul weights
/// held as `weights` says. Each tensor is converted as it is read and kept as it is, so no
/// second copy of the weights is ever made (with `Int8`, no f32 copy of the matmuls).
pub fn load_gguf_with(path: &Path, device: &Device, weights: MatmulWeights) -> Result<(Llama, Tokenizer)> {
    load_gguf_as(path, device, weights, Use::Sample)
}

/// What a loaded GGUF model is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Trainable: the f32 weights become the model's variables.
    Train,
    /// Frozen: it samples and scores.
    Sample,
}

fn load_gguf_as(path: &Path, device: &Device, weights: MatmulWeights, into: Use) -> Result<(Llama, Tokenizer)> {
    let bad = |msg: String| damaged(path, msg);
    let file_len = check_header(path)?;
    let mut reader = BufReader::new(File::open(path).at(path)?);
    let content = Content::read(&mut reader).map_err(|e| {
        bad(format!(
            "cannot read the GGUF header ({e}); the file is damaged or truncated: download it again \
             (scripts/fetch-teacher.sh fetches the SmolLM2 teacher)"
        ))
    })?;
    let md = Meta {
        md: &content.metadata,
        path,
    };

    let cfg = model_config(&md, &content)?;
    let tokenizer = tokenizer_from_meta(&md, cfg.vocab_size)?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    // The file is read in order, one tensor at a time, and the tensors read are converted
    // on every thread of the pool: dequantizing and first touching the f32 or int8
    // weights is most of a load.
    let read = names
        .into_iter()
        .map(|name| read_tensor(&content, &mut reader, name, &cfg, file_len, path))
        .enumerate();
    let mut converted: Vec<(usize, Result<Converted>)> = read
        .par_bridge()
        .map(|(k, r)| (k, r.and_then(|t| convert(t, device, weights, into, &cfg, path))))
        .collect();
    // In the file's (sorted) order, so that a damaged file always reports the same tensor.
    converted.sort_by_key(|(k, _)| *k);
    let (mut tensors, mut int8) = (BTreeMap::new(), BTreeMap::new());
    let mut from: HashMap<String, String> = HashMap::new();
    for (_, c) in converted {
        let c = c?;
        if let Some(other) = from.insert(c.hf.clone(), c.gguf.clone()) {
            return Err(bad(format!(
                "tensors `{other}` and `{}` both map to `{}`; the file is damaged",
                c.gguf, c.hf
            )));
        }
        if let Some(q) = c.int8 {
            int8.insert(c.hf.clone(), q);
        }
        if let Some(t) = c.dense {
            tensors.insert(c.hf, t);
        }
    }
    let model = match into {
        Use::Sample => Llama::from_dense_and_int8(cfg, tensors, int8, device),
        Use::Train => Llama::from_tensors(cfg, tensors, device),
    };
    Ok((model.map_err(|e| bad(e.to_string()))?, tokenizer))
}

/// The error of a GGUF file that cannot be loaded, naming it.
fn damaged(path: &Path, msg: String) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

/// One tensor of the file as stored, with the Hugging Face name it maps to.
struct ReadTensor {
    hf: String,
    gguf: String,
    permute_heads: Option<usize>,
    q: candle_core::quantized::QTensor,
}

/// Where a tensor went: the dense tensor (the model's variable, or a frozen model's
/// tensor), its int8 matmul weight, or both for a tied embedding.
struct Converted {
    hf: String,
    gguf: String,
    dense: Option<Tensor>,
    int8: Option<Int8Weight>,
}

/// Reads tensor `name` after checking its shape and extent against the file.
fn read_tensor(
    content: &Content,
    reader: &mut BufReader<File>,
    name: &str,
    cfg: &ModelConfig,
    file_len: u64,
    path: &Path,
) -> Result<ReadTensor> {
    let bad = |msg: String| damaged(path, msg);
    let info = &content.tensor_infos[name];
    // candle checks the block size and the file length too, but computes the element
    // count with an unchecked product; check first so that a damaged shape is an error,
    // never an overflow.
    let elems = info
        .shape
        .dims()
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n % info.ggml_dtype.block_size() == 0)
        .ok_or_else(|| bad(format!("tensor `{name}` has an invalid shape {:?}", info.shape.dims())))?;
    let bytes = (elems / info.ggml_dtype.block_size()) as u64 * info.ggml_dtype.type_size() as u64;
    let end = content
        .tensor_data_offset
        .checked_add(info.offset)
        .and_then(|s| s.checked_add(bytes));
    if end.is_none_or(|end| end > file_len) {
        return Err(bad(format!(
            "tensor `{name}` ({bytes} bytes at offset {}) lies past the end of the file ({file_len} bytes): \
             the file is truncated; download it again",
            info.offset
        )));
    }
    let Some((hf, permute_heads)) = hf_name(name, cfg) else {
        return Err(bad(format!(
            "tensor `{name}` has no counterpart in a Hugging Face Llama (RoPE scaling, experts and other \
             extensions are not supported)"
        )));
    };
    let q = content
        .tensor(reader, name, &Device::Cpu)
        .map_err(|e| bad(format!("cannot read tensor `{name}`: {e}")))?;
    Ok(ReadTensor {
        hf,
        gguf: name.to_string(),
        permute_heads,
        q,
    })
}

/// Dequantizes a tensor read from the file (undoing llama.cpp's head permutation) into
/// what `weights` asks of it.
fn convert(
    t: ReadTensor,
    device: &Device,
    weights: MatmulWeights,
    into: Use,
    cfg: &ModelConfig,
    path: &Path,
) -> Result<Converted> {
    let bad = |msg: String| damaged(path, msg);
    let name = &t.gguf;
    let mut w =
        t.q.dequantize(&Device::Cpu)
            .map_err(|e| bad(format!("cannot dequantize tensor `{name}` ({:?}): {e}", t.q.dtype())))?;
    drop(t.q); // the file's blocks are done with: free them before the copies below
    if let Some(heads) = t.permute_heads {
        w = llama_cpp_unpermute(&w, heads).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
    }
    let (hf, gguf) = (t.hf, t.gguf);
    if weights == MatmulWeights::Int8 && quant::is_matmul(&hf, cfg) {
        let q = quant::int8_weight(&hf, &w).map_err(|e| bad(e.to_string()))?;
        // A tied embedding also stays dense, for the lookup.
        let dense = (hf == quant::EMBED).then_some(w);
        return Ok(Converted {
            hf,
            gguf,
            dense,
            int8: Some(q),
        });
    }
    if device.is_cpu() && into == Use::Train {
        // The model's own copy now, while this tensor is dequantized: `from_tensors` keeps
        // a variable as it is, so the f32 weights are never held twice.
        w = Var::from_tensor(&w)
            .map_err(|e| bad(format!("tensor `{gguf}`: {e}")))?
            .into_inner();
    }
    Ok(Converted {
        hf,
        gguf,
        dense: Some(w),
        int8: None,
    })
}

/// The row permutation llama.cpp's `convert_hf_to_gguf.py` applies to a Hugging
/// Face `q_proj`/`k_proj` weight (`n_heads` = heads of that projection):
/// `w.reshape(n_heads, 2, D/2, in).swapaxes(1, 2).reshape(w.shape)`, so that
/// row `h*D + 2j + s` of the result is row `h*D + s*D/2 + j` of `w`.
/// w: (n_heads * D, in) -> (n_heads * D, in).
pub fn llama_cpp_permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols, hd) = head_rows(w, n_heads)?;
    Ok(w.reshape((n_heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of `llama_cpp_permute`: GGUF row order (interleaved RoPE pairs)
/// back to Hugging Face's (rotate-half pairs). w: (n_heads * D, in) -> same.
pub fn llama_cpp_unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols, hd) = head_rows(w, n_heads)?;
    Ok(w.reshape((n_heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// (rows, cols, head_dim) of a per-head projection weight, checked.
fn head_rows(w: &Tensor, n_heads: usize) -> Result<(usize, usize, usize)> {
    let (rows, cols) = w.dims2()?;
    if n_heads == 0 || rows % n_heads != 0 || !(rows / n_heads).is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "cannot split {rows} rows into {n_heads} heads of even size for the q/k permutation"
        )));
    }
    Ok((rows, cols, rows / n_heads))
}

/// Checks the size and magic before the parser sees the file, so that an empty
/// download or an HTML error page is reported as such.
fn check_header(path: &Path) -> Result<u64> {
    let len = std::fs::metadata(path).at(path)?.len();
    let bad = |msg: String| damaged(path, msg);
    if len < HEADER_BYTES {
        return Err(bad(format!(
            "only {len} bytes, too short for a GGUF header; the download is incomplete: download it again \
             (scripts/fetch-teacher.sh fetches the SmolLM2 teacher)"
        )));
    }
    let mut magic = [0u8; 4];
    File::open(path).at(path)?.read_exact(&mut magic).at(path)?;
    if &magic != b"GGUF" {
        return Err(bad(format!(
            "not a GGUF file: it starts with {magic:02x?}, a GGUF file with the bytes `GGUF`"
        )));
    }
    Ok(len)
}

/// Typed access to GGUF metadata, with errors that name the key and the file.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| self.err(format!("metadata key `{key}` is missing; is this a Llama GGUF file?")))
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            self.err(format!(
                "metadata key `{key}` is a {:?}, expected a non-negative integer",
                v.value_type()
            ))
        })
    }

    fn uint(&self, key: &str) -> Result<usize> {
        self.get(key)?;
        self.opt_uint(key)?
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(format!("metadata key `{key}` does not fit in usize")))
    }

    fn opt_id(&self, key: &str) -> Result<Option<u32>> {
        self.opt_uint(key)?
            .map(|n| u32::try_from(n).map_err(|_| self.err(format!("metadata key `{key}` = {n} is not a token id"))))
            .transpose()
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(format!(
                "metadata key `{key}` is a {:?}, expected a float",
                v.value_type()
            ))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!(
                "metadata key `{key}` is a {:?}, expected a string",
                v.value_type()
            ))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let not = || self.err(format!("metadata key `{key}` is not an array of strings"));
        match self.get(key)? {
            Value::Array(vs) => vs
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(not()),
                })
                .collect(),
            _ => Err(not()),
        }
    }

    fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let not = || self.err(format!("metadata key `{key}` is not an array of integers"));
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let Value::Array(vs) = v else {
            return Err(not());
        };
        vs.iter()
            .map(|v| match *v {
                Value::I8(x) => Ok(x as i64),
                Value::I16(x) => Ok(x as i64),
                Value::I32(x) => Ok(x as i64),
                Value::I64(x) => Ok(x),
                Value::U8(x) => Ok(x as i64),
                Value::U16(x) => Ok(x as i64),
                Value::U32(x) => Ok(x as i64),
                _ => Err(not()),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// Our `ModelConfig` from the `llama.*` metadata and the tensor shapes.
fn model_config(md: &Meta, content: &Content) -> Result<ModelConfig> {
    let arch = md.opt_str("general.architecture")?.unwrap_or("");
    if arch != "llama" {
        return Err(md.err(format!(
            "general.architecture is {arch:?}; only \"llama\" GGUF files are supported"
        )));
    }
    if md.opt_uint("llama.expert_count")?.unwrap_or(0) > 0 {
        return Err(md.err("mixture-of-experts Llama files are not supported".into()));
    }
    let hidden = md.uint("llama.embedding_length")?;
    let heads = md.uint("llama.attention.head_count")?;
    let kv_heads = md
        .opt_uint("llama.attention.head_count_kv")?
        .map_or(heads, |n| n as usize);
    if heads == 0 || hidden % heads != 0 || (hidden / heads) % 2 != 0 {
        return Err(md.err(format!(
            "llama.embedding_length {hidden} is not divisible into {heads} heads of even size"
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(md.err(format!(
            "llama.attention.head_count_kv {kv_heads} does not divide llama.attention.head_count {heads}"
        )));
    }
    let head_dim = hidden / heads;
    if let Some(rope_dim) = md.opt_uint("llama.rope.dimension_count")? {
        if rope_dim as usize != head_dim {
            return Err(md.err(format!(
                "llama.rope.dimension_count {rope_dim} != head size {head_dim}; partial rotary embeddings are \
                 not supported"
            )));
        }
    }
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| md.err("tensor `token_embd.weight` is missing; is this a Llama GGUF file?".into()))?;
    let (vocab_size, embed_dim) = embed.shape.dims2().map_err(|_| {
        md.err(format!(
            "token_embd.weight has shape {:?}, expected 2-D",
            embed.shape.dims()
        ))
    })?;
    if embed_dim != hidden {
        return Err(md.err(format!(
            "token_embd.weight has width {embed_dim}, llama.embedding_length says {hidden}"
        )));
    }
    let eos = md
        .opt_id("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| md.err("metadata key `tokenizer.ggml.eos_token_id` is missing".into()))?;
    Ok(ModelConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: md.uint("llama.feed_forward_length")?,
        num_hidden_layers: md.uint("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        rms_norm_eps: md.opt_float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: md.opt_float("llama.rope.freq_base")?.unwrap_or(10_000.0),
        max_position_embeddings: md.uint("llama.context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: false,
        bos_token_id: md.opt_id("tokenizer.ggml.bos_token_id")?.unwrap_or(eos),
        eos_token_id: eos,
        pad_token_id: md.opt_id("tokenizer.ggml.padding_token_id")?.unwrap_or(eos),
    })
}

/// GGUF tensor name -> (Hugging Face name, heads to un-permute for q/k).
fn hf_name(gguf: &str, cfg: &ModelConfig) -> Option<(String, Option<usize>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= cfg.num_hidden_layers {
        return None;
    }
    let (hf, heads) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(cfg.num_attention_heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(cfg.num_key_value_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), heads))
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (see its
/// `llm_tokenizer_bpe`), as a `tokenizers` pre-tokenizer. Supported:
/// GPT-2's regex ("gpt2", and "default"/absent, which older converters wrote
/// for byte-level BPE models), and single digits followed by GPT-2's regex
/// ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva").
fn pre_tokenizer(md: &Meta, pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre.unwrap_or("default") {
        "default" | "gpt2" | "mpt" | "olmo" | "jais" => Ok(byte_level.into()),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            let seq: Vec<PreTokenizerWrapper> = vec![Digits::new(true).into(), byte_level.into()];
            Ok(Sequence::new(seq).into())
        }
        other => Err(md.err(format!(
            "tokenizer.ggml.pre = {other:?} is not supported (its pre-tokenizer regex differs); supported: \
             gpt2, default, smollm, starcoder, refact, command-r, codeshell, exaone, minerva, mpt, olmo, jais"
        ))),
    }
}

/// Rebuilds the byte-level BPE tokenizer from `tokenizer.ggml.*`.
fn tokenizer_from_meta(md: &Meta, model_vocab: usize) -> Result<Tokenizer> {
    let kind = md.opt_str("tokenizer.ggml.model")?.unwrap_or("(missing)");
    if kind != "gpt2" {
        return Err(md.err(format!(
            "tokenizer.ggml.model is {kind:?}; only \"gpt2\" (byte-level BPE) tokenizers are supported, not \
             SentencePiece (\"llama\") or others"
        )));
    }
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() || tokens.len() > model_vocab {
        return Err(md.err(format!(
            "tokenizer.ggml.tokens has {} tokens; the embedding has {model_vocab} rows",
            tokens.len()
        )));
    }
    let types = md.opt_ints("tokenizer.ggml.token_type")?;
    if types.as_ref().is_some_and(|t| t.len() != tokens.len()) {
        return Err(md.err("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length".into()));
    }
    let merges: Merges = md
        .strings("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| md.err(format!("tokenizer.ggml.merges[{i}] = {m:?} is not two tokens")))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| md.err(format!("cannot build the BPE tokenizer: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = pre_tokenizer(md, md.opt_str("tokenizer.ggml.pre")?)?;
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (<|im_start|>, ...) and user-defined ones are matched whole
    // in text, as llama.cpp does when parsing special tokens; control tokens
    // are dropped when decoding.
    if let Some(types) = &types {
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, &ty)| AddedToken::from(t.to_string(), ty == TOKEN_TYPE_CONTROL))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| md.err(format!("cannot add the control tokens: {e}")))?;
    }
    let eos = md
        .opt_id("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| md.err("metadata key `tokenizer.ggml.eos_token_id` is missing".into()))?;
    let bos = md.opt_id("tokenizer.ggml.bos_token_id")?.unwrap_or(eos);
    let pad = md.opt_id("tokenizer.ggml.padding_token_id")?.unwrap_or(eos);
    Tokenizer::from_parts(inner, bos, eos, pad).map_err(|e| md.err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permutation, written out index by index from the Python in
    /// llama.cpp's converter: `reshape(n_head, 2, D/2, in).swapaxes(1, 2)`.
    #[test]
    fn permute_matches_llama_cpp_and_unpermute_inverts_it() -> Result<()> {
        let (heads, hd, cols) = (3, 8, 5);
        let data: Vec<f32> = (0..heads * hd * cols).map(|i| i as f32).collect();
        let w = Tensor::from_vec(data.clone(), (heads * hd, cols), &Device::Cpu)?;
        let p = llama_cpp_permute(&w, heads)?.to_vec2::<f32>()?;
        for h in 0..heads {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    let src = h * hd + s * hd / 2 + j;
                    assert_eq!(p[h * hd + 2 * j + s], data[src * cols..(src + 1) * cols]);
                }
            }
        }
        let back = llama_cpp_unpermute(&llama_cpp_permute(&w, heads)?, heads)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, data);
        assert!(llama_cpp_permute(&w, 5).is_err());
        Ok(())
    }

    #[test]
    fn names_map_to_hugging_face() {
        let cfg = ModelConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: 0,
            eos_token_id: 0,
            pad_token_id: 0,
        };
        let n = |s: &str| hf_name(s, &cfg);
        assert_eq!(
            n("blk.1.attn_k.weight"),
            Some(("model.layers.1.self_attn.k_proj.weight".into(), Some(2)))
        );
        assert_eq!(
            n("blk.0.attn_q.weight"),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), Some(4)))
        );
        assert_eq!(
            n("blk.0.ffn_down.weight"),
            Some(("model.layers.0.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(n("token_embd.weight"), Some(("model.embed_tokens.weight".into(), None)));
        assert_eq!(n("blk.2.attn_q.weight"), None); // past block_count
        assert_eq!(n("rope_freqs.weight"), None);
        assert_eq!(n("blk.x.attn_q.weight"), None);
    }
}
