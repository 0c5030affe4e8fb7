//! The training forward and backward of a `Llama` body on the fused CPU kernels,
//! with the backward written out by hand instead of run by candle's autograd (issue 9).
//!
//! candle's backward visits every graph node and, for every input of every node,
//! allocates a zero tensor and adds the node's gradient into it (`GradStore`), even for
//! a tensor's first and only gradient. On the training step of a small model these
//! passes over the activations cost as much as the matmuls they serve. Here the
//! forward keeps the activations each layer's backward reads (like llm.c's
//! `train_gpt2.c`), and the backward runs the same slice-level kernels as the fused
//! ops (`model::fused`, `model::attention`) layer by layer, writing each gradient once.
//!
//! `forward` returns the final hidden states (after the last RMSNorm) as a plain
//! tensor. The caller puts the head and the loss on it with candle (so every loss of
//! `loss::*`, fused head included, works unchanged), takes the gradient of the hidden
//! states from that small graph, and hands it to `Tape::backward`, which returns the
//! gradient of every body parameter. The head's own gradient comes from the caller's
//! graph; with tied embeddings the caller adds it to the embedding's.
//!
//! The forward is bitwise the fused-op forward (the same kernels in the same order),
//! and the gradients equal autograd's through the fused ops up to float summation
//! order (tested to 1e-5 relative, and against the plain ops).

use std::collections::BTreeMap;
use std::ops::Deref;

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use super::llama::Llama;
use crate::error::{Error, Result};
use crate::kernels::attention::{backward_slices, forward_slices, AttnShape};
use crate::kernels::cpu::with_cpu_f32;
use crate::kernels::ops::{
    gemm_f32, linear_bwd_input, linear_bwd_weight, linear_fwd, rms_norm_bwd, rms_norm_fwd, rope_fwd, swiglu_bwd,
    swiglu_fwd,
};
use crate::loss::full::SliceTeacher;

/// What one layer's backward reads, all row-major with N = B*T rows.
struct LayerActs {
    x_in: Vec<f32>,       // (N, d) the residual stream into the layer
    h1: Vec<f32>,         // (N, d) input_layernorm(x_in)
    q: Vec<f32>,          // (N, H*D) after rope
    k: Vec<f32>,          // (N, Hkv*D) after rope
    v: Vec<f32>,          // (N, Hkv*D)
    stats: Vec<[f32; 2]>, // (B, H, T) the attention softmax statistics
    o: Vec<f32>,          // (N, H*D) attention output, before o_proj
    x_mid: Vec<f32>,      // (N, d) x_in + o_proj(o)
    h2: Vec<f32>,         // (N, d) post_attention_layernorm(x_mid)
    gate: Vec<f32>,       // (N, F)
    up: Vec<f32>,         // (N, F)
    act: Vec<f32>,        // (N, F) silu(gate) * up
}

/// The activations of one `Llama::forward_taped` call, for its backward.
pub struct Tape {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    layers: Vec<LayerActs>,
    x_last: Vec<f32>, // (N, d) the input of the final norm
}

/// Read access to the f32 CPU data of the model's parameters for one pass: the
/// storages' read guards (`G`, candle's lock guard), held until the pass ends.
struct Weights<'a, G> {
    views: BTreeMap<&'a str, (G, usize, usize)>,
}

impl<'a> Weights<'a, ()> {
    fn of(model: &'a Llama) -> Result<Weights<'a, impl Deref<Target = Storage> + 'a>> {
        let mut views = BTreeMap::new();
        for (name, var) in model.params() {
            let t = var.as_tensor();
            let (storage, layout) = t.storage_and_layout();
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::Invalid(format!("internal: parameter {name} is not contiguous")))?;
            if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
                return Err(Error::Invalid(format!(
                    "internal: the taped backward needs f32 CPU parameters; {name} is not"
                )));
            }
            views.insert(name.as_str(), (storage, start, end));
        }
        Ok(Weights { views })
    }
}

impl<G: Deref<Target = Storage>> Weights<'_, G> {
    fn get(&self, name: &str) -> Result<&[f32]> {
        match self.views.get(name) {
            Some((storage, start, end)) => match storage.deref() {
                Storage::Cpu(CpuStorage::F32(data)) => Ok(&data[*start..*end]),
                _ => Err(Error::Invalid(format!("internal: {name} is not f32 on the CPU"))),
            },
            None => Err(Error::Invalid(format!("internal: parameter {name} missing"))),
        }
    }
}

/// a += b, elementwise, in parallel chunks.
fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14).zip(b.par_chunks(1 << 14)).for_each(|(x, y)| {
        for (p, q) in x.iter_mut().zip(y) {
            *p += q;
        }
    });
}

/// a + b, elementwise.
fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = a.to_vec();
    add_assign(&mut out, b);
    out
}

/// x (N, C) + bias (C,) on every row, in place.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    x.par_chunks_mut(c * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// Column sums of x (N, C): a bias gradient. Fixed chunks of rows, added in order.
fn col_sum(x: &[f32], c: usize) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = x
        .par_chunks(c * 256)
        .map(|rows| {
            let mut acc = vec![0f32; c];
            for row in rows.chunks_exact(c) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; c];
    for p in &partial {
        for (a, v) in out.iter_mut().zip(p) {
            *a += v;
        }
    }
    out
}

impl Llama {
    /// Whether `forward_taped` applies: a trainable model on the fused CPU f32 path.
    pub fn can_tape(&self) -> bool {
        self.fused() && !self.is_frozen()
    }

    /// The final hidden states (B, T, d) f32 as a plain tensor (no autograd graph), and
    /// the tape its backward needs. Errors unless `can_tape()`.
    pub fn forward_taped(&self, ids: &Tensor) -> Result<(Tensor, Tape)> {
        let (hidden, tape) = self.forward_taped_slices(ids)?;
        let dims = (tape.b, tape.t, self.cfg.hidden_size);
        Ok((Tensor::from_vec(hidden, dims, self.device())?, tape))
    }

    /// `forward_taped` with the hidden states as a row-major (B*T, d) vector.
    fn forward_taped_slices(&self, ids: &Tensor) -> Result<(Vec<f32>, Tape)> {
        if !self.can_tape() {
            return Err(Error::Invalid(
                "forward_taped needs a trainable model on the fused CPU f32 path (Kernels::Fused, CPU, f32 compute)"
                    .into(),
            ));
        }
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        if t > cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let (n, d, f) = (b * t, cfg.hidden_size, cfg.intermediate_size);
        let (h, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin) = self.rope_tables(t)?;
        let shape = AttnShape { b, t, h, hkv, d: hd };
        let scale = 1.0 / (hd as f32).sqrt();
        let w = Weights::of(self)?;

        let emb = w.get("model.embed_tokens.weight")?;
        let mut x = vec![0f32; n * d]; // (N, d)
        for (row, &id) in x.chunks_exact_mut(d).zip(&ids) {
            let id = id as usize;
            if id >= cfg.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            row.copy_from_slice(&emb[id * d..(id + 1) * d]);
        }
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let wn = |s: &str| w.get(&format!("{p}.{s}"));
            let h1 = rms_norm_fwd(&x, wn("input_layernorm.weight")?, eps);
            let proj = |name: &str, out: usize| -> Result<Vec<f32>> {
                let mut y = linear_fwd(&h1, wn(&format!("self_attn.{name}.weight"))?, (n, out, d))?;
                if cfg.attention_bias {
                    add_bias(&mut y, wn(&format!("self_attn.{name}.bias"))?);
                }
                Ok(y)
            };
            let q = rope_fwd(&proj("q_proj", h * hd)?, (t, h, hd), &cos, &sin, false);
            let k = rope_fwd(&proj("k_proj", hkv * hd)?, (t, hkv, hd), &cos, &sin, false);
            let v = proj("v_proj", hkv * hd)?;
            let (o, stats) = forward_slices(shape, scale, &q, &k, &v);
            let a = linear_fwd(&o, wn("self_attn.o_proj.weight")?, (n, d, h * hd))?;
            let x_mid = add(&x, &a);
            let h2 = rms_norm_fwd(&x_mid, wn("post_attention_layernorm.weight")?, eps);
            let gate = linear_fwd(&h2, wn("mlp.gate_proj.weight")?, (n, f, d))?;
            let up = linear_fwd(&h2, wn("mlp.up_proj.weight")?, (n, f, d))?;
            let act = swiglu_fwd(&gate, &up);
            let m = linear_fwd(&act, wn("mlp.down_proj.weight")?, (n, d, f))?;
            let x_next = add(&x_mid, &m);
            layers.push(LayerActs {
                x_in: std::mem::replace(&mut x, x_next),
                h1,
                q,
                k,
                v,
                stats,
                o,
                x_mid,
                h2,
                gate,
                up,
                act,
            });
        }
        let hidden = rms_norm_fwd(&x, w.get("model.norm.weight")?, eps); // (N, d)
        Ok((
            hidden,
            Tape {
                b,
                t,
                ids,
                layers,
                x_last: x,
            },
        ))
    }
}

impl Llama {
    /// One micro-batch with no autograd graph at all, on the fused CPU f32 path: the
    /// taped body, the head as gemms, `loss::fused::loss_and_grad_slices` on the logits
    /// (the loss and its gradient in one pass), the head's two backward gemms and the
    /// body's backward. Returns the loss values and every parameter's gradient; errors
    /// unless `can_tape()`.
    ///
    /// The loss and arguments are `distill_loss_with`'s, with the teacher as the fused
    /// head takes it (`HeadTeacher`: none, full logits, top-k, or its hidden states and
    /// head). `chunk_rows: None` computes the whole (N, V) logits at once; `Some(c)` is
    /// the fused head: c rows at a time, so that neither the student's nor a `Hidden`
    /// teacher's (N, V) logits ever exist, and the head's weight gradient accumulates
    /// chunk by chunk (gemm with beta = 1) into one (V, d) buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads_one_pass(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        teacher: crate::loss::head::HeadTeacher<'_>,
        alpha: f64,
        temperature: f64,
        denom: f64,
        divergence: crate::loss::Divergence,
        chunk_rows: Option<usize>,
    ) -> Result<(crate::loss::full::LossValues, BTreeMap<String, Tensor>)> {
        use crate::loss::head::HeadTeacher;
        let (hidden, tape) = self.forward_taped_slices(ids)?; // (N, d)
        let (n, d, v) = (tape.b * tape.t, self.cfg.hidden_size, self.cfg.vocab_size);
        let head = self.head_name();
        let targets: Vec<u32> = targets.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
        let mask: Vec<f32> = mask.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if targets.len() != n || mask.len() != n {
            return Err(Error::Invalid(format!(
                "{} targets and {} mask entries for {n} tokens",
                targets.len(),
                mask.len()
            )));
        }
        let chunk = match chunk_rows {
            None => n.max(1),
            Some(0) => return Err(Error::Invalid("the fused head's chunk_rows must be at least 1".into())),
            Some(c) => c,
        };
        let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let w = Weights::of(self)?;
        let wh = w.get(head)?; // (V, d)
        let head_loss = HeadLoss {
            hidden: &hidden,
            wh,
            targets: &targets,
            mask: &mask,
            dims: (n, d, v),
            chunk,
            settings: (alpha, temperature, denom, divergence),
        };
        let (values, dh, dw_head) = match teacher {
            HeadTeacher::None => head_loss.run(Rows::Given(None))?,
            HeadTeacher::Logits(t) => {
                if t.elem_count() != n * v || t.dims().last() != Some(&v) {
                    return Err(Error::Invalid(format!(
                        "teacher logits have shape {:?}, expected [{n}, {v}]",
                        t.dims()
                    )));
                }
                // Read in place: no copy of the (N, V) teacher logits.
                with_cpu_f32(&f32_of(t)?, "one-pass loss", |t| {
                    head_loss.run(Rows::Given(Some(SliceTeacher::Logits(t))))
                })??
            }
            HeadTeacher::TopK(top) => {
                crate::loss::topk::check_top_k_dims(n, v, top)?;
                let (indices, log_probs) = top.to_host()?;
                head_loss.run(Rows::Given(Some(SliceTeacher::TopK {
                    indices: &indices,
                    log_probs: &log_probs,
                    k: top.k(),
                })))?
            }
            HeadTeacher::Hidden { hidden: th, weight: tw } => {
                let dt = tw.dim(1)?;
                if tw.dims() != [v, dt] || th.elem_count() != n * dt {
                    return Err(Error::Invalid(format!(
                        "teacher hidden states {:?} and head {:?} must be ({n}, Ht) and ({v}, Ht)",
                        th.dims(),
                        tw.dims()
                    )));
                }
                let (th, tw) = (f32_of(th)?, f32_of(tw)?);
                with_cpu_f32(&th, "one-pass loss", |th| {
                    with_cpu_f32(&tw, "one-pass loss", |tw| {
                        head_loss.run(Rows::Hidden {
                            hidden: th,
                            weight: tw,
                            dt,
                        })
                    })
                })???
            }
        };
        drop(w);
        let mut grads = tape.backward(self, &Tensor::from_vec(dh, (n, d), self.device())?)?;
        let dw_head = Tensor::from_vec(dw_head, (v, d), self.device())?;
        let g = match grads.remove(head) {
            Some(body) => (body + dw_head)?, // tied: the embedding's two uses add up
            None => dw_head,
        };
        grads.insert(head.to_string(), g);
        Ok((values, grads))
    }
}

/// The teacher of `HeadLoss::run`, as row-major slices of all N rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Full logits, top k, or none: what the loss takes, sliced per chunk.
    Given(Option<SliceTeacher<'a>>),
    /// Hidden states (N, dt) and head weight (V, dt): logits chunk by chunk.
    Hidden {
        hidden: &'a [f32],
        weight: &'a [f32],
        dt: usize,
    },
}

/// The head and the loss over the final hidden states, chunk by chunk.
struct HeadLoss<'a> {
    hidden: &'a [f32], // (N, d)
    wh: &'a [f32],     // (V, d)
    targets: &'a [u32],
    mask: &'a [f32],
    dims: (usize, usize, usize), // (N, d, V)
    chunk: usize,
    settings: (f64, f64, f64, crate::loss::Divergence), // alpha, T, denom, divergence
}

impl HeadLoss<'_> {
    /// The summed loss values, the hidden states' gradient (N, d) and the head weight's
    /// (V, d). With one chunk of all N rows this is exactly the unchunked computation.
    fn run(&self, teacher: Rows<'_>) -> candle_core::Result<(crate::loss::full::LossValues, Vec<f32>, Vec<f32>)> {
        use crate::loss::full::{loss_and_grad_slices, LossValues};
        let (n, d, v) = self.dims;
        let (alpha, temperature, denom, divergence) = self.settings;
        let mut dh = vec![0f32; n * d];
        let mut dw = vec![0f32; v * d];
        let (mut total, mut ce, mut kd) = (0f64, 0f64, 0f64);
        for start in (0..n).step_by(self.chunk) {
            let rows = start..(start + self.chunk).min(n);
            let c = rows.len();
            let logits = linear_fwd(&self.hidden[start * d..rows.end * d], self.wh, (c, v, d))?; // (C, V)
            let teacher_logits; // (C, V), a Hidden teacher's chunk
            let t = match teacher {
                Rows::Given(t) => t.map(|t| t.rows(rows.clone(), v)),
                Rows::Hidden { hidden, weight, dt } => {
                    teacher_logits = linear_fwd(&hidden[start * dt..rows.end * dt], weight, (c, v, dt))?;
                    Some(SliceTeacher::Logits(&teacher_logits))
                }
            };
            let (vals, dlogits) = loss_and_grad_slices(
                start,
                &logits,
                t,
                Some(&self.targets[rows.clone()]),
                &self.mask[rows.clone()],
                v,
                alpha,
                temperature,
                denom,
                divergence,
            )?;
            drop(logits);
            total += f64::from(vals.total);
            ce += f64::from(vals.ce);
            kd += f64::from(vals.kd);
            // dh rows = dlogits @ W; dW (+)= dlogits^T @ h rows (linear_bwd_input and
            // linear_bwd_weight, the latter accumulating after the first chunk).
            let dh_rows = &mut dh[start * d..rows.end * d];
            gemm_f32((c, d, v), dh_rows, (d, 1), &dlogits, (v, 1), self.wh, (d, 1), false)?;
            let h_rows = &self.hidden[start * d..rows.end * d];
            gemm_f32((v, d, c), &mut dw, (d, 1), &dlogits, (1, v), h_rows, (d, 1), start > 0)?;
        }
        let values = LossValues {
            total: total as f32,
            ce: ce as f32,
            kd: kd as f32,
        };
        Ok((values, dh, dw))
    }
}

impl Tape {
    /// The gradient of every body parameter of `model` (every parameter but an untied
    /// `lm_head.weight`) for the gradient `dhidden` (B, T, d) of the hidden states
    /// `forward_taped` returned. `model` must be the one that made the tape, unchanged.
    pub fn backward(&self, model: &Llama, dhidden: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let cfg = &model.cfg;
        let (b, t) = (self.b, self.t);
        let (n, d, f) = (b * t, cfg.hidden_size, cfg.intermediate_size);
        let (h, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        if dhidden.dims() != [b, t, d] && dhidden.dims() != [n, d] {
            return Err(Error::Invalid(format!(
                "Tape::backward: the hidden-state gradient has shape {:?}, expected [{b}, {t}, {d}]",
                dhidden.dims()
            )));
        }
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin) = model.rope_tables(t)?;
        let shape = AttnShape { b, t, h, hkv, d: hd };
        let scale = 1.0 / (hd as f32).sqrt();
        let dev = model.device();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut put = |name: String, g: Vec<f32>, dims: &[usize]| -> Result<()> {
            grads.insert(name, Tensor::from_vec(g, dims, dev)?);
            Ok(())
        };
        let w = Weights::of(model)?;

        let dh: Vec<f32> = dhidden.flatten_all()?.to_vec1()?;
        let (mut dx, dwn) = rms_norm_bwd(&self.x_last, w.get("model.norm.weight")?, &dh, eps);
        put("model.norm.weight".into(), dwn, &[d])?;
        for (l, a) in self.layers.iter().enumerate().rev() {
            let p = format!("model.layers.{l}");
            let wn = |s: &str| w.get(&format!("{p}.{s}"));
            // MLP: x_out = x_mid + act @ Wd^T, act = silu(h2 Wg^T) * (h2 Wu^T).
            let dact = linear_bwd_input(&dx, wn("mlp.down_proj.weight")?, (n, d, f))?;
            put(
                format!("{p}.mlp.down_proj.weight"),
                linear_bwd_weight(&dx, &a.act, (n, d, f))?,
                &[d, f],
            )?;
            let (dgate, dup) = swiglu_bwd(&a.gate, &a.up, &dact);
            let mut dh2 = linear_bwd_input(&dgate, wn("mlp.gate_proj.weight")?, (n, f, d))?;
            add_assign(&mut dh2, &linear_bwd_input(&dup, wn("mlp.up_proj.weight")?, (n, f, d))?);
            put(
                format!("{p}.mlp.gate_proj.weight"),
                linear_bwd_weight(&dgate, &a.h2, (n, f, d))?,
                &[f, d],
            )?;
            put(
                format!("{p}.mlp.up_proj.weight"),
                linear_bwd_weight(&dup, &a.h2, (n, f, d))?,
                &[f, d],
            )?;
            let (dxm, dw_post) = rms_norm_bwd(&a.x_mid, wn("post_attention_layernorm.weight")?, &dh2, eps);
            put(format!("{p}.post_attention_layernorm.weight"), dw_post, &[d])?;
            add_assign(&mut dx, &dxm); // dx is now d loss / d x_mid
                                       // Attention: x_mid = x_in + o @ Wo^T.
            let d_o = linear_bwd_input(&dx, wn("self_attn.o_proj.weight")?, (n, d, h * hd))?;
            put(
                format!("{p}.self_attn.o_proj.weight"),
                linear_bwd_weight(&dx, &a.o, (n, d, h * hd))?,
                &[d, h * hd],
            )?;
            let (dq, dk, dv) = backward_slices(shape, scale, &a.q, &a.k, &a.v, &d_o, &a.stats);
            let dq = rope_fwd(&dq, (t, h, hd), &cos, &sin, true);
            let dk = rope_fwd(&dk, (t, hkv, hd), &cos, &sin, true);
            let mut dh1 = vec![0f32; n * d];
            for (name, g, out) in [
                ("q_proj", &dq, h * hd),
                ("k_proj", &dk, hkv * hd),
                ("v_proj", &dv, hkv * hd),
            ] {
                add_assign(
                    &mut dh1,
                    &linear_bwd_input(g, wn(&format!("self_attn.{name}.weight"))?, (n, out, d))?,
                );
                put(
                    format!("{p}.self_attn.{name}.weight"),
                    linear_bwd_weight(g, &a.h1, (n, out, d))?,
                    &[out, d],
                )?;
                if cfg.attention_bias {
                    put(format!("{p}.self_attn.{name}.bias"), col_sum(g, out), &[out])?;
                }
            }
            let (dxi, dw_in) = rms_norm_bwd(&a.x_in, wn("input_layernorm.weight")?, &dh1, eps);
            put(format!("{p}.input_layernorm.weight"), dw_in, &[d])?;
            add_assign(&mut dx, &dxi); // d loss / d x_in
        }
        // Embedding rows: summed in token order (deterministic).
        let mut demb = vec![0f32; cfg.vocab_size * d];
        for (row, &id) in dx.chunks_exact(d).zip(&self.ids) {
            let dst = &mut demb[id as usize * d..(id as usize + 1) * d];
            for (a, g) in dst.iter_mut().zip(row) {
                *a += g;
            }
        }
        put("model.embed_tokens.weight".into(), demb, &[cfg.vocab_size, d])?;
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Kernels;
    use crate::loss::head::{fused_linear_distill_loss, HeadTeacher};
    use crate::loss::Divergence;
    use crate::model::ModelConfig;
    use crate::train::Forward;
    use candle_core::Device;

    fn cfg(tied: bool, bias: bool, kv: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 61,
            hidden_size: 32,
            intermediate_size: 40,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: kv,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            attention_bias: bias,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: 0,
        }
    }

    fn ids(b: usize, t: usize, salt: u32) -> Result<Tensor> {
        let v: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7919 + 13 + salt) % 61).collect();
        Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
    }

    /// The loss the tests differentiate: cross-entropy on the logits, or the fused head.
    fn loss_of(model: &Llama, out: &Tensor, targets: &Tensor, head: bool) -> Result<Tensor> {
        if head {
            let n = out.dim(0)?;
            let mask = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?;
            let w = model.lm_head_weight()?;
            let parts = fused_linear_distill_loss(
                out,
                &w,
                HeadTeacher::None,
                targets,
                &mask,
                1.0,
                1.0,
                n as f64,
                Divergence::ForwardKl,
                Some(7),
            )?;
            Ok(parts.total)
        } else {
            Ok(candle_nn::loss::cross_entropy(out, targets)?)
        }
    }

    /// Gradients through candle's autograd for the given kernels (no tape).
    fn autograd(model: &Llama, x: &Tensor, targets: &Tensor, head: bool) -> Result<BTreeMap<String, Tensor>> {
        let out = if head {
            model.forward_hidden(x)?.flatten_to(1)?
        } else {
            model.forward(x)?.flatten_to(1)?
        };
        let g = loss_of(model, &out, targets, head)?.backward()?;
        model
            .params()
            .iter()
            .map(|(k, v)| Ok((k.clone(), g.get(v.as_tensor()).expect("a gradient").clone())))
            .collect()
    }

    fn taped(model: &Llama, x: &Tensor, targets: &Tensor, head: bool) -> Result<BTreeMap<String, Tensor>> {
        assert!(model.can_tape());
        let fwd = Forward::run(model, x, head)?;
        let loss = loss_of(model, &fwd.out, targets, head)?;
        fwd.grads(model, &loss)
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(1e-20))
    }

    #[test]
    fn the_taped_forward_is_bitwise_the_fused_op_forward() -> Result<()> {
        for (tied, bias, kv) in [(false, false, 4), (true, true, 2), (false, true, 1)] {
            let m = Llama::init(cfg(tied, bias, kv), 0.2, 5, &Device::Cpu)?;
            let x = ids(3, 13, 0)?;
            let (hidden, _) = m.forward_taped(&x)?;
            let want = m.forward_hidden(&x)?;
            let (a, b): (Vec<f32>, Vec<f32>) = (hidden.flatten_all()?.to_vec1()?, want.flatten_all()?.to_vec1()?);
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "tied={tied} bias={bias} kv={kv}"
            );
        }
        Ok(())
    }

    /// Every parameter's gradient, through the tape, against candle's autograd over the
    /// fused ops and over the plain ops; logits + cross-entropy and the fused head;
    /// tied and untied heads, biases, MHA and GQA.
    #[test]
    fn taped_gradients_match_autograd_for_every_parameter() -> Result<()> {
        for (tied, bias, kv) in [(false, false, 4), (true, true, 2), (false, true, 1)] {
            for head in [false, true] {
                let mut m = Llama::init(cfg(tied, bias, kv), 0.2, 5, &Device::Cpu)?;
                let (x, y) = (ids(3, 13, 0)?, ids(1, 39, 5)?.flatten_all()?);
                let got = taped(&m, &x, &y, head)?;
                let fused = autograd(&m, &x, &y, head)?;
                m.set_kernels(Kernels::Plain);
                let plain = autograd(&m, &x, &y, head)?;
                assert_eq!(got.len(), m.params().len());
                for (name, g) in &got {
                    let (ef, ep) = (rel(g, &fused[name])?, rel(g, &plain[name])?);
                    let what = format!("tied={tied} bias={bias} kv={kv} head={head} {name}");
                    assert!(ef < 1e-5, "{what}: {ef} from the fused ops' autograd");
                    assert!(ep < 1e-5, "{what}: {ep} from the plain ops' autograd");
                }
            }
        }
        Ok(())
    }

    /// The graph-free micro-batch against the same loss on candle's graph (`Forward`
    /// and `distill_loss_with`): loss terms and every gradient, with a full-logit
    /// teacher, a top-k teacher, a teacher's hidden states and head, and none; whole
    /// logits and the fused head's chunks; masked rows, tied and untied heads.
    #[test]
    fn the_one_pass_micro_batch_matches_the_graph() -> Result<()> {
        use crate::loss::head::HeadTeacher;
        use crate::loss::{distill_loss_with, TeacherTargets};
        for (tied, bias, kv) in [(false, false, 4), (true, true, 2)] {
            let m = Llama::init(cfg(tied, bias, kv), 0.2, 5, &Device::Cpu)?;
            let (x, y) = (ids(3, 13, 0)?, ids(1, 39, 5)?.flatten_all()?);
            let mask_v: Vec<f32> = (0..39).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
            let mask = Tensor::from_vec(mask_v, 39, &Device::Cpu)?;
            let teacher = (Tensor::randn(0f32, 3.0, (39, 61), &Device::Cpu)?).contiguous()?;
            let top = crate::loss::top_k_of_logits(&teacher, 7, 2.0)?;
            // A teacher given as hidden states (width 24) and its own head.
            let th = Tensor::randn(0f32, 1.0, (39, 24), &Device::Cpu)?;
            let tw = Tensor::randn(0f32, 0.5, (61, 24), &Device::Cpu)?;
            let th_logits = th.matmul(&tw.t()?)?; // (39, 61), what the graph is given
            let hidden = HeadTeacher::Hidden {
                hidden: &th,
                weight: &tw,
            };
            for (ht, d) in [
                (HeadTeacher::None, Divergence::ForwardKl),
                (HeadTeacher::Logits(&teacher), Divergence::ForwardKl),
                (HeadTeacher::Logits(&teacher), Divergence::Tvd),
                (HeadTeacher::TopK(&top), Divergence::ForwardKl),
                (HeadTeacher::TopK(&top), Divergence::SkewReverseKl { skew: 0.1 }),
                (hidden, Divergence::Jsd { beta: 0.3 }),
            ] {
                let (kind, tl) = match ht {
                    HeadTeacher::None => ("none", None),
                    HeadTeacher::Logits(l) => ("logits", Some(TeacherTargets::Logits(l))),
                    HeadTeacher::TopK(t) => ("top-7", Some(TeacherTargets::TopK(t))),
                    HeadTeacher::Hidden { .. } => ("hidden", Some(TeacherTargets::Logits(&th_logits))),
                };
                let fwd = Forward::run(&m, &x, false)?;
                let parts = distill_loss_with(&fwd.out, tl, &y, &mask, 0.4, 2.0, 31.0, d)?;
                let total = parts.total.to_scalar::<f32>()?;
                let want = fwd.grads(&m, &parts.total)?;
                // The whole logits at once, and the fused head's chunks of 7 rows (the
                // last one of 4).
                for chunk in [None, Some(7)] {
                    let (vals, got) = m.loss_and_grads_one_pass(&x, &y, &mask, ht, 0.4, 2.0, 31.0, d, chunk)?;
                    let what = format!("tied={tied} teacher={kind} {d} chunk={chunk:?}");
                    assert!(
                        (vals.total - total).abs() <= 1e-5 * total.abs(),
                        "{what}: {} vs {total}",
                        vals.total
                    );
                    assert!((vals.ce - parts.ce).abs() <= 1e-5 * parts.ce.abs(), "{what}");
                    assert!((vals.kd - parts.kd).abs() <= 1e-5 * parts.kd.abs().max(1e-6), "{what}");
                    assert_eq!(got.len(), want.len());
                    for (name, g) in &got {
                        let e = rel(g, &want[name])?;
                        assert!(e < 1e-5, "{what} {name}: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn taped_gradients_do_not_depend_on_the_thread_count() -> Result<()> {
        crate::test_util::assert_same_bits_for_any_thread_count(|| {
            let m = Llama::init(cfg(false, true, 2), 0.2, 9, &Device::Cpu)?;
            let (x, y) = (ids(4, 40, 0)?, ids(1, 160, 3)?.flatten_all()?);
            taped(&m, &x, &y, false)?
                .values()
                .map(|g| Ok(g.flatten_all()?.to_vec1()?))
                .collect()
        })
    }

    #[test]
    fn models_off_the_fused_path_are_refused() -> Result<()> {
        let mut m = Llama::init(cfg(false, false, 4), 0.2, 5, &Device::Cpu)?;
        m.set_kernels(Kernels::Plain);
        assert!(!m.can_tape());
        assert!(m.forward_taped(&ids(1, 4, 0)?).is_err());
        let mut m = Llama::init(cfg(false, false, 4), 0.2, 5, &Device::Cpu)?;
        m.set_compute_dtype(candle_core::DType::BF16)?;
        assert!(!m.can_tape());
        let frozen = Llama::init(cfg(false, false, 4), 0.2, 5, &Device::Cpu)?.into_frozen(candle_core::DType::F32)?;
        assert!(!frozen.can_tape());
        Ok(())
    }
}
