//! The forward of the rollout engine: new tokens of many sequences at once, each in its
//! own slot of a KV cache allocated once and written in place.
//!
//! A step takes a list of queries, each a token of one sequence at one position. A
//! prompt being prefilled contributes its T tokens at positions 0..T; a sequence being
//! decoded contributes its last token at its current length. Both kinds go through the
//! same matmuls (the step is one (1, n, d) batch of rows) and the same attention
//! (`kernels::decode`): each query attends the keys of its own slot up to its position,
//! so sequences of any lengths share a step with no padding.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::decode::{decode_attention, decode_attention_plain, CacheRows};
use crate::kernels::ops as fused;
use crate::model::Llama;

/// The keys and values of `slots` sequences of up to `max_len` tokens, per layer: two
/// (slots * max_len, Hkv * D) tensors in the model's compute dtype, allocated once.
pub struct KvSlots {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    max_len: usize,
}

impl KvSlots {
    /// A zeroed cache for `slots` sequences of up to `max_len` tokens of `model`.
    pub fn new(model: &Llama, slots: usize, max_len: usize) -> Result<Self> {
        let cfg = &model.cfg;
        if max_len > cfg.max_position_embeddings || slots == 0 || max_len == 0 {
            return Err(Error::Invalid(format!(
                "a KV cache of {slots} slots of {max_len} tokens does not fit a model of context {}",
                cfg.max_position_embeddings
            )));
        }
        let shape = (slots * max_len, cfg.num_key_value_heads * cfg.head_dim());
        let zeros = || Tensor::zeros(shape, model.compute_dtype(), model.device());
        let layers = cfg.num_hidden_layers;
        Ok(Self {
            k: (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
            v: (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Copies positions 0..len of slot `from` to slot `to` in every layer: the prefill of
    /// a prompt that another slot already holds.
    pub fn copy_prefix(&self, from: usize, to: usize, len: usize) -> Result<()> {
        if len == 0 || from == to {
            return Ok(());
        }
        for c in self.k.iter().chain(&self.v) {
            let src = c.narrow(0, from * self.max_len, len)?.force_contiguous()?; // a copy of these rows only
            c.slice_set(&src, 0, to * self.max_len)?;
        }
        Ok(())
    }

    /// The scatter index of a step's cache writes: (n, Hkv * D), row r all `rows.row(r)`.
    /// The same for every layer and for keys and values, so a step builds it once.
    fn row_index(rows: &CacheRows, width: usize, device: &candle_core::Device) -> Result<Tensor> {
        let idx: Vec<u32> = (0..rows.len())
            .flat_map(|r| std::iter::repeat_n(rows.row(r) as u32, width))
            .collect();
        Ok(Tensor::from_vec(idx, (rows.len(), width), device)?)
    }

    /// Writes the keys (or values) `x` (n, Hkv * D) of the queries to their cache rows
    /// (`idx` from `row_index`).
    fn write(cache: &Tensor, x: &Tensor, idx: &Tensor) -> Result<()> {
        cache.scatter_set(idx, &x.to_dtype(cache.dtype())?.contiguous()?, 0)?;
        Ok(())
    }
}

impl Llama {
    /// One step of the rollout engine: query r is `tokens[r]` at position `rows.pos[r]`
    /// of the sequence in slot `rows.slot[r]`. Writes every query's keys and values into
    /// `cache`, then returns the final hidden states (n, d) f32 of the queries, after the
    /// last RMSNorm (`head_logits` turns them into logits).
    pub fn forward_slots(&self, tokens: &[u32], rows: &CacheRows, cache: &KvSlots) -> Result<Tensor> {
        let n = tokens.len();
        if n != rows.len() || rows.max_len != cache.max_len {
            return Err(Error::Shape(format!(
                "forward_slots: {n} tokens for {} query rows (cache of {} positions per slot, rows for {})",
                rows.len(),
                cache.max_len,
                rows.max_len
            )));
        }
        let (d, cdt, fused) = (self.cfg.hidden_size, self.compute_dtype(), self.fused());
        let ids = Tensor::from_vec(tokens.to_vec(), n, self.device())?;
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&ids, 0)?
            .reshape((1, n, d))?
            .to_dtype(DType::F32)?; // (1, n, d): the queries as one row of n positions
        let (cos, sin) = self.rope_cos_sin_at(&rows.pos)?;
        let (cos, sin) = (cos.to_dtype(cdt)?, sin.to_dtype(cdt)?); // (n, D/2)
        let norm = |x: &Tensor, name: &str| self.rms_norm(x, name);
        let rows_idx = KvSlots::row_index(rows, self.cfg.num_key_value_heads * self.cfg.head_dim(), self.device())?;
        for i in 0..self.cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let h = norm(&x, &format!("{p}.input_layernorm.weight"))?.to_dtype(cdt)?;
            let kv = (&cache.k[i], &cache.v[i]);
            let a = self.slot_attention(&h, &p, (&cos, &sin), (rows, &rows_idx), kv)?;
            x = (x + a.to_dtype(DType::F32)?)?;
            let h = norm(&x, &format!("{p}.post_attention_layernorm.weight"))?.to_dtype(cdt)?;
            x = (x + self.mlp(&h, &p, fused)?.to_dtype(DType::F32)?)?;
        }
        Ok(norm(&x, "model.norm.weight")?.reshape((n, d))?)
    }

    /// Attention of the queries x (1, n, d) over their slots: projections, rotary
    /// embedding at each query's position, the cache writes, then `kernels::decode`.
    fn slot_attention(
        &self,
        x: &Tensor,
        p: &str,
        (cos, sin): (&Tensor, &Tensor),
        (rows, rows_idx): (&CacheRows, &Tensor),
        (k_cache, v_cache): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let n = rows.len();
        let (h, hkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let fused = self.fused();
        let proj = |name: &str, heads: usize| -> Result<Tensor> {
            let bias = if self.cfg.attention_bias {
                Some(self.wc(&format!("{p}.self_attn.{name}.bias"))?)
            } else {
                None
            };
            let y = self.proj(x, &format!("{p}.self_attn.{name}.weight"), bias.as_ref())?;
            Ok(y.reshape((1, n, heads, hd))?)
        };
        let rope = |t: Tensor| {
            if fused {
                fused::rope(&t, cos, sin)
            } else {
                fused::rope_plain(&t, cos, sin)
            }
        };
        let q = rope(proj("q_proj", h)?)?.reshape((n, h, hd))?;
        let k = rope(proj("k_proj", hkv)?)?.reshape((n, hkv * hd))?;
        let v = proj("v_proj", hkv)?.reshape((n, hkv * hd))?;
        KvSlots::write(k_cache, &k, rows_idx)?;
        KvSlots::write(v_cache, &v, rows_idx)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let y = if fused {
            decode_attention(&q, k_cache, v_cache, rows, scale)?
        } else {
            decode_attention_plain(&q, k_cache, v_cache, rows, scale)?
        };
        self.proj(
            &y.reshape((1, n, h * hd))?,
            &format!("{p}.self_attn.o_proj.weight"),
            None,
        )
    }
}
