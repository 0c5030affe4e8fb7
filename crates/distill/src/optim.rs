//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), moments that
//! can be saved and restored, global-norm clipping, and the warmup + cosine
//! schedule. candle-nn's AdamW keeps its moments private and cannot clip.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

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
            *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + self.eps)?)?;
            let decay = if p.rank() >= 2 {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let next = ((p.as_tensor() * decay)? - (update * lr)?)?;
            p.set(&next)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients.
pub fn grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
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
