//! A trainable Llama-family decoder (Llama, Qwen2-style q/k/v biases, GQA,
//! tied or untied head) built only from candle ops that have a backward pass.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope` silently drop
//! gradients (see docs/design.md), so this file composes RMSNorm, softmax and
//! rotary embeddings from plain tensor ops. Parameter names follow Hugging
//! Face (`model.layers.N.self_attn.q_proj.weight`, ...), weights are `[out, in]`.
//!
//! Mixed precision works like `torch.autocast`: a trainable model keeps f32
//! master weights (the `Var`s, and so the optimizer state, stay f32) and, with a
//! bf16/f16 compute dtype (`set_compute_dtype`), casts each weight where it is
//! used, so the matmuls, rotary embedding, SiLU and the KV cache run in that
//! dtype. The residual stream, RMSNorm, the attention softmax and the returned
//! logits/hidden states stay f32, so the loss accumulates in f32. A frozen model
//! (a teacher, `into_frozen`) instead stores its weights in the compute dtype,
//! halving their memory; its forward builds no autograd graph.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::Kernels;
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::kernels::attention::causal_attention;
use crate::kernels::int8::{self, Int8Weight};
use crate::kernels::ops as fused;

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
}

/// The dtypes the forward can compute in (`Llama::set_compute_dtype`) and a
/// frozen model can store its weights in (`Llama::into_frozen`).
pub const COMPUTE_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn check_compute_dtype(dtype: DType) -> Result<()> {
    if COMPUTE_DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "model compute dtype {dtype:?} is not supported; use f32, bf16 or f16"
        )))
    }
}

/// A Llama-family decoder. Trainable: its parameters are f32 candle `Var`s.
/// Frozen (`into_frozen`): plain tensors in their storage dtype, no gradients.
pub struct Llama {
    pub cfg: ModelConfig,
    /// Trainable f32 master weights; empty once frozen.
    params: BTreeMap<String, Var>,
    /// A frozen model's weights, in `compute_dtype`; empty while trainable.
    pub(crate) frozen: BTreeMap<String, Tensor>,
    /// The dtype of matmuls and activations (see the file header).
    compute_dtype: DType,
    /// Fused CPU kernels (`kernels::ops`, `kernels::attention`) or plain candle ops.
    kernels: Kernels,
    /// A frozen bf16/f16 model's head widened to f32 once, for `lm_head_weight`.
    head_f32: std::sync::OnceLock<Tensor>,
    /// Matmul weights held as ggml blocks (`quantize_matmuls`, `model::quant`), by the
    /// name of the dense weight each replaces; empty for a dense model.
    pub(crate) quantized: BTreeMap<String, Int8Weight>,
    /// Rotary inverse frequencies, (1, D/2) f32. The cos/sin tables are built from them
    /// for the positions a forward uses (`rope_cos_sin`), never for all
    /// `max_position_embeddings`, which a config may set far beyond what it needs.
    inv_freq: Tensor,
    device: Device,
}

impl Llama {
    /// Fresh weights drawn from our own seeded RNG (candle's CPU RNG cannot be
    /// seeded). Each tensor has its own ChaCha stream keyed by its name, so the
    /// draw does not depend on the order in which tensors are made.
    pub fn init(cfg: ModelConfig, init_std: f64, seed: u64, device: &Device) -> Result<Self> {
        cfg.check().map_err(|m| Error::Invalid(format!("model config: {m}")))?;
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

    /// Builds a model from named tensors (e.g. a loaded checkpoint), checking the
    /// config's ranges (`ModelConfig::check`) and sizes against the tensors
    /// (`ModelConfig::check_shapes`) before anything is built, that every expected
    /// tensor is present with its shape and nothing is left over, and that every
    /// weight is finite.
    pub fn from_tensors(cfg: ModelConfig, mut tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<Self> {
        cfg.check().map_err(Error::Shape)?;
        let shapes = tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        cfg.check_shapes(&shapes).map_err(Error::Shape)?;
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Shape(format!("tensor `{name}` is missing")))?;
            check_shape(&name, t.dims(), &shape)?;
            params.insert(name.clone(), Var::from_tensor(&finite_f32(&name, &t, device)?)?);
        }
        check_leftovers(&cfg, tensors)?;
        Self::from_vars(cfg, params, device)
    }

    pub(crate) fn from_vars(cfg: ModelConfig, params: BTreeMap<String, Var>, device: &Device) -> Result<Self> {
        let inv_freq = rope_inv_freq(&cfg, device)?;
        Ok(Self {
            inv_freq,
            cfg,
            params,
            frozen: BTreeMap::new(),
            compute_dtype: DType::F32,
            kernels: Kernels::default(),
            head_f32: std::sync::OnceLock::new(),
            quantized: BTreeMap::new(),
            device: device.clone(),
        })
    }

    /// Sets the dtype the forward computes in: F32 (the default), BF16 or F16;
    /// anything else is an error. The stored weights are not touched: a trainable
    /// model keeps its f32 master weights and casts each one where it is used, and
    /// gradients flow back through the casts to the f32 `Var`s as f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        check_compute_dtype(dtype)?;
        self.compute_dtype = dtype;
        Ok(())
    }

    /// The dtype of the forward's matmuls and activations.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Chooses the implementation of RMSNorm, rope, attention and SwiGLU: the fused
    /// CPU kernels (the default) or plain candle ops. The fused kernels run where the
    /// device is the CPU and the compute dtype f32; elsewhere, and for incremental
    /// decoding with a KV cache, the plain ops run whatever this says.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether this forward runs the fused kernels (see `set_kernels`).
    pub(crate) fn fused(&self) -> bool {
        self.kernels == Kernels::Fused && self.device.is_cpu() && self.compute_dtype == DType::F32
    }

    /// The rotary tables of positions 0..t as f32 vectors, (t, D/2) each.
    pub(crate) fn rope_tables(&self, t: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cos, sin) = self.rope_cos_sin(0, t)?;
        Ok((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
    }

    /// cos and sin of the rotary angles of positions `offset..offset + t`, (t, D/2) f32
    /// each: built for these positions only (see `rope_angles`).
    pub(crate) fn rope_cos_sin(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let freqs = rope_angles(&self.inv_freq, offset, t)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// cos and sin of the rotary angles of arbitrary positions, (n, D/2) f32 each: the
    /// same products as `rope_cos_sin` builds for a run of positions.
    pub(crate) fn rope_cos_sin_at(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), &self.device)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Turns the model into a frozen one (a teacher) whose weights are stored in
    /// `dtype` (F32, BF16 or F16), which also becomes the compute dtype, so the
    /// forward casts no weights; bf16 halves the weights' memory. The model then
    /// has no trainable parameters (`params()` is empty) and its forward builds
    /// no autograd graph. `tensors()` returns the stored (e.g. bf16) tensors.
    pub fn into_frozen(mut self, dtype: DType) -> Result<Self> {
        check_compute_dtype(dtype)?;
        let params = std::mem::take(&mut self.params);
        for (name, var) in params {
            let t = var.as_tensor().detach().to_dtype(dtype)?;
            self.frozen.insert(name, t);
        }
        self.compute_dtype = dtype;
        Ok(self)
    }

    /// True for a model made by `into_frozen`.
    pub fn is_frozen(&self) -> bool {
        !self.frozen.is_empty()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable parameters (f32), by Hugging Face name; empty for a frozen model.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// A stored weight: the f32 master `Var`, or a frozen model's tensor.
    pub(crate) fn w(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(|v| v.as_tensor())
            .or_else(|| self.frozen.get(name))
            .ok_or_else(|| Error::Invalid(format!("internal: parameter {name} missing")))
    }

    /// A weight in the compute dtype: a cast (differentiable) or, when the dtypes
    /// already agree, the stored tensor itself.
    pub(crate) fn wc(&self, name: &str) -> Result<Tensor> {
        Ok(self.w(name)?.to_dtype(self.compute_dtype)?)
    }

    /// RMSNorm of the f32 residual stream with the norm weight `name`: the fused kernel
    /// where `fused()` holds, else the plain ops.
    pub(crate) fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.w32(name)?;
        if self.fused() {
            fused::rms_norm(x, &w, self.cfg.rms_norm_eps)
        } else {
            fused::rms_norm_plain(x, &w, self.cfg.rms_norm_eps)
        }
    }

    /// A norm weight in f32 (RMSNorm runs in f32 whatever the compute dtype).
    pub(crate) fn w32(&self, name: &str) -> Result<Tensor> {
        Ok(self.w(name)?.to_dtype(DType::F32)?)
    }

    /// Logits for every position: ids (B, T) u32 -> (B, T, V) f32, whatever the
    /// compute dtype (the head's matmul runs in the compute dtype, its output is
    /// widened to f32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.forward_hidden(ids)?; // (B, T, d) f32
        self.head_logits(&x)
    }

    /// The head on final hidden states: (..., d) f32 -> (..., V) f32, the matmul in the
    /// compute dtype. `forward` is `forward_hidden` followed by this.
    pub fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = hidden.to_dtype(self.compute_dtype)?;
        let logits = self.proj(&x, self.head_name(), None)?; // (..., V)
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The final hidden states, after the last RMSNorm and before the head:
    /// ids (B, T) u32 -> (B, T, d) f32, differentiable. `forward` is this followed by
    /// `x @ lm_head_weight()^T`; a fused head loss (`loss::head`) takes the two
    /// apart so that the (B, T, V) logits never exist at once.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let (d, cdt) = (self.cfg.hidden_size, self.compute_dtype);
        // The residual stream x stays f32; each block reads it through an f32
        // RMSNorm cast to the compute dtype and adds its output back widened to f32.
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?
            .to_dtype(DType::F32)?; // (B, T, d) f32
        let (cos, sin) = self.rope_cos_sin(0, t)?;
        let (cos, sin) = (cos.to_dtype(cdt)?, sin.to_dtype(cdt)?); // (T, D/2)
        let fused = self.fused();
        let mask = if fused {
            None
        } else {
            Some(causal_mask(t, &self.device)?) // (T, T) f32
        };
        let norm = |x: &Tensor, name: &str| self.rms_norm(x, name);
        for i in 0..self.cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let h = norm(&x, &format!("{p}.input_layernorm.weight"))?.to_dtype(cdt)?;
            let a = match &mask {
                None => self.attention_fused(&h, &p, &cos, &sin)?,
                Some(mask) => self.attention(&h, &p, &cos, &sin, mask)?,
            };
            x = (x + a.to_dtype(DType::F32)?)?;
            let h = norm(&x, &format!("{p}.post_attention_layernorm.weight"))?.to_dtype(cdt)?;
            x = (x + self.mlp(&h, &p, fused)?.to_dtype(DType::F32)?)?;
        }
        norm(&x, "model.norm.weight") // (B, T, d) f32
    }

    /// The output projection, (V, d) f32: `lm_head.weight`, or with tied embeddings
    /// the embedding matrix itself. For a trainable model this is the f32 `Var`
    /// itself (so gradients from both uses add up); a frozen bf16/f16 model returns
    /// an f32 copy (made once and kept), since the fused head loss takes f32.
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        let quantized = self.quantized.get(self.head_name());
        if quantized.is_none() {
            let w = self.w(self.head_name())?;
            if !self.is_frozen() || w.dtype() == DType::F32 {
                return Ok(w.to_dtype(DType::F32)?);
            }
        }
        // Frozen weights never change: widen once, not on every micro-batch.
        if let Some(h) = self.head_f32.get() {
            return Ok(h.clone());
        }
        // An int8 head: the weights its matmul uses, not the dense embedding.
        let h = match quantized {
            Some(q) => q.dequantize(&self.device)?,
            None => self.w(self.head_name())?.to_dtype(DType::F32)?,
        };
        Ok(self.head_f32.get_or_init(|| h).clone())
    }

    pub(crate) fn head_name(&self) -> &'static str {
        if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// `attention` on the fused kernels, f32 on the CPU and without a cache: the
    /// projections stay in their (B, T, heads, D) layout, which rope and the fused
    /// attention read directly, and the output is (B, T, H*D) for o_proj as it comes.
    fn attention_fused(&self, x: &Tensor, p: &str, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let proj = |n: &str, heads: usize| -> Result<Tensor> {
            let bias = if self.cfg.attention_bias {
                Some(self.wc(&format!("{p}.self_attn.{n}.bias"))?)
            } else {
                None
            };
            let y = self.proj(x, &format!("{p}.self_attn.{n}.weight"), bias.as_ref())?;
            Ok(y.reshape((b, t, heads, hd))?) // (B, T, heads, D)
        };
        let q = fused::rope(&proj("q_proj", h)?, cos, sin)?;
        let k = fused::rope(&proj("k_proj", hkv)?, cos, sin)?;
        let v = proj("v_proj", hkv)?;
        let y = causal_attention(&q, &k, &v, 1.0 / (hd as f32).sqrt())?; // (B, T, H, D)
        self.proj(
            &y.reshape((b, t, h * hd))?,
            &format!("{p}.self_attn.o_proj.weight"),
            None,
        )
    }

    /// x (B, T, d), cos/sin (T, D/2) and the result in the compute dtype; the mask
    /// (T, S) is f32, and so are the scores and their softmax.
    fn attention(
        &self,
        x: &Tensor, // (B, T, d)
        p: &str,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let bias = |n: &str| -> Result<Option<Tensor>> {
            if self.cfg.attention_bias {
                self.wc(&format!("{p}.self_attn.{n}.bias")).map(Some)
            } else {
                Ok(None)
            }
        };
        let proj = |n: &str, heads: usize| -> Result<Tensor> {
            let y = self.proj(x, &format!("{p}.self_attn.{n}.weight"), bias(n)?.as_ref())?;
            Ok(y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) // (B, heads, T, D)
        };
        let q = rope(&proj("q_proj", h)?, cos, sin)?;
        let k = rope(&proj("k_proj", hkv)?, cos, sin)?; // (B, H_kv, T, D)
        let v = proj("v_proj", hkv)?;
        let k = repeat_kv(&k, h / hkv)?; // (B, H, S, D)
        let v = repeat_kv(&v, h / hkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // (B, H, T, S) f32
        let att = (scores * scale)?.broadcast_add(mask)?;
        let att = softmax_last(&att)?.to_dtype(self.compute_dtype)?;
        let y = att.matmul(&v)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, h * hd))?; // (B, T, H*D)
        self.proj(&y, &format!("{p}.self_attn.o_proj.weight"), None)
    }

    /// x (B, T, in) @ w^T + b: the fused linear op where `fused()` holds.
    pub(crate) fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if self.fused() {
            let y = fused::linear(x, w)?;
            Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        } else {
            linear(x, w, b)
        }
    }

    /// x (B, T, in) @ W^T + b for the matmul weight `name`: its int8 weight where the
    /// model holds one (`model::quant`), else `linear` on the dense weight.
    pub(crate) fn proj(&self, x: &Tensor, name: &str, b: Option<&Tensor>) -> Result<Tensor> {
        let Some(q) = self.quantized.get(name) else {
            return self.linear(x, &self.wc(name)?, b);
        };
        let y = if self.kernels == Kernels::Fused {
            int8::linear(x, q)?
        } else {
            int8::linear_plain(x, q)?
        };
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// SwiGLU MLP, all in the compute dtype.
    pub(crate) fn mlp(&self, x: &Tensor, p: &str, fused: bool) -> Result<Tensor> {
        let gate = self.proj(x, &format!("{p}.mlp.gate_proj.weight"), None)?; // (B, T, F)
        let up = self.proj(x, &format!("{p}.mlp.up_proj.weight"), None)?;
        let act = if fused {
            fused::swiglu(&gate, &up)?
        } else {
            fused::swiglu_plain(&gate, &up)?
        };
        self.proj(&act, &format!("{p}.mlp.down_proj.weight"), None) // (B, T, d)
    }

    /// The stored weights as plain tensors (detached from the graph), by name: the
    /// f32 master weights of a trainable model whatever its compute dtype, or a
    /// frozen model's tensors in their storage dtype; quantized matmul weights
    /// (`model::quant`) dequantized to the f32 values their matmuls use.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .chain(self.frozen.iter().map(|(k, t)| (k.clone(), t.detach())))
            .collect();
        for (name, q) in &self.quantized {
            if !out.contains_key(name) {
                out.insert(name.clone(), q.dequantize(&self.device)?);
            }
        }
        Ok(out)
    }
}

/// `t` in f32 on `device`, refused when it holds NaN or infinite values.
pub(crate) fn finite_f32(name: &str, t: &Tensor, device: &Device) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?.to_device(device)?;
    if !all_finite(&t)? {
        return Err(Error::Shape(format!(
            "tensor `{name}` holds NaN or infinite values; the weights are damaged"
        )));
    }
    Ok(t)
}

/// A tensor's shape against the one the config implies.
pub(crate) fn check_shape(name: &str, held: &[usize], want: &[usize]) -> Result<()> {
    if held != want {
        return Err(Error::Shape(format!(
            "tensor `{name}` has shape {held:?}, config.json implies {want:?}"
        )));
    }
    Ok(())
}

/// The tensors a load has left once every parameter was taken: none but a tied
/// checkpoint's `lm_head.weight` (other tools may still save it) and rotary tables.
pub(crate) fn check_leftovers(cfg: &ModelConfig, mut rest: BTreeMap<String, Tensor>) -> Result<()> {
    rest.remove("lm_head.weight").filter(|_| cfg.tie_word_embeddings);
    if let Some(extra) = rest.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
        return Err(Error::Shape(format!(
            "unexpected tensor `{extra}` (not part of this architecture)"
        )));
    }
    Ok(())
}

/// Whether every value of `t` is finite. An f32 tensor on the CPU is scanned in place
/// (no copy of a checkpoint's weights); elsewhere x * 0 is 0 for finite x and NaN for
/// NaN and +-inf, so the sum is 0 exactly then (a plain sum could overflow).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        return Ok(crate::kernels::cpu::with_cpu_f32(t, "all_finite", |v| {
            v.iter().all(|x| x.is_finite())
        })?);
    }
    Ok((t * 0.0)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0)
}

/// The rotary inverse frequencies of `cfg`, theta^(-2i/D) for i < D/2: (1, D/2) f32.
pub(crate) fn rope_inv_freq(cfg: &ModelConfig, device: &Device) -> Result<Tensor> {
    let (hd, half) = (cfg.head_dim(), cfg.head_dim() / 2);
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    Ok(Tensor::from_vec(inv_freq, (1, half), device)?)
}

/// The rotary angles of positions `offset..offset + t`: (t, D/2) f32, position times
/// inverse frequency. The same products as a table of every position would hold, so the
/// result does not depend on which positions are built together.
pub(crate) fn rope_angles(inv_freq: &Tensor, offset: usize, t: usize) -> Result<Tensor> {
    let end = u32::try_from(offset + t).map_err(|_| {
        Error::Shape(format!(
            "position {} is beyond the rotary embedding's range",
            offset + t
        ))
    })?;
    let pos = Tensor::arange(offset as u32, end, inv_freq.device())?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    Ok(pos.broadcast_mul(inv_freq)?)
}

/// x (B, T, in) @ w^T (in, out) + b -> (B, T, out)
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = fused::linear_plain(x, w)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Softmax over the last dimension from differentiable ops.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding, rotate-half form (as Hugging Face Llama): x (B, H, T, D).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?; // (T, D)
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// (B, H_kv, S, D) -> (B, H_kv * n, S, D), each kv head repeated for its query group.
pub(crate) fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, hkv, n, s, d))?.reshape((b, hkv * n, s, d))?)
}

/// Additive causal mask for `t` queries over the same `t` keys: (T, T).
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(tied: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 97,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            attention_bias: true,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: 0,
        }
    }

    fn ids(b: usize, t: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + 13) % 97).collect();
        Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
    }

    fn flat(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// (largest |a - b|, largest |b|).
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
        let (a, b) = (flat(a)?, flat(b)?);
        assert_eq!(a.len(), b.len());
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        Ok((d, b.iter().map(|y| y.abs()).fold(0.0, f32::max)))
    }

    /// |a - b| / |b| over all elements (L2).
    fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
        let (a, b) = (flat(a)?, flat(b)?);
        let d: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        Ok((d / n).sqrt())
    }

    fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
        let (a, b) = (flat(a)?, flat(b)?);
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        Ok(dot / (na * nb))
    }

    /// The f32 forward exactly as it was before compute dtypes existed (no casts
    /// anywhere), to show the f32 default is bitwise unchanged.
    fn plain_f32_logits(m: &Llama, ids: &Tensor) -> Result<Tensor> {
        let c = &m.cfg;
        let (b, t) = ids.dims2()?;
        let (h, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let w = |n: &str| m.w(n);
        let mut x = w("model.embed_tokens.weight")?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let (cos, sin) = m.rope_cos_sin(0, t)?;
        let mask = causal_mask(t, &Device::Cpu)?;
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let hn = fused::rms_norm_plain(&x, w(&format!("{p}.input_layernorm.weight"))?, c.rms_norm_eps)?;
            let proj = |n: &str, heads: usize| -> Result<Tensor> {
                let bias = w(&format!("{p}.self_attn.{n}.bias"))?;
                let y = linear(&hn, w(&format!("{p}.self_attn.{n}.weight"))?, Some(bias))?;
                Ok(y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = rope(&proj("q_proj", h)?, &cos, &sin)?;
            let k = repeat_kv(&rope(&proj("k_proj", hkv)?, &cos, &sin)?, h / hkv)?;
            let v = repeat_kv(&proj("v_proj", hkv)?, h / hkv)?;
            let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
            let y = softmax_last(&att)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, h * hd))?;
            x = (x + linear(&y, w(&format!("{p}.self_attn.o_proj.weight"))?, None)?)?;
            let hn = fused::rms_norm_plain(&x, w(&format!("{p}.post_attention_layernorm.weight"))?, c.rms_norm_eps)?;
            let gate = linear(&hn, w(&format!("{p}.mlp.gate_proj.weight"))?, None)?;
            let up = linear(&hn, w(&format!("{p}.mlp.up_proj.weight"))?, None)?;
            x = (x + linear(&(gate.silu()? * up)?, w(&format!("{p}.mlp.down_proj.weight"))?, None)?)?;
        }
        let x = fused::rms_norm_plain(&x, w("model.norm.weight")?, c.rms_norm_eps)?;
        linear(&x, &m.lm_head_weight()?, None)
    }

    #[test]
    fn f32_plain_kernels_are_bitwise_the_plain_forward() -> Result<()> {
        for tied in [false, true] {
            let mut m = Llama::init(tiny(tied), 0.2, 7, &Device::Cpu)?;
            assert_eq!(m.compute_dtype(), DType::F32);
            m.set_kernels(Kernels::Plain);
            let x = ids(2, 11)?;
            let plain = flat(&plain_f32_logits(&m, &x)?)?;
            assert_eq!(flat(&m.forward(&x)?)?, plain, "tied={tied}");
            // Switching to bf16 and back leaves no trace.
            m.set_compute_dtype(DType::BF16)?;
            m.set_compute_dtype(DType::F32)?;
            assert_eq!(flat(&m.forward(&x)?)?, plain, "tied={tied}");
        }
        Ok(())
    }

    /// The fused kernels (the CPU f32 default) against the plain ops: logits, and the
    /// gradient of every parameter, on GQA with biases, tied and untied heads.
    #[test]
    fn fused_kernels_match_the_plain_ops_in_logits_and_every_gradient() -> Result<()> {
        for tied in [false, true] {
            let mut m = Llama::init(tiny(tied), 0.2, 7, &Device::Cpu)?;
            assert_eq!(m.kernels(), Kernels::Fused);
            let (x, targets) = (ids(2, 11)?, ids(1, 22)?.flatten_all()?);
            let fused_logits = m.forward(&x)?;
            let fused_grads = grads_of(&m, &x, &targets)?;
            m.set_kernels(Kernels::Plain);
            let plain_logits = m.forward(&x)?;
            let plain_grads = grads_of(&m, &x, &targets)?;
            let (diff, scale) = max_diff(&fused_logits, &plain_logits)?;
            assert!(
                diff <= 1e-5 * scale,
                "tied={tied}: logits differ by {diff} (max {scale})"
            );
            assert_eq!(fused_grads.len(), m.params().len());
            for (name, g) in &fused_grads {
                let (diff, scale) = max_diff(g, &plain_grads[name])?;
                assert!(
                    diff <= 1e-5 * scale.max(1e-12),
                    "tied={tied} {name}: gradient differs by {diff} (max {scale})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn all_finite_finds_nan_and_infinities() -> Result<()> {
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu);
        assert!(all_finite(&t(vec![1.0, -3e38, 0.0, 3e38, 3e38])?)?);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!all_finite(&t(vec![1.0, bad, 2.0])?)?, "{bad}");
        }
        let bf16 = t(vec![1.0, f32::INFINITY])?.to_dtype(DType::BF16)?;
        assert!(!all_finite(&bf16)?);
        Ok(())
    }

    #[test]
    fn unsupported_dtypes_are_errors() -> Result<()> {
        let mut m = Llama::init(tiny(false), 0.2, 7, &Device::Cpu)?;
        for dt in [DType::U32, DType::U8, DType::I64, DType::F64] {
            let err = m.set_compute_dtype(dt).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("bf16"), "{dt:?}: {err}");
        }
        assert_eq!(m.compute_dtype(), DType::F32);
        assert!(m.into_frozen(DType::U32).is_err());
        Ok(())
    }

    /// bf16 keeps 8 significant bits (a rounding costs up to 2^-9 ~ 0.2% relative),
    /// f16 11 (2^-12). Some 20 roundings on the way to a logit (weights, matmul
    /// outputs, rope, SiLU, the attention probabilities), amplified by the random
    /// weights' gain, add up to ~1% relative (L2), and the worst of ~3,000 logits
    /// lands a few times further out. Measured on this model, seeds 0..16, tied and
    /// not: bf16 max |diff| / max |logit| 1.0-3.4%, relative L2 0.8-1.6%; f16
    /// 0.16-0.48% and 0.11-0.20%, the 8x its 3 extra bits predict. Bounds: 6% / 3%
    /// (bf16), 1% / 0.4% (f16).
    #[test]
    fn half_precision_logits_are_close_to_f32() -> Result<()> {
        for tied in [false, true] {
            let mut m = Llama::init(tiny(tied), 0.2, 7, &Device::Cpu)?;
            let x = ids(2, 16)?;
            let want = m.forward(&x)?;
            for (dt, max_bound, l2_bound) in [(DType::BF16, 0.06, 0.03), (DType::F16, 0.01, 0.004)] {
                m.set_compute_dtype(dt)?;
                let got = m.forward(&x)?;
                assert_eq!(got.dtype(), DType::F32);
                assert_eq!(m.forward_hidden(&x)?.dtype(), DType::F32);
                let (d, scale) = max_diff(&got, &want)?;
                let l2 = rel_l2(&got, &want)?;
                eprintln!(
                    "tied={tied} {dt:?}: max |logit diff| {d:.5}, max |logit| {scale:.3}, rel {:.5}, rel L2 {l2:.5}",
                    d / scale
                );
                assert!(d / scale < max_bound, "tied={tied} {dt:?}: {d} vs scale {scale}");
                assert!(l2 < l2_bound, "tied={tied} {dt:?}: relative L2 {l2}");
                // The same argmax nearly everywhere (bf16 may flip near-ties).
                let same = got.argmax(D::Minus1)?.eq(&want.argmax(D::Minus1)?)?;
                let agree = flat(&same.to_dtype(DType::F32)?)?.iter().sum::<f32>() / 32.0;
                assert!(agree >= 0.9, "tied={tied} {dt:?}: argmax agrees on {agree}");
            }
            m.set_compute_dtype(DType::F32)?;
            // The master weights stay f32 whatever the compute dtype.
            assert!(m.tensors()?.values().all(|t| t.dtype() == DType::F32));
        }
        Ok(())
    }

    fn grads_of(m: &Llama, x: &Tensor, targets: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let (b, t) = x.dims2()?;
        let logits = m.forward(x)?.reshape((b * t, m.cfg.vocab_size))?; // (B*T, V) f32
        let loss = candle_nn::loss::cross_entropy(&logits, targets)?;
        let grads = loss.backward()?;
        m.params()
            .iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| Error::Invalid(format!("no gradient for {name}")))?;
                Ok((name.clone(), g.clone()))
            })
            .collect()
    }

    /// Gradients pass back through every cast to the f32 master weights as f32,
    /// and each parameter's bf16 gradient points the same way as its f32 one.
    #[test]
    fn bf16_backward_gives_f32_gradients_close_to_f32_ones() -> Result<()> {
        for tied in [false, true] {
            let mut m = Llama::init(tiny(tied), 0.2, 3, &Device::Cpu)?;
            let x = ids(2, 12)?;
            let targets = ids(1, 24)?.flatten_all()?; // (B*T,)
            let want = grads_of(&m, &x, &targets)?;
            m.set_compute_dtype(DType::BF16)?;
            let got = grads_of(&m, &x, &targets)?;
            assert_eq!(got.len(), m.params().len());
            let mut worst = (f64::INFINITY, String::new());
            for (name, g) in &got {
                assert_eq!(g.dtype(), DType::F32, "{name}");
                assert_eq!(g.dims(), want[name].dims(), "{name}");
                let norm = flat(g)?.iter().map(|v| v.abs()).fold(0.0, f32::max);
                assert!(norm > 0.0, "{name}: zero gradient");
                let c = cosine(g, &want[name])?;
                if c < worst.0 {
                    worst = (c, name.clone());
                }
            }
            eprintln!(
                "tied={tied}: lowest gradient cosine bf16 vs f32 {:.5} ({})",
                worst.0, worst.1
            );
            assert!(worst.0 > 0.99, "tied={tied}: {worst:?}");
        }
        Ok(())
    }

    #[test]
    fn frozen_bf16_teacher_holds_bf16_and_matches_f32() -> Result<()> {
        let m = Llama::init(tiny(false), 0.2, 5, &Device::Cpu)?;
        let x = ids(2, 16)?;
        let want = m.forward(&x)?;
        let want_hidden = m.forward_hidden(&x)?;
        let f = m.into_frozen(DType::BF16)?;
        assert!(f.is_frozen() && f.params().is_empty());
        assert_eq!(f.compute_dtype(), DType::BF16);
        assert_eq!(f.tensors()?.len(), f.cfg.param_shapes().len());
        assert!(f.tensors()?.values().all(|t| t.dtype() == DType::BF16));
        let got = f.forward(&x)?;
        assert_eq!(got.dtype(), DType::F32);
        assert!(!got.track_op(), "a frozen forward builds no graph");
        // The weights themselves are rounded to bf16 here (the embedding too), which
        // measured a little above bf16 compute over seeds 0..16: max 1.2-3.5%,
        // relative L2 0.8-1.8%. Same bounds as bf16 compute.
        let (d, scale) = max_diff(&got, &want)?;
        let l2 = rel_l2(&got, &want)?;
        eprintln!(
            "frozen bf16: max |logit diff| {d:.5}, max |logit| {scale:.3}, rel {:.5}, rel L2 {l2:.5}",
            d / scale
        );
        assert!(d / scale < 0.06 && l2 < 0.03, "{d} vs {scale}, relative L2 {l2}");
        // The fused-head split still hands out f32.
        let hidden = f.forward_hidden(&x)?;
        assert_eq!(hidden.dtype(), DType::F32);
        assert_eq!(f.lm_head_weight()?.dtype(), DType::F32);
        let (dh, sh) = max_diff(&hidden, &want_hidden)?;
        assert!(dh / sh < 0.06, "hidden {dh} vs {sh}");
        Ok(())
    }

    /// Decoding token by token over a bf16 slotted KV cache gives the full forward's
    /// logits (same dtype), for a bf16-compute trainable model and a frozen one.
    #[test]
    fn bf16_kv_cache_matches_the_full_forward() -> Result<()> {
        use crate::kernels::decode::CacheRows;
        use crate::model::slots::KvSlots;
        let mut m = Llama::init(tiny(false), 0.2, 9, &Device::Cpu)?;
        m.set_compute_dtype(DType::BF16)?;
        let frozen = Llama::init(tiny(true), 0.2, 9, &Device::Cpu)?.into_frozen(DType::BF16)?;
        for model in [&m, &frozen] {
            let x = ids(1, 10)?;
            let full = model.forward(&x)?.squeeze(0)?; // (10, V)
            let tokens: Vec<u32> = x.squeeze(0)?.to_vec1()?;
            let cache = KvSlots::new(model, 1, 10)?;
            assert_eq!(
                cache.bytes(),
                2 * model.cfg.num_hidden_layers * 10 * model.cfg.num_key_value_heads * model.cfg.head_dim() * 2
            );
            let rows = |pos: Vec<usize>| CacheRows {
                slot: vec![0; pos.len()],
                pos,
                max_len: 10,
            };
            let mut steps = vec![model.forward_slots(&tokens[..6], &rows((0..6).collect()), &cache)?];
            for i in 6..10 {
                steps.push(model.forward_slots(&tokens[i..i + 1], &rows(vec![i]), &cache)?);
            }
            let cached = model.head_logits(&Tensor::cat(&steps, 0)?)?;
            assert_eq!(cached.dtype(), DType::F32);
            let (d, scale) = max_diff(&cached, &full)?;
            eprintln!("bf16 kv cache vs full: max |diff| {d:.5}, max |logit| {scale:.3}");
            // Same dtype both ways, so only the order of the sums differs.
            assert!(d / scale < 0.01, "{d} vs {scale}");
        }
        Ok(())
    }
}
