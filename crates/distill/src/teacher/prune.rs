//! Student initialisation by pruning a teacher, after NVIDIA's Minitron
//! (Muralidharan et al. 2024, "Compact Language Models via Pruning and
//! Knowledge Distillation", arXiv 2407.14679).
//!
//! Instead of starting a student from random weights, take the teacher and cut
//! it down, then distil into the result:
//!
//! - [`depth_prune`] drops whole decoder layers;
//! - [`estimate_importance`] runs the teacher on calibration batches and scores
//!   every attention head, MLP neuron and embedding channel by the size of its
//!   activations (the paper's activation-based importance, forward passes only);
//! - [`width_prune`] keeps the top-scored heads, neurons and channels and slices
//!   every weight to match.
//!
//! The activations are taken from a copy of `Llama::forward` written here from
//! the model's named tensors (`llama.rs` keeps its layer functions private); a
//! test checks that the copy gives the real model's logits.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::prepare::data::batch;
use crate::progress::Progress;
// The plain building blocks of `Llama`'s forward, so that `probe_forward` computes
// exactly what `Llama::forward` does with `Kernels::Plain`.
use crate::kernels::ops::rms_norm_plain as rms_norm;
use crate::model::llama::{linear, repeat_kv, rope, rope_angles, rope_inv_freq, softmax_last};
use crate::model::{Llama, ModelConfig};

/// The checks of `depth_prune`: `keep_layers` non-empty, in range of the teacher's
/// `n_layers`, strictly increasing.
pub fn check_keep_layers(n_layers: usize, keep_layers: &[usize]) -> Result<()> {
    if keep_layers.is_empty() {
        return Err(Error::Invalid(
            "depth_prune: keep_layers is empty; name at least one of the teacher's layers to keep".into(),
        ));
    }
    for (pos, &layer) in keep_layers.iter().enumerate() {
        if layer >= n_layers {
            return Err(Error::Invalid(format!(
                "depth_prune: keep_layers[{pos}] = {layer} is out of range; the teacher has {n_layers} layers, numbered from 0"
            )));
        }
        if pos > 0 && layer <= keep_layers[pos - 1] {
            return Err(Error::Invalid(format!(
                "depth_prune: keep_layers[{pos}] = {layer} does not follow keep_layers[{}] = {}; list the layers to keep once each, in increasing order",
                pos - 1,
                keep_layers[pos - 1]
            )));
        }
    }
    Ok(())
}

/// Keeps the decoder layers `keep_layers` of `teacher` (strictly increasing
/// indices into its layers, at least one) and renumbers them 0..n; embeddings,
/// final norm and head are copied unchanged. This is Minitron's depth pruning;
/// which layers to keep is the caller's choice (the paper picks contiguous
/// blocks by the LM loss or downstream accuracy of the model without them).
pub fn depth_prune(teacher: &Llama, keep_layers: &[usize]) -> Result<Llama> {
    check_keep_layers(teacher.cfg.num_hidden_layers, keep_layers)?;
    let renumber: BTreeMap<usize, usize> = keep_layers.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let mut out = BTreeMap::new();
    for (name, t) in teacher.tensors()? {
        match layer_of(&name) {
            None => {
                out.insert(name, t);
            }
            Some((old, rest)) => {
                if let Some(new) = renumber.get(&old) {
                    out.insert(format!("model.layers.{new}.{rest}"), t);
                }
            }
        }
    }
    let mut cfg = teacher.cfg.clone();
    cfg.num_hidden_layers = keep_layers.len();
    build(cfg, out, teacher.device())
}

/// `model.layers.{i}.{rest}` -> (i, rest).
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let tail = name.strip_prefix("model.layers.")?;
    let (i, rest) = tail.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

fn build(cfg: ModelConfig, tensors: BTreeMap<String, Tensor>, device: &Device) -> Result<Llama> {
    Llama::from_tensors(cfg, tensors, device)
        .map_err(|e| Error::Invalid(format!("internal: the pruned model does not assemble: {e}")))
}

/// Activation-based importance of every prunable unit of a teacher, as in
/// Minitron (Muralidharan et al. 2024). Higher is more important.
///
/// Each unit's activation is reduced to one number per calibration sequence by
/// the **mean over the sequence** of its magnitude, and those numbers are
/// combined over the batch (all calibration sequences) by the **L2 norm**. This
/// is the paper's best "(L2, mean)" aggregation, whose tuple is written
/// (batch, sequence): L2 across the batch, mean across the sequence (NVIDIA's
/// Model Optimizer computes its Minitron scores the same way:
/// `abs().mean(seq)`, then square, sum over batch, square root). A channel that
/// is large on a few tokens of many sequences thus beats one that is large on
/// one sequence only. The magnitude is `|a|` for channels and neurons (so that
/// signed activations do not cancel), and the L2 norm over the head dimension
/// for a head's output vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    /// `heads[layer][h]`: query head `h`'s attention output (softmax(QK^T)V for
    /// that head, before `o_proj`), (L, H). With grouped-query attention heads
    /// are pruned a key/value group at a time; see [`Importance::kv_groups`].
    pub heads: Vec<Vec<f32>>,
    /// `neurons[layer][j]`: the MLP's inner activation `silu(gate_j) * up_j`,
    /// the input of `down_proj`, (L, F).
    pub neurons: Vec<Vec<f32>>,
    /// `channels[c]`: embedding (residual stream) channel `c`, from the outputs
    /// of every RMSNorm that reads the stream (each layer's input and
    /// post-attention norms and the final norm); the per-norm scores are
    /// summed, since one set of channels is kept for the whole stream. (d,)
    pub channels: Vec<f32>,
}

impl Importance {
    /// Scores per key/value group: the sum of the scores of the query heads
    /// that share the group's key and value head, (L, H_kv). Query head `h`
    /// belongs to group `h / (H / H_kv)`, as in `Llama`'s `repeat_kv`.
    pub fn kv_groups(&self, num_key_value_heads: usize) -> Vec<Vec<f32>> {
        self.heads
            .iter()
            .map(|layer| {
                let group = (layer.len() / num_key_value_heads.max(1)).max(1);
                layer.chunks(group).map(|c| c.iter().sum()).collect()
            })
            .collect()
    }
}

/// Runs `teacher` on `calibration` (token ids, each (B, T) u32; all positions
/// count, so pass unpadded text) and returns the activation-based [`Importance`]
/// of its heads, MLP neurons and embedding channels. Forward passes only; the
/// paper calibrates on about a thousand sequences (1024 samples).
pub fn estimate_importance(teacher: &Llama, calibration: &[Tensor]) -> Result<Importance> {
    let cfg = &teacher.cfg;
    if calibration.is_empty() {
        return Err(Error::Invalid(
            "estimate_importance: no calibration batches; pass at least one (B, T) tensor of token ids".into(),
        ));
    }
    let (l, h, f, d) = (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.hidden_size,
    );
    // Running sums over sequences of (per-sequence mean magnitude)^2.
    let mut acc = Accum {
        heads: vec![vec![0.0; h]; l],
        neurons: vec![vec![0.0; f]; l],
        norms: vec![vec![0.0; d]; 2 * l + 1],
    };
    let weights = Weights::of(teacher)?;
    for (i, ids) in calibration.iter().enumerate() {
        let ids = check_ids(ids, cfg, teacher.device())
            .map_err(|e| Error::Shape(format!("estimate_importance: calibration batch {i}: {e}")))?;
        probe_forward(&weights, &ids, Some(&mut acc))?;
    }
    let root = |v: &[f64]| -> Vec<f32> { v.iter().map(|x| x.sqrt() as f32).collect() };
    let mut channels = vec![0f32; d];
    for site in &acc.norms {
        for (c, s) in channels.iter_mut().zip(root(site)) {
            *c += s;
        }
    }
    Ok(Importance {
        heads: acc.heads.iter().map(|v| root(v)).collect(),
        neurons: acc.neurons.iter().map(|v| root(v)).collect(),
        channels,
    })
}

/// Checks calibration ids: (B, T) u32, non-empty, within the vocabulary and the
/// position limit. Returns them on the model's device.
fn check_ids(ids: &Tensor, cfg: &ModelConfig, device: &Device) -> Result<Tensor> {
    let (b, t) = ids
        .dims2()
        .map_err(|_| Error::Shape(format!("expected token ids of shape (B, T), got {:?}", ids.dims())))?;
    if ids.dtype() != DType::U32 {
        return Err(Error::Shape(format!("expected u32 token ids, got {:?}", ids.dtype())));
    }
    if b == 0 || t == 0 {
        return Err(Error::Shape(format!("empty batch of shape ({b}, {t})")));
    }
    if t > cfg.max_position_embeddings {
        return Err(Error::Shape(format!(
            "{t} tokens per sequence exceed max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    let ids = ids.to_device(device)?;
    let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
    if max as usize >= cfg.vocab_size {
        return Err(Error::Shape(format!(
            "token id {max} is outside the vocabulary of {} tokens",
            cfg.vocab_size
        )));
    }
    Ok(ids)
}

/// Per-sequence statistics summed over calibration sequences.
struct Accum {
    heads: Vec<Vec<f64>>,   // (L, H)
    neurons: Vec<Vec<f64>>, // (L, F)
    /// One row per RMSNorm reading the stream: layer i's input norm at 2i, its
    /// post-attention norm at 2i + 1, the final norm last. (2L + 1, d)
    norms: Vec<Vec<f64>>,
}

/// Adds sum over batch of (mean over T of `mag`)^2 to `acc`: mag (B, T, C).
fn add_l2_mean(acc: &mut [f64], mag: &Tensor) -> Result<()> {
    let per_seq = mag.mean(1)?; // (B, C)
    let sq = per_seq.sqr()?.sum(0)?.to_vec1::<f32>()?; // (C,)
    for (a, s) in acc.iter_mut().zip(sq) {
        *a += s as f64;
    }
    Ok(())
}

/// The teacher's weights, detached, with its rotary inverse frequencies (the angles of
/// the positions a forward uses are built from them, as `Llama` builds them).
struct Weights {
    cfg: ModelConfig,
    w: BTreeMap<String, Tensor>,
    inv_freq: Tensor, // (1, D/2)
    device: Device,
}

impl Weights {
    fn of(model: &Llama) -> Result<Self> {
        let cfg = model.cfg.clone();
        let device = model.device().clone();
        Ok(Self {
            w: model.tensors()?,
            inv_freq: rope_inv_freq(&cfg, &device)?,
            cfg,
            device,
        })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("internal: parameter {name} missing")))
    }
}

/// `Llama::forward` op for op (same ops in the same order, so the logits agree
/// to rounding), recording into `acc` the activations that importance scoring
/// needs. ids (B, T) u32 -> logits (B, T, V).
fn probe_forward(w: &Weights, ids: &Tensor, mut acc: Option<&mut Accum>) -> Result<Tensor> {
    let cfg = &w.cfg;
    let (b, t) = ids.dims2()?;
    let (d, h, hkv, hd) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let eps = cfg.rms_norm_eps;
    let mut x = w
        .get("model.embed_tokens.weight")?
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))?; // (B, T, d)
    let freqs = rope_angles(&w.inv_freq, 0, t)?; // (T, D/2)
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let mask = causal_mask(t, &w.device)?; // (T, T)
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let hin = rms_norm(&x, w.get(&format!("{p}.input_layernorm.weight"))?, eps)?; // (B, T, d)
        if let Some(a) = acc.as_deref_mut() {
            add_l2_mean(&mut a.norms[2 * i], &hin.abs()?)?;
        }

        // Attention, as `Llama::attention` without a cache.
        let bias = |n: &str| -> Result<Option<&Tensor>> {
            if cfg.attention_bias {
                w.get(&format!("{p}.self_attn.{n}.bias")).map(Some)
            } else {
                Ok(None)
            }
        };
        let proj = |n: &str, heads: usize| -> Result<Tensor> {
            let y = linear(&hin, w.get(&format!("{p}.self_attn.{n}.weight"))?, bias(n)?)?;
            Ok(y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) // (B, heads, T, D)
        };
        let q = rope(&proj("q_proj", h)?, &cos, &sin)?;
        let k = rope(&proj("k_proj", hkv)?, &cos, &sin)?;
        let v = proj("v_proj", hkv)?;
        let k = repeat_kv(&k, h / hkv)?; // (B, H, T, D)
        let v = repeat_kv(&v, h / hkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?; // (B, H, T, T)
        let att = softmax_last(&att)?;
        let y = att.matmul(&v)?; // (B, H, T, D): each head's output before o_proj
        if let Some(a) = acc.as_deref_mut() {
            let norm = y.sqr()?.sum(D::Minus1)?.sqrt()?.transpose(1, 2)?; // (B, T, H)
            add_l2_mean(&mut a.heads[i], &norm)?;
        }
        let y = y.transpose(1, 2)?.reshape((b, t, h * hd))?; // (B, T, H*D)
        x = (x + linear(&y, w.get(&format!("{p}.self_attn.o_proj.weight"))?, None)?)?;

        let hpost = rms_norm(&x, w.get(&format!("{p}.post_attention_layernorm.weight"))?, eps)?; // (B, T, d)
        if let Some(a) = acc.as_deref_mut() {
            add_l2_mean(&mut a.norms[2 * i + 1], &hpost.abs()?)?;
        }
        let gate = linear(&hpost, w.get(&format!("{p}.mlp.gate_proj.weight"))?, None)?; // (B, T, F)
        let up = linear(&hpost, w.get(&format!("{p}.mlp.up_proj.weight"))?, None)?;
        let inner = (gate.silu()? * up)?; // (B, T, F)
        if let Some(a) = acc.as_deref_mut() {
            add_l2_mean(&mut a.neurons[i], &inner.abs()?)?;
        }
        x = (x + linear(&inner, w.get(&format!("{p}.mlp.down_proj.weight"))?, None)?)?;
    }
    let x = rms_norm(&x, w.get("model.norm.weight")?, eps)?; // (B, T, d)
    if let Some(a) = acc {
        add_l2_mean(&mut a.norms[2 * cfg.num_hidden_layers], &x.abs()?)?;
    }
    let head = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    linear(&x, w.get(head)?, None) // (B, T, V)
}

/// Additive causal mask, (T, T).
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
}

/// The size of a width-pruned student. `num_key_value_heads` follows from the
/// teacher's grouped-query ratio (see [`width_prune`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidthTarget {
    /// Embedding (residual stream) channels kept.
    pub hidden_size: usize,
    /// MLP neurons kept in every layer.
    pub intermediate_size: usize,
    /// Query heads kept in every layer.
    pub num_attention_heads: usize,
}

impl WidthTarget {
    /// The teacher's own sizes (pruning to them is the identity).
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
        }
    }
}

/// The checks of `width_prune` that need only the teacher's architecture, so that a
/// pipeline can refuse an unreachable target before it trains or loads anything.
pub fn check_width_target(cfg: &ModelConfig, target: WidthTarget) -> Result<()> {
    let (h, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let bad = |msg: String| Err(Error::Invalid(format!("width_prune: {msg}")));
    if h == 0 || hkv == 0 || h % hkv != 0 {
        return bad(format!(
            "the teacher's num_key_value_heads {hkv} does not divide num_attention_heads {h}"
        ));
    }
    let hd = cfg.head_dim();
    for (what, want, have) in [
        ("hidden_size", target.hidden_size, d),
        ("intermediate_size", target.intermediate_size, f),
        ("num_attention_heads", target.num_attention_heads, h),
    ] {
        if want == 0 || want > have {
            return bad(format!(
                "target {what} = {want} is not reachable from the teacher's {have}; choose 1..={have}"
            ));
        }
    }
    let group = h / hkv;
    if !target.num_attention_heads.is_multiple_of(group) {
        return bad(format!(
            "target num_attention_heads = {} is not a multiple of the teacher's GQA group size {group} ({h} query heads / {hkv} key-value heads); whole key/value groups are pruned, so choose a multiple of {group}",
            target.num_attention_heads
        ));
    }
    if target.hidden_size != target.num_attention_heads * hd {
        return bad(format!(
            "target hidden_size = {} must equal num_attention_heads ({}) x the teacher's head_dim ({hd}) = {}, because the model derives head_dim as hidden_size / num_attention_heads and pruning keeps head_dim",
            target.hidden_size,
            target.num_attention_heads,
            target.num_attention_heads * hd
        ));
    }
    Ok(())
}

/// Minitron width pruning: keeps, in their original order, the `target`
/// top-scored embedding channels (one set for the whole residual stream),
/// attention heads and MLP neurons (chosen per layer), and slices every weight
/// to match: the embedding, norms and head lose columns/entries, q/k/v and
/// gate/up lose rows of the pruned heads/neurons and columns of the pruned
/// channels, o_proj and down_proj the reverse. Ties go to the lower index.
///
/// **Grouped-query attention.** Heads are removed a key/value group at a time:
/// a group (one k/v head and the `H / H_kv` query heads that read it) is scored
/// by the sum of its query heads' scores ([`Importance::kv_groups`]), and the
/// top `target.num_attention_heads / (H / H_kv)` groups are kept whole. The
/// student keeps the teacher's group size, so it is again a valid GQA model
/// with `num_key_value_heads = target heads / group size`; the target head
/// count must therefore be a multiple of the group size.
///
/// **Head dimension.** Minitron keeps the head dimension and prunes the
/// embedding width separately, but `ModelConfig` derives the head dimension as
/// `hidden_size / num_attention_heads`, so the target must satisfy
/// `hidden_size == num_attention_heads * teacher head_dim`.
///
/// Unlike the paper, pruned heads' outputs are not folded back into the kept
/// ones; distillation afterwards is what recovers the accuracy.
pub fn width_prune(teacher: &Llama, importance: &Importance, target: WidthTarget) -> Result<Llama> {
    let cfg = &teacher.cfg;
    check_width_target(cfg, target)?;
    let (l, h, hkv) = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads);
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    check_importance(importance, l, h, f, d)?;
    let (hd, group) = (cfg.head_dim(), h / hkv);

    let dev = teacher.device();

    let idx = |v: &[usize]| -> Result<Tensor> {
        let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
        let n = v.len();
        Ok(Tensor::from_vec(v, n, dev)?)
    };
    let channels = idx(&top_k(&importance.channels, target.hidden_size))?; // (d',)
    let groups = importance.kv_groups(hkv);
    let mut out = BTreeMap::new();
    for (name, t) in teacher.tensors()? {
        let sliced = match layer_of(&name) {
            None if name.ends_with("norm.weight") => t.index_select(&channels, 0)?, // (d',)
            None => t.index_select(&channels, 1)?,                                  // embed_tokens, lm_head: (V, d')
            Some((i, rest)) => {
                let kept_groups = top_k(&groups[i], target.num_attention_heads / group);
                // Rows of the kept heads in q (H*D) and k/v (H_kv*D) layouts.
                let kv_rows: Vec<usize> = kept_groups.iter().flat_map(|&g| g * hd..(g + 1) * hd).collect();
                let q_rows: Vec<usize> = kept_groups
                    .iter()
                    .flat_map(|&g| g * group * hd..(g + 1) * group * hd)
                    .collect();
                let neurons = idx(&top_k(&importance.neurons[i], target.intermediate_size))?;
                let (q_rows, kv_rows) = (idx(&q_rows)?, idx(&kv_rows)?);
                match rest {
                    "input_layernorm.weight" | "post_attention_layernorm.weight" => t.index_select(&channels, 0)?,
                    "self_attn.q_proj.weight" => t.index_select(&q_rows, 0)?.index_select(&channels, 1)?,
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                        t.index_select(&kv_rows, 0)?.index_select(&channels, 1)?
                    }
                    "self_attn.q_proj.bias" => t.index_select(&q_rows, 0)?,
                    "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => t.index_select(&kv_rows, 0)?,
                    "self_attn.o_proj.weight" => t.index_select(&channels, 0)?.index_select(&q_rows, 1)?,
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => {
                        t.index_select(&neurons, 0)?.index_select(&channels, 1)?
                    }
                    "mlp.down_proj.weight" => t.index_select(&channels, 0)?.index_select(&neurons, 1)?,
                    other => {
                        return Err(Error::Invalid(format!(
                            "internal: width_prune does not know how to slice `{other}`"
                        )))
                    }
                }
            }
        };
        out.insert(name, sliced);
    }
    let mut student = cfg.clone();
    student.hidden_size = target.hidden_size;
    student.intermediate_size = target.intermediate_size;
    student.num_attention_heads = target.num_attention_heads;
    student.num_key_value_heads = target.num_attention_heads / group;
    build(student, out, dev)
}

/// Importance must describe this teacher, with finite scores.
fn check_importance(imp: &Importance, l: usize, h: usize, f: usize, d: usize) -> Result<()> {
    let fail = |msg: String| {
        Err(Error::Invalid(format!(
            "width_prune: {msg}; was the importance estimated on this teacher?"
        )))
    };
    if imp.heads.len() != l || imp.neurons.len() != l {
        return fail(format!(
            "importance has {} head rows and {} neuron rows, the teacher has {l} layers",
            imp.heads.len(),
            imp.neurons.len()
        ));
    }
    if let Some((i, row)) = imp.heads.iter().enumerate().find(|(_, r)| r.len() != h) {
        return fail(format!(
            "importance.heads[{i}] has {} scores, the teacher has {h} heads",
            row.len()
        ));
    }
    if let Some((i, row)) = imp.neurons.iter().enumerate().find(|(_, r)| r.len() != f) {
        return fail(format!(
            "importance.neurons[{i}] has {} scores, the teacher has intermediate_size {f}",
            row.len()
        ));
    }
    if imp.channels.len() != d {
        return fail(format!(
            "importance.channels has {} scores, the teacher has hidden_size {d}",
            imp.channels.len()
        ));
    }
    let mut all = imp.heads.iter().chain(&imp.neurons).flatten().chain(&imp.channels);
    if all.any(|x| !x.is_finite()) {
        return fail("importance has a non-finite score".into());
    }
    Ok(())
}

/// Indices of the `k` largest scores, in increasing index order (ties: lower index).
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// The teacher layers a pruned student keeps (`[student] prune_layers`, or spread
/// evenly with the first and last included) and its width target (`[student.model]`),
/// checked against the teacher's architecture: an error names the keys to change.
pub fn prune_plan(teacher: &ModelConfig, cfg: &Config) -> Result<(Vec<usize>, WidthTarget)> {
    let spec = &cfg.student.model;
    let (l, n) = (teacher.num_hidden_layers, spec.num_layers);
    let layers: Vec<usize> = match &cfg.student.prune_layers {
        Some(v) => v.clone(),
        None if n > l => {
            return Err(Error::Invalid(format!(
                "student.model.num_layers = {n} exceeds the teacher's {l} layers; a pruned student keeps some of them"
            )))
        }
        None if n == 1 => vec![0],
        None => (0..n).map(|i| (i * (l - 1) + (n - 1) / 2) / (n - 1)).collect(),
    };
    let target = WidthTarget {
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_attention_heads: spec.num_heads,
    };
    let explain = |e: Error| {
        Error::Invalid(format!(
            "[student] init = {:?} cannot cut [student.model] from this teacher: {e}; change [student.model] \
             or [student] prune_layers, or use init = \"random\"",
            cfg.student.init
        ))
    };
    crate::teacher::prune::check_keep_layers(l, &layers).map_err(explain)?;
    crate::teacher::prune::check_width_target(teacher, target).map_err(explain)?;
    Ok((layers, target))
}

/// The student cut from the teacher: its layers `student.prune_layers` (default: spread
/// evenly), then, scored by their activations on the first `student.calibration_examples`
/// training examples, its most important heads, MLP neurons and embedding channels, down
/// to `[student.model]`'s sizes (`prune`). Returns the model, the calibration FLOPs and
/// tokens.
pub fn pruned_student(
    teacher: &Llama,
    cfg: &Config,
    train: &[batch::Encoded],
    dev: &Device,
    progress: &dyn Progress,
) -> Result<(Llama, f64, u64)> {
    let (layers, target) = prune_plan(&teacher.cfg, cfg)?;
    let depth = crate::teacher::prune::depth_prune(teacher, &layers)?;
    let calib: Vec<candle_core::Tensor> = train
        .iter()
        .take(cfg.student.calibration_examples)
        .map(|e| candle_core::Tensor::from_vec(e.ids.clone(), (1, e.ids.len()), dev))
        .collect::<candle_core::Result<_>>()?;
    let tokens: u64 = calib.iter().map(|t| t.elem_count() as u64).sum();
    let flops: f64 = calib
        .iter()
        .map(|t| depth.cfg.forward_flops_per_token(t.elem_count()) * t.elem_count() as f64)
        .sum();
    let importance = crate::teacher::prune::estimate_importance(&depth, &calib)?;
    let student = crate::teacher::prune::width_prune(&depth, &importance, target)?;
    progress.message(&format!(
        "prune: teacher layers {layers:?}, then width to hidden {} / {} heads ({} kv) / MLP {} by activations on {} examples: {} -> {} parameters",
        student.cfg.hidden_size,
        student.cfg.num_attention_heads,
        student.cfg.num_key_value_heads,
        student.cfg.intermediate_size,
        calib.len(),
        teacher.cfg.num_params(),
        student.cfg.num_params()
    ));
    Ok((student, flops, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSpec;

    const V: usize = 48;

    /// 3 layers, d 16, 4 heads of 4 dims, FFN 24, vocabulary 48.
    fn tiny(kv_heads: Option<usize>, tie: bool, bias: bool, seed: u64) -> Result<Llama> {
        let spec = ModelSpec {
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: kv_heads,
            tie_embeddings: tie,
            attention_bias: bias,
            max_position_embeddings: 32,
            ..ModelSpec::default()
        };
        let model = Llama::init(ModelConfig::from_spec(&spec, V, 1, 2, 0), 0.1, seed, &Device::Cpu)?;
        if !bias {
            return Ok(model);
        }
        // Init makes biases zero; give them values so that slicing them is tested.
        edited(&model, |w| {
            for (name, t) in w.iter_mut() {
                if name.ends_with(".bias") {
                    let n = t.elem_count();
                    let v: Vec<f32> = (0..n).map(|i| 0.05 * ((i * 7 % 11) as f32 - 5.0)).collect();
                    *t = Tensor::from_vec(v, n, &Device::Cpu)?;
                }
            }
            Ok(())
        })
    }

    /// A copy of `model` with some tensors changed.
    fn edited(model: &Llama, edit: impl FnOnce(&mut BTreeMap<String, Tensor>) -> Result<()>) -> Result<Llama> {
        let mut w = model.tensors()?;
        edit(&mut w)?;
        build(model.cfg.clone(), w, &Device::Cpu)
    }

    /// Deterministic token ids, (B, T).
    fn ids(b: usize, t: usize, salt: usize) -> Result<Tensor> {
        let v: Vec<u32> = (0..b * t).map(|i| ((i * 7 + salt * 13 + i / 5) % V) as u32).collect();
        Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
    }

    fn calibration() -> Result<Vec<Tensor>> {
        (0..3).map(|s| ids(4, 12, s)).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// t[rows][:, cols] by plain indexing, independent of `index_select`.
    fn gather(t: &Tensor, rows: &[usize], cols: &[usize]) -> Result<Vec<Vec<f32>>> {
        let m = t.to_vec2::<f32>()?;
        Ok(rows.iter().map(|&r| cols.iter().map(|&c| m[r][c]).collect()).collect())
    }

    fn all(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    fn err_text<T>(r: Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn probe_forward_matches_llama_forward() -> Result<()> {
        for (kv, tie, bias) in [(None, false, false), (Some(2), true, true), (Some(1), false, true)] {
            let model = tiny(kv, tie, bias, 5)?;
            let x = ids(2, 9, 1)?;
            let ours = probe_forward(&Weights::of(&model)?, &x, None)?;
            let diff = max_diff(&ours, &model.forward(&x)?)?;
            assert!(diff <= 1e-5, "kv {kv:?} tie {tie} bias {bias}: max |diff| {diff}");
        }
        Ok(())
    }

    #[test]
    fn depth_prune_keeping_all_layers_is_the_identity() -> Result<()> {
        let teacher = tiny(Some(2), false, true, 1)?;
        let student = depth_prune(&teacher, &[0, 1, 2])?;
        assert_eq!(student.cfg, teacher.cfg);
        let x = ids(2, 10, 0)?;
        assert_eq!(max_diff(&student.forward(&x)?, &teacher.forward(&x)?)?, 0.0);
        Ok(())
    }

    #[test]
    fn depth_prune_subset_equals_a_model_built_from_those_layers() -> Result<()> {
        let teacher = tiny(None, true, false, 2)?;
        let student = depth_prune(&teacher, &[0, 2])?;
        assert_eq!(student.cfg.num_hidden_layers, 2);
        // By hand: layer 2's tensors become layer 1's, layer 1's are dropped.
        let mut w = BTreeMap::new();
        for (name, t) in teacher.tensors()? {
            if name.starts_with("model.layers.1.") {
                continue;
            }
            w.insert(name.replace("model.layers.2.", "model.layers.1."), t);
        }
        let mut cfg = teacher.cfg.clone();
        cfg.num_hidden_layers = 2;
        let by_hand = build(cfg, w, &Device::Cpu)?;
        let x = ids(3, 8, 2)?;
        assert_eq!(max_diff(&student.forward(&x)?, &by_hand.forward(&x)?)?, 0.0);
        // And it is a different model from the teacher.
        assert!(max_diff(&student.forward(&x)?, &teacher.forward(&x)?)? > 1e-4);
        Ok(())
    }

    #[test]
    fn depth_prune_rejects_bad_indices_with_a_message() -> Result<()> {
        let teacher = tiny(None, false, false, 3)?;
        assert!(err_text(depth_prune(&teacher, &[])).contains("empty"));
        let e = err_text(depth_prune(&teacher, &[0, 3]));
        assert!(e.contains("keep_layers[1] = 3") && e.contains("out of range"), "{e}");
        let e = err_text(depth_prune(&teacher, &[1, 1]));
        assert!(e.contains("keep_layers[1] = 1") && e.contains("increasing"), "{e}");
        let e = err_text(depth_prune(&teacher, &[2, 0]));
        assert!(e.contains("keep_layers[1] = 0"), "{e}");
        Ok(())
    }

    #[test]
    fn width_prune_to_the_full_size_is_the_identity() -> Result<()> {
        for (kv, tie, bias) in [(None, false, false), (Some(2), true, true)] {
            let teacher = tiny(kv, tie, bias, 4)?;
            let imp = estimate_importance(&teacher, &calibration()?)?;
            let student = width_prune(&teacher, &imp, WidthTarget::of(&teacher.cfg))?;
            assert_eq!(student.cfg, teacher.cfg);
            let x = ids(2, 11, 3)?;
            let diff = max_diff(&student.forward(&x)?, &teacher.forward(&x)?)?;
            assert!(diff <= 1e-6, "max |diff| {diff}");
        }
        Ok(())
    }

    #[test]
    fn width_prune_to_smaller_sizes_gives_the_config_shapes_and_params() -> Result<()> {
        let teacher = tiny(Some(2), false, true, 6)?;
        let imp = estimate_importance(&teacher, &calibration()?)?;
        let target = WidthTarget {
            hidden_size: 8,
            intermediate_size: 12,
            num_attention_heads: 2,
        };
        let student = width_prune(&teacher, &imp, target)?;
        let c = &student.cfg;
        assert_eq!(
            (
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_key_value_heads
            ),
            (8, 12, 2, 1)
        );
        assert_eq!(c.head_dim(), teacher.cfg.head_dim());
        assert_eq!((c.num_hidden_layers, c.vocab_size), (3, V));
        for (name, t) in student.tensors()? {
            assert_eq!(t.dims(), c.param_shapes()[&name].as_slice(), "{name}");
        }
        // embed + lm_head 2*48*8, final norm 8; per layer: norms 2*8, q 8x8,
        // k and v 4x8 each, o 8x8, q/k/v biases 8+4+4, gate/up/down 3*12*8.
        let per_layer = 16 + 64 + 64 + 64 + 16 + 288;
        assert_eq!(c.num_params(), 2 * 48 * 8 + 8 + 3 * per_layer);
        let counted: usize = student.tensors()?.values().map(|t| t.elem_count()).sum();
        assert_eq!(counted, c.num_params());
        assert!(c.num_params() < teacher.cfg.num_params() / 2);
        let logits = student.forward(&ids(2, 7, 0)?)?;
        assert_eq!(logits.dims(), &[2, 7, V]);
        assert!(logits.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()));
        Ok(())
    }

    #[test]
    fn width_prune_keeps_the_top_scored_units_in_order() -> Result<()> {
        let teacher = tiny(Some(2), false, true, 7)?; // 4 query heads in 2 groups of 2
        let keep_ch = [1usize, 3, 4, 6, 9, 10, 13, 15];
        let channels: Vec<f32> = (0..16)
            .map(|c| if keep_ch.contains(&c) { 2.0 + c as f32 } else { 1.0 })
            .collect();
        // Layer 0: head 0 alone scores highest, but group 1 (heads 2, 3) sums higher.
        // Layer 1: group 0 wins. Layer 2: a tie, which goes to the lower group (0).
        let heads = vec![vec![5.0, 0.0, 3.0, 3.0], vec![4.0, 4.0, 1.0, 1.0], vec![1.0; 4]];
        let keep_groups = [1usize, 0, 0];
        let keep_n: Vec<Vec<usize>> = (0..3).map(|i| (0..24).filter(|j| (j + i) % 2 == 0).collect()).collect();
        let neurons: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..24)
                    .map(|j| if keep_n[i].contains(&j) { 1.0 + j as f32 } else { 0.5 })
                    .collect()
            })
            .collect();
        let imp = Importance {
            heads,
            neurons,
            channels,
        };
        let target = WidthTarget {
            hidden_size: 8,
            intermediate_size: 12,
            num_attention_heads: 2,
        };
        let s = width_prune(&teacher, &imp, target)?.tensors()?;
        let t = teacher.tensors()?;
        let v = all(V);
        let one = [0usize];
        let col = |x: &Tensor| x.unsqueeze(1); // (n,) -> (n, 1)
        assert_eq!(
            s["model.embed_tokens.weight"].to_vec2::<f32>()?,
            gather(&t["model.embed_tokens.weight"], &v, &keep_ch)?
        );
        assert_eq!(
            s["lm_head.weight"].to_vec2::<f32>()?,
            gather(&t["lm_head.weight"], &v, &keep_ch)?
        );
        assert_eq!(
            col(&s["model.norm.weight"])?.to_vec2::<f32>()?,
            gather(&col(&t["model.norm.weight"])?, &keep_ch, &one)?
        );
        for (i, &g) in keep_groups.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let q_rows: Vec<usize> = (g * 8..g * 8 + 8).collect(); // 2 heads x 4 dims
            let kv_rows: Vec<usize> = (g * 4..g * 4 + 4).collect();
            let n = &keep_n[i];
            let check = |name: &str, rows: &[usize], cols: &[usize]| -> Result<()> {
                let full = format!("{p}.{name}");
                assert_eq!(s[&full].to_vec2::<f32>()?, gather(&t[&full], rows, cols)?, "{full}");
                Ok(())
            };
            check("self_attn.q_proj.weight", &q_rows, &keep_ch)?;
            check("self_attn.k_proj.weight", &kv_rows, &keep_ch)?;
            check("self_attn.v_proj.weight", &kv_rows, &keep_ch)?;
            check("self_attn.o_proj.weight", &keep_ch, &q_rows)?;
            check("mlp.gate_proj.weight", n, &keep_ch)?;
            check("mlp.up_proj.weight", n, &keep_ch)?;
            check("mlp.down_proj.weight", &keep_ch, n)?;
            for (name, rows) in [
                ("self_attn.q_proj.bias", &q_rows),
                ("self_attn.k_proj.bias", &kv_rows),
                ("self_attn.v_proj.bias", &kv_rows),
                ("input_layernorm.weight", &keep_ch.to_vec()),
                ("post_attention_layernorm.weight", &keep_ch.to_vec()),
            ] {
                let full = format!("{p}.{name}");
                assert_eq!(
                    col(&s[&full])?.to_vec2::<f32>()?,
                    gather(&col(&t[&full])?, rows, &one)?,
                    "{full}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn width_prune_rejects_unreachable_targets() -> Result<()> {
        let teacher = tiny(Some(2), false, false, 8)?;
        let imp = estimate_importance(&teacher, &calibration()?)?;
        let full = WidthTarget::of(&teacher.cfg);
        let e = err_text(width_prune(
            &teacher,
            &imp,
            WidthTarget {
                num_attention_heads: 3,
                hidden_size: 12,
                ..full
            },
        ));
        assert!(e.contains("multiple of the teacher's GQA group size 2"), "{e}");
        let e = err_text(width_prune(
            &teacher,
            &imp,
            WidthTarget {
                num_attention_heads: 2,
                ..full
            },
        ));
        assert!(
            e.contains("hidden_size = 16 must equal") && e.contains("head_dim (4) = 8"),
            "{e}"
        );
        let e = err_text(width_prune(
            &teacher,
            &imp,
            WidthTarget {
                intermediate_size: 25,
                ..full
            },
        ));
        assert!(e.contains("intermediate_size = 25 is not reachable"), "{e}");
        let e = err_text(width_prune(
            &teacher,
            &imp,
            WidthTarget {
                intermediate_size: 0,
                ..full
            },
        ));
        assert!(e.contains("intermediate_size = 0"), "{e}");
        let mut wrong = imp.clone();
        wrong.neurons[1].pop();
        let e = err_text(width_prune(&teacher, &wrong, full));
        assert!(e.contains("importance.neurons[1] has 23 scores"), "{e}");
        let mut nan = imp;
        nan.channels[0] = f32::NAN;
        assert!(err_text(width_prune(&teacher, &nan, full)).contains("non-finite"));
        Ok(())
    }

    #[test]
    fn estimate_importance_rejects_bad_calibration() -> Result<()> {
        let teacher = tiny(None, false, false, 9)?;
        assert!(err_text(estimate_importance(&teacher, &[])).contains("no calibration batches"));
        let floats = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let e = err_text(estimate_importance(&teacher, &[ids(1, 4, 0)?, floats]));
        assert!(e.contains("calibration batch 1") && e.contains("u32"), "{e}");
        let big = Tensor::from_vec(vec![3u32, 48], (1, 2), &Device::Cpu)?;
        assert!(err_text(estimate_importance(&teacher, &[big])).contains("token id 48"));
        let long = ids(1, 33, 0)?;
        assert!(err_text(estimate_importance(&teacher, &[long])).contains("max_position_embeddings"));
        let flat = Tensor::from_vec(vec![3u32, 4], 2, &Device::Cpu)?;
        assert!(err_text(estimate_importance(&teacher, &[flat])).contains("(B, T)"));
        Ok(())
    }

    #[test]
    fn a_dead_neuron_scores_zero_and_is_pruned_first() -> Result<()> {
        // One dead neuron per layer, at a different index in each.
        let dead = [9usize, 5, 0];
        let teacher = edited(&tiny(None, false, false, 10)?, |w| {
            for (layer, &j) in dead.iter().enumerate() {
                let p = format!("model.layers.{layer}.mlp");
                for name in ["gate_proj", "up_proj"] {
                    let mut m = w[&format!("{p}.{name}.weight")].to_vec2::<f32>()?;
                    m[j].iter_mut().for_each(|x| *x = 0.0);
                    w.insert(format!("{p}.{name}.weight"), Tensor::new(m, &Device::Cpu)?);
                }
                let mut m = w[&format!("{p}.down_proj.weight")].to_vec2::<f32>()?;
                m.iter_mut().for_each(|row| row[j] = 0.0);
                w.insert(format!("{p}.down_proj.weight"), Tensor::new(m, &Device::Cpu)?);
            }
            Ok(())
        })?;
        let imp = estimate_importance(&teacher, &calibration()?)?;
        for (layer, &j) in dead.iter().enumerate() {
            assert_eq!(imp.neurons[layer][j], 0.0);
            assert!(imp.neurons[layer].iter().enumerate().all(|(k, &s)| k == j || s > 0.0));
        }
        let target = WidthTarget {
            intermediate_size: 23,
            ..WidthTarget::of(&teacher.cfg)
        };
        let student = width_prune(&teacher, &imp, target)?;
        for (layer, &j) in dead.iter().enumerate() {
            let kept: Vec<usize> = (0..24).filter(|&k| k != j).collect();
            let name = format!("model.layers.{layer}.mlp.down_proj.weight");
            let want = gather(&teacher.tensors()?[&name], &all(16), &kept)?;
            assert_eq!(student.tensors()?[&name].to_vec2::<f32>()?, want, "{name}");
        }
        // Only dead neurons went, so the student computes what the teacher does.
        let x = ids(2, 10, 5)?;
        let diff = max_diff(&student.forward(&x)?, &teacher.forward(&x)?)?;
        assert!(diff <= 1e-5, "max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn head_and_channel_scores_follow_the_activations() -> Result<()> {
        let teacher = tiny(Some(2), false, false, 11)?;
        let base = estimate_importance(&teacher, &calibration()?)?;
        // Scale up the value head of kv group 0 in layer 1: its two query heads'
        // outputs grow 20x, and they must become layer 1's top heads.
        let loud = edited(&teacher, |w| {
            let name = "model.layers.1.self_attn.v_proj.weight";
            let t = &w[name];
            let scale: Vec<f32> = (0..8).map(|r| if r < 4 { 20.0 } else { 1.0 }).collect();
            let scaled = t.broadcast_mul(&Tensor::from_vec(scale, (8, 1), &Device::Cpu)?)?;
            w.insert(name.to_string(), scaled);
            Ok(())
        })?;
        let imp = estimate_importance(&loud, &calibration()?)?;
        let h1 = &imp.heads[1];
        assert!(h1[0].min(h1[1]) > h1[2].max(h1[3]), "layer 1 head scores {h1:?}");
        assert!(
            (h1[0] / base.heads[1][0] - 20.0).abs() < 1e-2,
            "{} vs {}",
            h1[0],
            base.heads[1][0]
        );
        assert_eq!(imp.heads[0], base.heads[0], "layer 0 is upstream of the change");
        let g = &imp.kv_groups(2)[1];
        assert!(g[0] > g[1]);
        // And embedding channel 7, scaled up 20x in the embedding table, must
        // become the top channel.
        let wide = edited(&teacher, |w| {
            let name = "model.embed_tokens.weight";
            let scale: Vec<f32> = (0..16).map(|c| if c == 7 { 20.0 } else { 1.0 }).collect();
            let scaled = w[name].broadcast_mul(&Tensor::from_vec(scale, (1, 16), &Device::Cpu)?)?;
            w.insert(name.to_string(), scaled);
            Ok(())
        })?;
        let imp = estimate_importance(&wide, &calibration()?)?;
        assert_eq!(top_k(&imp.channels, 1), vec![7], "channels {:?}", imp.channels);
        assert_ne!(top_k(&base.channels, 1), vec![7]);
        Ok(())
    }

    #[test]
    fn a_pruned_student_gets_a_gradient_for_every_parameter() -> Result<()> {
        let teacher = tiny(Some(2), false, true, 12)?;
        let imp = estimate_importance(&teacher, &calibration()?)?;
        let target = WidthTarget {
            hidden_size: 8,
            intermediate_size: 12,
            num_attention_heads: 2,
        };
        let student = depth_prune(&width_prune(&teacher, &imp, target)?, &[0, 2])?;
        let (b, t) = (2, 9);
        let x = ids(b, t + 1, 4)?;
        let inputs = x.narrow(1, 0, t)?;
        let targets = x.narrow(1, 1, t)?.flatten_all()?.contiguous()?; // (N,)
        let logits = student.forward(&inputs)?.reshape((b * t, V))?; // (N, V)
        let mask = Tensor::ones(b * t, DType::F32, &Device::Cpu)?;
        let loss = crate::loss::distill_loss(
            &logits,
            None,
            &targets,
            &mask,
            &crate::loss::LossSpec::CE_ONLY,
            (b * t) as f64,
        )?;
        assert!(loss.ce.is_finite());
        let grads = loss.total.backward()?;
        assert_eq!(student.params().len(), student.cfg.param_shapes().len());
        for (name, var) in student.params() {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| Error::Invalid(format!("no gradient for {name}")))?;
            assert_eq!(g.dims(), var.as_tensor().dims(), "{name}");
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm.is_finite(), "{name}: gradient norm^2 {norm}");
            // A key bias shifts every score of a query equally, so softmax
            // cancels it: its gradient is zero in exact arithmetic.
            if !name.ends_with("k_proj.bias") {
                assert!(norm > 0.0, "{name}: zero gradient");
            }
        }
        Ok(())
    }
}
