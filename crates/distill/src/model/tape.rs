//! The training forward and backward of a `Llama` body on the fused CPU kernels,
//! with the backward written out by hand instead of run by candle's autograd (issue 9).
//!
//! candle's backward visits every graph node and, for every input of every node,
//! allocates a zero tensor and adds the node's gradient into it (`GradStore`), even for
//! a tensor's first and only gradient. On the training step of a small model these
//! passes over the activations cost as much as the matmuls they serve. Here the
//! forward keeps the activations each layer's backward reads (like llm.c's
//! `train_gpt2.c`), and the backward runs the same slice-level kernels as the fused
//! ops (`kernels::ops`, `kernels::attention`) layer by layer, writing each gradient once.
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
use crate::kernels::ops::{
    linear_bwd_input, linear_bwd_weight, linear_fwd, rms_norm_bwd, rms_norm_fwd, rope_fwd, swiglu_bwd, swiglu_fwd,
};

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
pub(crate) struct Weights<'a, G> {
    views: BTreeMap<&'a str, (G, usize, usize)>,
}

impl<'a> Weights<'a, ()> {
    pub(crate) fn of(model: &'a Llama) -> Result<Weights<'a, impl Deref<Target = Storage> + 'a>> {
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
    pub(crate) fn get(&self, name: &str) -> Result<&[f32]> {
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
    pub(crate) fn forward_taped_slices(&self, ids: &Tensor) -> Result<(Vec<f32>, Tape)> {
        if !self.can_tape() {
            return Err(Error::Invalid(
                "forward_taped needs a trainable model on the fused CPU f32 path (Kernels::Fused, CPU, f32 compute)"
                    .into(),
            ));
        }
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        if t > cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
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
                return Err(Error::Shape(format!(
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

impl Tape {
    /// Rows (B*T) of the forward pass that made the tape.
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    /// The gradient of every body parameter of `model` (every parameter but an untied
    /// `lm_head.weight`) for the gradient `dhidden` (B, T, d) of the hidden states
    /// `forward_taped` returned. `model` must be the one that made the tape, unchanged.
    pub fn backward(&self, model: &Llama, dhidden: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let cfg = &model.cfg;
        let (b, t) = (self.b, self.t);
        let (n, d, f) = (b * t, cfg.hidden_size, cfg.intermediate_size);
        let (h, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        if dhidden.dims() != [b, t, d] && dhidden.dims() != [n, d] {
            return Err(Error::Shape(format!(
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
pub(crate) mod tests {
    use super::*;
    use crate::config::Kernels;
    use crate::loss::head::fused_linear_distill_loss;
    use crate::loss::Divergence;
    use crate::loss::LossSpec;
    use crate::model::ModelConfig;
    use crate::train::step::Forward;
    use candle_core::Device;

    pub(crate) fn cfg(tied: bool, bias: bool, kv: usize) -> ModelConfig {
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

    pub(crate) fn ids(b: usize, t: usize, salt: u32) -> Result<Tensor> {
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
                None,
                targets,
                &mask,
                &LossSpec::new(1.0, 1.0, Divergence::ForwardKl),
                n as f64,
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
    pub(crate) fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
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
