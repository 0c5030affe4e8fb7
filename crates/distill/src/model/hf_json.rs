//! Hugging Face `config.json` and `generation_config.json`, read as hostile input.
//!
//! A model file from outside must never size an allocation or reach the forward
//! unchecked, so reading one goes in three steps:
//!
//! 1. types (`ModelConfig::from_hf_json`): a key that is present with the wrong type
//!    (`"rms_norm_eps": "1e-5"`, `"tie_word_embeddings": "yes"`) is an error naming the
//!    file and the key; only an absent (or `null`) optional key takes its documented
//!    default;
//! 2. ranges (`ModelConfig::check`): every size at least 1, heads that divide the
//!    width, `rms_norm_eps` and `rope_theta` finite and in range, special-token ids
//!    inside the vocabulary, at most `MAX_POSITIONS` positions;
//! 3. shapes (`ModelConfig::check_shapes`): every size the config gives (vocabulary,
//!    width, layers, heads, MLP width) is compared with the tensors actually present,
//!    from the safetensors headers, before any tensor is read. The one size no tensor
//!    carries, `max_position_embeddings`, sizes nothing: the rotary tables are built
//!    for the positions a forward uses (`Llama::rope_cos_sin`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

use super::llama::ModelConfig;
use crate::error::{Error, Result};

/// The most positions a model may declare: rotary positions are f32, which holds every
/// integer up to 2^24 exactly and skips some beyond it.
pub const MAX_POSITIONS: usize = 1 << 24;

/// The embedding's name, the one tensor every checkpoint has.
const EMBED: &str = "model.embed_tokens.weight";

/// A short description of a JSON value for an error message: its type and, when small,
/// the value itself.
fn describe(v: &Value) -> String {
    let text = v.to_string();
    let shown = if text.len() <= 40 {
        text
    } else {
        format!("{}...", text.chars().take(37).collect::<String>())
    };
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() => "an integer",
        Value::Number(n) if n.is_i64() => "a negative integer",
        Value::Number(_) => "a fractional number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({shown})")
}

/// Typed access to the keys of one JSON object, with errors that name the file and key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl<'a> Keys<'a> {
    fn of(v: &'a Value, path: &'a Path) -> Result<Self> {
        match v.as_object() {
            Some(obj) => Ok(Self { obj, path }),
            None => Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("must be a JSON object {{\"key\": value, ...}}, found {}", describe(v)),
            }),
        }
    }

    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> Error {
        self.err(format!(
            "key `{key}` must be {want}, found {}; correct it (or restore the file from the model's source)",
            describe(got)
        ))
    }

    /// The value of `key`; absent and `null` are both None.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn opt_uint(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    fn uint(&self, key: &str) -> Result<usize> {
        self.opt_uint(key)?
            .ok_or_else(|| self.err(format!("key `{key}` is missing (a non-negative integer)")))
    }

    fn opt_id(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a token id (an integer from 0 to 2^32 - 1)", v)),
        }
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number (written without quotes, e.g. 1e-05)", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "true or false (without quotes)", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A key this implementation supports only at `want` (or absent): anything else is
    /// an error rather than a model computed differently from the one described.
    fn only(&self, key: &str, want: &Value, what: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if v != want => Err(self.err(format!(
                "key `{key}` is {}; only {want} is supported ({what})",
                describe(v)
            ))),
            _ => Ok(()),
        }
    }
}

impl ModelConfig {
    /// Hugging Face `config.json`. Loads in transformers (LlamaForCausalLM, or
    /// Qwen2ForCausalLM when q/k/v have biases) and in candle-transformers.
    pub fn to_hf_json(&self) -> Value {
        let (arch, model_type) = if self.attention_bias {
            ("Qwen2ForCausalLM", "qwen2")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": false,
            "use_sliding_window": false,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        // Llama's `attention_bias` would also put a bias on o_proj; Qwen2 has
        // q/k/v biases by definition, so the key is written for Llama only.
        if !self.attention_bias {
            v["attention_bias"] = false.into();
        }
        v
    }

    /// Reads a Hugging Face Llama or Qwen2 `config.json` (`path`, for the errors).
    /// Required: the sizes (`vocab_size`, `hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`) and
    /// `eos_token_id`. Absent (or null) optional keys take these defaults:
    /// `model_type` "llama", `num_key_value_heads` = heads, `rms_norm_eps` 1e-6,
    /// `rope_theta` 10000, `tie_word_embeddings` false, `bos_token_id` and
    /// `pad_token_id` = eos. A key present with the wrong type, a value out of range
    /// (`check`) or a feature this model does not implement (`rope_scaling`, another
    /// `hidden_act`, ...) is an error naming the file and the key.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys::of(v, path)?;
        let model_type = keys.opt_str("model_type")?.unwrap_or("llama");
        let llama_bias = keys.opt_bool("attention_bias")?;
        let attention_bias = match model_type {
            "llama" => {
                if llama_bias.unwrap_or(false) {
                    return Err(keys
                        .err("Llama models with attention_bias = true (bias on o_proj too) are not supported".into()));
                }
                false
            }
            "qwen2" => true,
            other => {
                return Err(keys.err(format!(
                    "model_type {other:?} is not supported; expected \"llama\" or \"qwen2\""
                )))
            }
        };
        keys.only("hidden_act", &"silu".into(), "SwiGLU MLP")?;
        keys.only("mlp_bias", &false.into(), "no MLP biases")?;
        keys.only("use_sliding_window", &false.into(), "full causal attention")?;
        if let Some(s) = keys.get("rope_scaling") {
            return Err(keys.err(format!(
                "key `rope_scaling` is {}; scaled rotary embeddings are not supported (only plain RoPE), \
                 so this model cannot be run as its authors intended",
                describe(s)
            )));
        }
        let heads = keys.uint("num_attention_heads")?;
        let hidden = keys.uint("hidden_size")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(keys.err(format!(
                "hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )));
        }
        if let Some(hd) = keys.opt_uint("head_dim")? {
            if hd != hidden / heads {
                return Err(keys.err(format!(
                    "head_dim {hd} != hidden_size / num_attention_heads ({hidden} / {heads}); not supported"
                )));
            }
        }
        if let Some(e) = keys.get("eos_token_id").filter(|e| e.is_array()) {
            return Err(keys.wrong("eos_token_id", "one token id (lists of ids are not supported)", e));
        }
        let eos = keys
            .opt_id("eos_token_id")?
            .ok_or_else(|| keys.err("key `eos_token_id` is missing (the end-of-sequence token id)".into()))?;
        let cfg = Self {
            vocab_size: keys.uint("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: keys.uint("intermediate_size")?,
            num_hidden_layers: keys.uint("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: keys.opt_uint("num_key_value_heads")?.unwrap_or(heads),
            rms_norm_eps: keys.opt_float("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: keys.opt_float("rope_theta")?.unwrap_or(10_000.0),
            max_position_embeddings: keys.uint("max_position_embeddings")?,
            tie_word_embeddings: keys.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            bos_token_id: keys.opt_id("bos_token_id")?.unwrap_or(eos),
            eos_token_id: eos,
            pad_token_id: keys.opt_id("pad_token_id")?.unwrap_or(eos),
        };
        cfg.check().map_err(|m| keys.err(m))?;
        Ok(cfg)
    }

    /// Checks every value against its valid range; the message names the key (in
    /// `config.json`'s names) and the way out. Every constructor of `Llama` runs this.
    pub fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((k, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(format!("`{k}` is 0; it must be at least 1"));
        }
        let (d, h, kv) = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads);
        if d % h != 0 || (d / h) % 2 != 0 {
            return Err(format!(
                "`hidden_size` {d} does not split into `num_attention_heads` {h} heads of even size \
                 (rotary embeddings turn pairs of dimensions)"
            ));
        }
        if h % kv != 0 {
            return Err(format!(
                "`num_key_value_heads` {kv} does not divide `num_attention_heads` {h}"
            ));
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "`max_position_embeddings` {} is more than {MAX_POSITIONS} (2^24), beyond which f32 rotary \
                 positions are no longer exact; use the model's real context length",
                self.max_position_embeddings
            ));
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0 && (eps as f32) > 0.0) {
            return Err(format!(
                "`rms_norm_eps` {eps} is out of range: it must be a small positive number, in (0, 1) and \
                 above 1e-38 (f32), e.g. 1e-05 or 1e-06"
            ));
        }
        let theta = self.rope_theta;
        if !(theta.is_finite() && theta >= 1.0) {
            return Err(format!(
                "`rope_theta` {theta} is out of range: it must be a finite number >= 1 \
                 (Llama uses 10000 or 500000)"
            ));
        }
        for (k, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return Err(format!(
                    "`{k}` {id} is outside the vocabulary of {} tokens (`vocab_size`)",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Checks every size of this config against the tensors present (name -> shape),
    /// reading nothing but the shapes: the vocabulary and width against the embedding,
    /// the layer count against the `model.layers.N` names, the key/value heads and the
    /// MLP width against layer 0, then every tensor exactly. Run `check` first.
    pub fn check_shapes(&self, shapes: &BTreeMap<String, Vec<usize>>) -> std::result::Result<(), String> {
        let dims = |name: &str| shapes.get(name).map(Vec::as_slice);
        let (v, d) = match dims(EMBED) {
            Some(&[v, d]) => (v, d),
            Some(other) => return Err(format!("tensor `{EMBED}` has shape {other:?}; expected 2-D")),
            None => return Err(format!("tensor `{EMBED}` is missing")),
        };
        if v != self.vocab_size {
            return Err(format!(
                "`vocab_size` is {} but `{EMBED}` has {v} rows",
                self.vocab_size
            ));
        }
        if d != self.hidden_size {
            return Err(format!(
                "`hidden_size` is {} but `{EMBED}` has {d} columns",
                self.hidden_size
            ));
        }
        // Layers must be numbered 0..n with no gap; n then bounds every loop over layers.
        let layers: BTreeSet<usize> = shapes
            .keys()
            .filter_map(|k| k.strip_prefix("model.layers.")?.split('.').next()?.parse().ok())
            .collect();
        if let Some((i, l)) = layers.iter().enumerate().find(|(i, l)| i != *l) {
            return Err(format!(
                "the weights have no layer {i} but have layer {l}; layers must be numbered from 0 without gaps"
            ));
        }
        if layers.len() != self.num_hidden_layers {
            return Err(format!(
                "`num_hidden_layers` is {} but the weights hold {} layers",
                self.num_hidden_layers,
                layers.len()
            ));
        }
        let rows = |n: &str| dims(&format!("model.layers.0.{n}")).and_then(|s| s.first().copied());
        let (hd, kv) = (self.head_dim(), self.num_key_value_heads);
        if let Some(r) = rows("self_attn.k_proj.weight").filter(|&r| r != kv * hd) {
            return Err(format!(
                "`num_key_value_heads` is {kv} (with `num_attention_heads` {}: {kv} heads of {hd}, {} rows) \
                 but `model.layers.0.self_attn.k_proj.weight` has {r} rows",
                self.num_attention_heads,
                kv * hd
            ));
        }
        if let Some(r) = rows("mlp.gate_proj.weight").filter(|&r| r != self.intermediate_size) {
            return Err(format!(
                "`intermediate_size` is {} but `model.layers.0.mlp.gate_proj.weight` has {r} rows",
                self.intermediate_size
            ));
        }
        if !self.tie_word_embeddings && !shapes.contains_key("lm_head.weight") {
            return Err(
                "`tie_word_embeddings` is false but there is no `lm_head.weight`; set it to true if the head \
                 shares the embedding"
                    .into(),
            );
        }
        for (name, want) in self.param_shapes() {
            match dims(&name) {
                None => return Err(format!("tensor `{name}` is missing")),
                Some(got) if got != want.as_slice() => {
                    return Err(format!(
                        "tensor `{name}` has shape {got:?}, the config implies {want:?}"
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Checks a Hugging Face `generation_config.json` (`v`, read from `path`) against a model
/// of `vocab_size` tokens: the token ids it names (`bos_token_id`, `pad_token_id`,
/// `decoder_start_token_id`, and `eos_token_id`, one id or a list) are ids inside the
/// vocabulary, the lengths non-negative integers, `temperature` and `top_p` finite
/// numbers in range, `do_sample` a boolean. `null` is as good as absent; other keys
/// are not read. The decoding settings themselves come from the command line.
pub fn check_generation_config(v: &Value, path: &Path, vocab_size: usize) -> Result<()> {
    let keys = Keys::of(v, path)?;
    let in_vocab = |key: &str, id: u32| -> Result<()> {
        if id as usize >= vocab_size {
            return Err(keys.err(format!(
                "key `{key}` is {id}, outside the vocabulary of {vocab_size} tokens (config.json's vocab_size)"
            )));
        }
        Ok(())
    };
    for key in ["bos_token_id", "pad_token_id", "decoder_start_token_id"] {
        if let Some(id) = keys.opt_id(key)? {
            in_vocab(key, id)?;
        }
    }
    match keys.get("eos_token_id") {
        Some(Value::Array(ids)) if !ids.is_empty() => {
            for id in ids {
                let id = id
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| keys.wrong("eos_token_id", "a token id or a list of token ids", id))?;
                in_vocab("eos_token_id", id)?;
            }
        }
        Some(Value::Array(_)) => {
            return Err(keys.err("key `eos_token_id` is an empty list; give at least one id or remove it".into()))
        }
        _ => {
            if let Some(id) = keys.opt_id("eos_token_id")? {
                in_vocab("eos_token_id", id)?;
            }
        }
    }
    for key in [
        "max_length",
        "max_new_tokens",
        "min_length",
        "min_new_tokens",
        "top_k",
        "num_beams",
    ] {
        keys.opt_uint(key)?;
    }
    keys.opt_bool("do_sample")?;
    let ranged = [
        ("temperature", 0.0, f64::MAX, "a finite number >= 0"),
        ("top_p", 0.0, 1.0, "a number in [0, 1]"),
        ("repetition_penalty", 0.0, f64::MAX, "a finite number >= 0"),
    ];
    for (key, lo, hi, want) in ranged {
        if let Some(x) = keys.opt_float(key)? {
            if !(x >= lo && x <= hi) {
                return Err(keys.err(format!("key `{key}` is {x}; it must be {want}")));
            }
        }
    }
    Ok(())
}
