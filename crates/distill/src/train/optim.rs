//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), moments that
//! can be saved and restored, global-norm clipping, and the warmup + cosine
//! schedule. candle-nn's AdamW keeps its moments private and cannot clip.
//!
//! On the CPU with f32 tensors the update and the norm run as one multi-threaded pass
//! per parameter (`adamw_cpu`, `sum_sq_cpu`) rather than a dozen candle ops each;
//! elsewhere the same arithmetic runs as candle ops. Both are deterministic: the CPU
//! passes split work into fixed-size chunks and add partial sums in chunk order.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use crate::config::TrainSpec;
use crate::error::{Error, Result};

pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Optimiser steps taken so far (the bias-correction exponent).
    pub step: u64,
    /// First and second moments by parameter name.
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(spec: &TrainSpec, params: &BTreeMap<String, Var>) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            beta1: spec.beta1,
            beta2: spec.beta2,
            eps: spec.eps,
            weight_decay: spec.weight_decay,
            step: 0,
            m: params
                .iter()
                .map(|(k, p)| Ok((k.clone(), zeros(p)?)))
                .collect::<Result<_>>()?,
            v: params
                .iter()
                .map(|(k, p)| Ok((k.clone(), zeros(p)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`. Weight decay applies to matrices
    /// only, not to norm gains or biases.
    pub fn step(&mut self, params: &BTreeMap<String, Var>, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        for (name, p) in params {
            let g = grads
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("internal: no gradient for {name}")))?;
            let m = self
                .m
                .get_mut(name)
                .ok_or_else(|| Error::Invalid(format!("internal: no moment for {name}")))?;
            let v = self
                .v
                .get_mut(name)
                .ok_or_else(|| Error::Invalid(format!("internal: no moment for {name}")))?;
            let decay = if p.rank() >= 2 {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            if let Some((next, m1, v1)) = adamw_cpu(
                p.as_tensor(),
                g,
                m,
                v,
                AdamConsts {
                    beta1: self.beta1 as f32,
                    beta2: self.beta2 as f32,
                    eps: self.eps as f32,
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                    lr: lr as f32,
                    decay: decay as f32,
                },
            )? {
                *m = m1;
                *v = v1;
                p.set(&next)?;
                continue;
            }
            *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + self.eps)?)?;
            let next = ((p.as_tensor() * decay)? - (update * lr)?)?;
            p.set(&next)?;
        }
        Ok(())
    }
}

/// Elements per rayon task in the CPU passes (fixed: the results do not depend on the
/// thread count).
const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy)]
struct AdamConsts {
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    lr: f32,
    decay: f32,
}

/// True for a contiguous-able f32 CPU tensor, the form the CPU passes read.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// One AdamW update of one parameter in one pass: (new p, new m, new v), or None when
/// a tensor is not f32 on the CPU (the caller then runs candle ops).
fn adamw_cpu(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: AdamConsts,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if ![p, g, m, v].iter().all(|t| cpu_f32(t)) || g.shape() != p.shape() {
        return Ok(None);
    }
    const OP: &str = "adamw";
    use crate::kernels::cpu::with_cpu_f32;
    let (p1, m1, v1) = with_cpu_f32(p, OP, |p| {
        with_cpu_f32(g, OP, |g| {
            with_cpu_f32(m, OP, |m| {
                with_cpu_f32(v, OP, |v| {
                    let n = p.len();
                    let (mut p1, mut m1, mut v1) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                    p1.par_chunks_mut(CHUNK)
                        .zip(m1.par_chunks_mut(CHUNK))
                        .zip(v1.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(ci, ((po, mo), vo))| {
                            let at = ci * CHUNK;
                            for i in 0..po.len() {
                                let gi = g[at + i];
                                let mi = m[at + i] * c.beta1 + gi * (1.0 - c.beta1);
                                let vi = v[at + i] * c.beta2 + gi * gi * (1.0 - c.beta2);
                                let update = (mi / c.bc1) / ((vi / c.bc2).sqrt() + c.eps);
                                po[i] = p[at + i] * c.decay - update * c.lr;
                                mo[i] = mi;
                                vo[i] = vi;
                            }
                        });
                    (p1, m1, v1)
                })
            })
        })
    })????;
    let t = |x: Vec<f32>| Tensor::from_vec(x, p.shape(), p.device());
    Ok(Some((t(p1)?, t(m1)?, t(v1)?)))
}

/// The sum of squares of an f32 CPU tensor in f64, from fixed-size chunks added in order.
fn sum_sq_cpu(t: &Tensor) -> Result<f64> {
    let partial: Vec<f64> = crate::kernels::cpu::with_cpu_f32(t, "grad-norm", |x| {
        x.par_chunks(CHUNK)
            .map(|c| {
                // Eight f32 lanes per chunk (vectorised), widened to f64 per chunk.
                let mut acc = [0f32; 8];
                let mut it = c.chunks_exact(8);
                for w in &mut it {
                    for k in 0..8 {
                        acc[k] += w[k] * w[k];
                    }
                }
                let tail: f32 = it.remainder().iter().map(|v| v * v).sum();
                acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
            })
            .collect()
    })?;
    Ok(partial.iter().sum())
}

/// The global L2 norm of all gradients.
pub fn grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += if cpu_f32(g) {
            sum_sq_cpu(g)?
        } else {
            g.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64
        };
    }
    Ok(sq.sqrt())
}

/// Scales all gradients so that their global norm is at most `max_norm`
/// (0 disables). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Linear warmup to `lr`, then cosine decay to `min_lr` at the last step.
pub fn lr_at(spec: &TrainSpec, step: usize) -> f64 {
    let warmup = spec.warmup_steps();
    if step < warmup {
        return spec.lr * (step + 1) as f64 / warmup as f64;
    }
    let span = (spec.steps - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    spec.min_lr() + 0.5 * (spec.lr - spec.min_lr()) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let spec = TrainSpec {
            steps: 100,
            lr: 1e-2,
            min_lr: Some(1e-3),
            warmup_steps: Some(10),
            ..TrainSpec::default()
        };
        assert!((lr_at(&spec, 0) - 1e-3).abs() < 1e-12);
        assert!((lr_at(&spec, 9) - 1e-2).abs() < 1e-12);
        assert!((lr_at(&spec, 10) - 1e-2).abs() < 1e-12);
        assert!(lr_at(&spec, 55) < lr_at(&spec, 20));
        assert!((lr_at(&spec, 100) - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn first_adamw_step_matches_closed_form() -> Result<()> {
        // After one step with bias correction, the update is lr * g / (|g| + eps)
        // = lr * sign(g), plus decoupled decay on matrices.
        let spec = TrainSpec {
            weight_decay: 0.1,
            ..TrainSpec::default()
        };
        let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &Device::Cpu)?)?;
        let params: BTreeMap<_, _> = [("w".to_string(), w.clone()), ("b".to_string(), b.clone())].into();
        let grads: BTreeMap<_, _> = [
            ("w".to_string(), Tensor::new(&[[0.3f32, -4.0]], &Device::Cpu)?),
            ("b".to_string(), Tensor::new(&[-0.2f32], &Device::Cpu)?),
        ]
        .into();
        let mut opt = AdamW::new(&spec, &params)?;
        opt.step(&params, &grads, 0.01)?;
        let w1 = w.as_tensor().to_vec2::<f32>()?;
        let b1 = b.as_tensor().to_vec1::<f32>()?;
        assert!((w1[0][0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{w1:?}");
        assert!((w1[0][1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{w1:?}");
        assert!((b1[0] - (0.5 + 0.01)).abs() < 1e-6, "bias is not decayed: {b1:?}");
        Ok(())
    }

    /// The one-pass CPU update against the candle-op arithmetic it replaces, over
    /// several steps (moments included), to f32 rounding.
    #[test]
    fn cpu_update_matches_the_candle_ops() -> Result<()> {
        let spec = TrainSpec {
            weight_decay: 0.1,
            ..TrainSpec::default()
        };
        let shapes: [&[usize]; 3] = [&[70_000], &[33, 17], &[5]];
        let init: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Ok(Tensor::randn(0f32, 1.0, *s, &Device::Cpu)?.affine(1.0, i as f64)?))
            .collect::<Result<_>>()?;
        let params: BTreeMap<String, Var> = init
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(t)?)))
            .collect::<Result<_>>()?;
        let mut opt = AdamW::new(&spec, &params)?;
        // The candle-op reference on copies of the same values.
        let (mut p, mut m, mut v): (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) = (
            init.clone(),
            init.iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            init.iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        );
        for step in 1..=4 {
            let grads: BTreeMap<String, Tensor> = init
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Ok((
                        format!("p{i}"),
                        (Tensor::randn(0f32, 1.0, t.shape(), &Device::Cpu)? * step as f64)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let lr = 0.01;
            opt.step(&params, &grads, lr)?;
            let (bc1, bc2) = (1.0 - 0.9f64.powi(step), 1.0 - 0.95f64.powi(step));
            for i in 0..p.len() {
                let g = &grads[&format!("p{i}")];
                m[i] = ((&m[i] * 0.9)? + (g * 0.1)?)?;
                v[i] = ((&v[i] * 0.95)? + (g.sqr()? * 0.05)?)?;
                let update = ((&m[i] / bc1)? / ((&v[i] / bc2)?.sqrt()? + spec.eps)?)?;
                let decay = if p[i].rank() >= 2 { 1.0 - lr * 0.1 } else { 1.0 };
                p[i] = ((&p[i] * decay)? - (update * lr)?)?;
                let got = params[&format!("p{i}")].as_tensor();
                let diff = (got - &p[i])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "step {step} p{i}: {diff}");
            }
        }
        let norm = grad_norm(&[("a".to_string(), Tensor::ones(100_003, DType::F32, &Device::Cpu)?)].into())?;
        assert!((norm - 100_003f64.sqrt()).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn clipping_caps_the_global_norm() -> Result<()> {
        let mut grads: BTreeMap<_, _> = [
            ("a".to_string(), Tensor::new(&[3.0f32], &Device::Cpu)?),
            ("b".to_string(), Tensor::new(&[4.0f32], &Device::Cpu)?),
        ]
        .into();
        let before = clip_grad_norm(&mut grads, 1.0)?;
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&grads)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}
