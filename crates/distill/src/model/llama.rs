//! A trainable Llama-family decoder (Llama, Qwen2-style q/k/v biases, GQA,
//! tied or untied head) built only from candle ops that have a backward pass.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope` silently drop
//! gradients (see shared/DESIGN.md), so this file composes RMSNorm, softmax and
//! rotary embeddings from plain tensor ops. Parameter names follow Hugging
//! Face (`model.layers.N.self_attn.q_proj.weight`, ...), weights are `[out, in]`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::ModelSpec;
use crate::error::{Error, Result};

/// The architecture, in the fields Hugging Face's `config.json` uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2). Saved as a Qwen2 config when true.
    pub attention_bias: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl ModelConfig {
    pub fn from_spec(spec: &ModelSpec, vocab_size: usize, bos: u32, eos: u32, pad: u32) -> Self {
        Self {
            vocab_size,
            hidden_size: spec.hidden_size,
            intermediate_size: spec.intermediate_size,
            num_hidden_layers: spec.num_layers,
            num_attention_heads: spec.num_heads,
            num_key_value_heads: spec.num_kv_heads.unwrap_or(spec.num_heads),
            rms_norm_eps: spec.rms_norm_eps,
            rope_theta: spec.rope_theta,
            max_position_embeddings: spec.max_position_embeddings,
            tie_word_embeddings: spec.tie_embeddings,
            attention_bias: spec.attention_bias,
            bos_token_id: bos,
            eos_token_id: eos,
            pad_token_id: pad,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every parameter with its shape, in sorted name order.
    pub fn param_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (v, d, f) = (self.vocab_size, self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.num_key_value_heads * self.head_dim(),
        );
        let mut m = BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_string(), vec![v, d]);
        m.insert("model.norm.weight".to_string(), vec![d]);
        if !self.tie_word_embeddings {
            m.insert("lm_head.weight".to_string(), vec![v, d]);
        }
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            m.insert(format!("{p}.input_layernorm.weight"), vec![d]);
            m.insert(format!("{p}.post_attention_layernorm.weight"), vec![d]);
            m.insert(format!("{p}.self_attn.q_proj.weight"), vec![q, d]);
            m.insert(format!("{p}.self_attn.k_proj.weight"), vec![kv, d]);
            m.insert(format!("{p}.self_attn.v_proj.weight"), vec![kv, d]);
            m.insert(format!("{p}.self_attn.o_proj.weight"), vec![d, q]);
            if self.attention_bias {
                m.insert(format!("{p}.self_attn.q_proj.bias"), vec![q]);
                m.insert(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
                m.insert(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
            }
            m.insert(format!("{p}.mlp.gate_proj.weight"), vec![f, d]);
            m.insert(format!("{p}.mlp.up_proj.weight"), vec![f, d]);
            m.insert(format!("{p}.mlp.down_proj.weight"), vec![d, f]);
        }
        m
    }

    /// All parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes().values().map(|s| s.iter().product::<usize>()).sum()
    }

    /// Parameters that take part in matmuls (everything but the embedding lookup
    /// and the norms; the head counts once even when tied). Used for FLOP counts.
    pub fn matmul_params(&self) -> usize {
        let shapes = self.param_shapes();
        let mut n: usize = shapes
            .iter()
            .filter(|(k, s)| s.len() == 2 && k.as_str() != "model.embed_tokens.weight")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        if self.tie_word_embeddings {
            n += self.vocab_size * self.hidden_size;
        }
        n
    }

    /// Forward FLOPs per token at context length `ctx`, as in PaLM (Chowdhery et al.
    /// 2022, appendix B): 2 per matmul weight plus 4 * layers * attention width * ctx.
    pub fn forward_flops_per_token(&self, ctx: usize) -> f64 {
        let attn = 4.0 * (self.num_hidden_layers * self.num_attention_heads * self.head_dim() * ctx) as f64;
        2.0 * self.matmul_params() as f64 + attn
    }

    /// Hugging Face `config.json`. Loads in transformers (LlamaForCausalLM, or
    /// Qwen2ForCausalLM when q/k/v have biases) and in candle-transformers.
    pub fn to_hf_json(&self) -> serde_json::Value {
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

    /// Reads a Hugging Face Llama or Qwen2 `config.json`.
    pub fn from_hf_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let get = |k: &str| -> std::result::Result<usize, String> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| format!("key `{k}` is missing or not a non-negative integer"))
        };
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("llama");
        let attention_bias = match model_type {
            "llama" => {
                if v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false) {
                    return Err(
                        "Llama models with attention_bias = true (bias on o_proj too) are not supported".into(),
                    );
                }
                false
            }
            "qwen2" => true,
            other => {
                return Err(format!(
                    "model_type {other:?} is not supported; expected \"llama\" or \"qwen2\""
                ))
            }
        };
        let heads = get("num_attention_heads")?;
        let hidden = get("hidden_size")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(format!(
                "hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            ));
        }
        if let Some(hd) = v.get("head_dim").and_then(|x| x.as_u64()) {
            if hd as usize != hidden / heads {
                return Err(format!(
                    "head_dim {hd} != hidden_size / num_attention_heads; not supported"
                ));
            }
        }
        let kv = v
            .get("num_key_value_heads")
            .and_then(|x| x.as_u64())
            .map_or(heads, |x| x as usize);
        if kv == 0 || heads % kv != 0 {
            return Err(format!(
                "num_key_value_heads {kv} does not divide num_attention_heads {heads}"
            ));
        }
        let token = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
        let eos = token("eos_token_id").ok_or("key `eos_token_id` is missing or not an integer")?;
        Ok(Self {
            vocab_size: get("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta: v.get("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10_000.0),
            max_position_embeddings: get("max_position_embeddings")?,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            attention_bias,
            bos_token_id: token("bos_token_id").unwrap_or(eos),
            eos_token_id: eos,
            pad_token_id: token("pad_token_id").unwrap_or(eos),
        })
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>, // each (B, H_kv, S, D)
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Llama-family decoder whose parameters are candle `Var`s (trainable).
pub struct Llama {
    pub cfg: ModelConfig,
    params: BTreeMap<String, Var>,
    cos: Tensor, // (max_pos, D/2)
    sin: Tensor, // (max_pos, D/2)
    device: Device,
}

impl Llama {
    /// Fresh weights drawn from our own seeded RNG (candle's CPU RNG cannot be
    /// seeded). Each tensor has its own ChaCha stream keyed by its name, so the
    /// draw does not depend on the order in which tensors are made.
    pub fn init(cfg: ModelConfig, init_std: f64, seed: u64, device: &Device) -> Result<Self> {
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                normal_vec(n, init_std, seed, &name)
            };
            let t = Tensor::from_vec(data, shape.as_slice(), device)?;
            params.insert(name, Var::from_tensor(&t)?);
        }
        Self::from_vars(cfg, params, device)
    }

    /// Builds a model from named tensors (e.g. a loaded checkpoint), checking
    /// that every expected tensor is present with its shape and nothing is left over.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if t.dims() != shape.as_slice() {
                return Err(format!(
                    "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ));
            }
            let t = t
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(device))
                .map_err(|e| e.to_string())?;
            params.insert(name, Var::from_tensor(&t).map_err(|e| e.to_string())?);
        }
        // A tied checkpoint saved by other tools may still carry lm_head.weight.
        tensors.remove("lm_head.weight").filter(|_| cfg.tie_word_embeddings);
        if let Some(extra) = tensors.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
            return Err(format!("unexpected tensor `{extra}` (not part of this architecture)"));
        }
        Self::from_vars(cfg, params, device).map_err(|e| e.to_string())
    }

    fn from_vars(cfg: ModelConfig, params: BTreeMap<String, Var>, device: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?; // (max_pos, D/2)
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            params,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable parameters, by Hugging Face name.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| Error::Invalid(format!("internal: parameter {name} missing")))
    }

    /// Logits for every position: ids (B, T) u32 -> (B, T, V) f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_cached(ids, None)
    }

    /// Like `forward`, but with a KV cache: `ids` are the new tokens that follow
    /// the cached ones. Returns logits for the new positions only, (B, T_new, V).
    pub fn forward_cached(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let x = self.hidden_cached(ids, cache)?; // (B, T_new, d)
        linear(&x, &self.lm_head_weight()?, None) // (B, T_new, V)
    }

    /// The final hidden states, after the last RMSNorm and before the head:
    /// ids (B, T) u32 -> (B, T, d) f32, differentiable. `forward` is this followed by
    /// `x @ lm_head_weight()^T`; a fused head loss (`loss::fused_head`) takes the two
    /// apart so that the (B, T, V) logits never exist at once.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_cached(ids, None)
    }

    /// The output projection, (V, d): `lm_head.weight`, or with tied embeddings the
    /// embedding matrix itself (the same `Var`, so gradients from both uses add up).
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        let head = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Ok(self.w(head)?.clone())
    }

    fn hidden_cached(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                offset + t,
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(c) = cache.as_mut() {
            c.layers.resize(self.cfg.num_hidden_layers, None);
        }
        let d = self.cfg.hidden_size;
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?; // (B, T, d)
        let cos = self.cos.narrow(0, offset, t)?; // (T, D/2)
        let sin = self.sin.narrow(0, offset, t)?;
        let mask = causal_mask(t, offset, &self.device)?; // (T, S)
        for i in 0..self.cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.input_layernorm.weight"))?,
                self.cfg.rms_norm_eps,
            )?;
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let a = self.attention(&h, &p, &cos, &sin, &mask, layer_cache)?;
            x = (x + a)?;
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.post_attention_layernorm.weight"))?,
                self.cfg.rms_norm_eps,
            )?;
            x = (x + self.mlp(&h, &p)?)?;
        }
        rms_norm(&x, self.w("model.norm.weight")?, self.cfg.rms_norm_eps) // (B, T, d)
    }

    fn attention(
        &self,
        x: &Tensor, // (B, T, d)
        p: &str,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let bias = |n: &str| -> Result<Option<&Tensor>> {
            if self.cfg.attention_bias {
                self.w(&format!("{p}.self_attn.{n}.bias")).map(Some)
            } else {
                Ok(None)
            }
        };
        let proj = |n: &str, heads: usize| -> Result<Tensor> {
            let y = linear(x, self.w(&format!("{p}.self_attn.{n}.weight"))?, bias(n)?)?;
            Ok(y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) // (B, heads, T, D)
        };
        let q = rope(&proj("q_proj", h)?, cos, sin)?;
        let mut k = rope(&proj("k_proj", hkv)?, cos, sin)?;
        let mut v = proj("v_proj", hkv)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?; // (B, H_kv, S, D)
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(&k, h / hkv)?; // (B, H, S, D)
        let v = repeat_kv(&v, h / hkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // (B, H, T, S)
        let att = softmax_last(&att)?;
        let y = att.matmul(&v)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, h * hd))?; // (B, T, H*D)
        linear(&y, self.w(&format!("{p}.self_attn.o_proj.weight"))?, None)
    }

    fn mlp(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let gate = linear(x, self.w(&format!("{p}.mlp.gate_proj.weight"))?, None)?; // (B, T, F)
        let up = linear(x, self.w(&format!("{p}.mlp.up_proj.weight"))?, None)?;
        linear(
            &(gate.silu()? * up)?,
            self.w(&format!("{p}.mlp.down_proj.weight"))?,
            None,
        ) // (B, T, d)
    }

    /// The weights as plain tensors (detached from the graph), by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }
}

/// x (B, T, in) @ w^T (in, out) + b -> (B, T, out)
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (bs, t, i) = x.dims3()?;
    let o = w.dim(0)?;
    let y = x.reshape((bs * t, i))?.matmul(&w.t()?)?.reshape((bs, t, o))?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// RMSNorm from differentiable ops: x / sqrt(mean(x^2) + eps) * w.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (B, T, 1)
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension from differentiable ops.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding, rotate-half form (as Hugging Face Llama): x (B, H, T, D).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?; // (T, D)
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// (B, H_kv, S, D) -> (B, H_kv * n, S, D), each kv head repeated for its query group.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, hkv, n, s, d))?.reshape((b, hkv * n, s, d))?)
}

/// Additive causal mask for `t` new queries after `offset` cached keys: (T, offset + T).
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (t, s), device)?)
}

/// `n` draws from N(0, std^2), from a ChaCha8 stream keyed by (seed, name).
fn normal_vec(n: usize, std: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name.as_bytes()));
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller: two uniforms give two independent normals.
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// 64-bit FNV-1a, a stable hash for keying RNG streams by name.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
