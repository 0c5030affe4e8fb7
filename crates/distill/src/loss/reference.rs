//! The distillation loss as a plain composition of differentiable candle ops:
//!
//! loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(p_teacher,T || p_student,T)
//!
//! summed over valid tokens and divided by `denom` (the valid-token count of the
//! whole optimiser step, so that gradient accumulation gives the same result as
//! one big batch). Hinton et al. 2015 scale the soft term by T^2 so that its
//! gradients keep their size as T changes. The teacher side is detached.

use candle_core::{DType, Tensor, D};

use super::LossSpec;
use crate::error::Result;

/// The loss to backpropagate and its terms, each already divided by `denom`.
pub struct LossParts {
    pub total: Tensor, // scalar
    /// Cross-entropy against the labels (per valid token).
    pub ce: f32,
    /// T^2 * the divergence (forward KL here; the chosen one in `fused`), per valid token; 0 without a teacher.
    pub kd: f32,
}

/// log-softmax over the last dimension from differentiable ops: (N, V) -> (N, V).
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // constant shift, no gradient needed
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// student (N, V), teacher (N, V) or None, targets (N,) u32, mask (N,) f32.
pub fn distill_loss(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
    mask: &Tensor,
    spec: &LossSpec,
    denom: f64,
) -> Result<LossParts> {
    let LossSpec {
        ce_weight: alpha,
        temperature,
        divergence,
    } = *spec;
    if divergence != super::Divergence::ForwardKl {
        return Err(crate::error::Error::Invalid(format!(
            "the reference loss implements forward_kl only, not {divergence}; use the fused loss"
        )));
    }
    let student = student.to_dtype(DType::F32)?;
    let denom = denom.max(1.0); // an all-masked step gives 0, not NaN
    let logp = log_softmax(&student)?; // (N, V)
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?; // (N,)
    let ce_sum = (picked * mask)?.sum_all()?.neg()?;
    let ce = (&ce_sum / denom)?;
    let Some(teacher) = teacher else {
        return Ok(LossParts {
            ce: ce.to_scalar::<f32>()?,
            kd: 0.0,
            total: ce,
        });
    };
    let t = temperature;
    let teacher = teacher.to_dtype(DType::F32)?.detach();
    let logp_t = log_softmax(&(teacher / t)?)?; // (N, V)
    let p_t = logp_t.exp()?;
    let logp_s = log_softmax(&(student / t)?)?;
    let kl_rows = (p_t * (logp_t - logp_s)?)?.sum(D::Minus1)?; // (N,)
    let kd = ((kl_rows * mask)?.sum_all()? * (t * t / denom))?;
    let total = ((&ce * alpha)? + (&kd * (1.0 - alpha))?)?;
    Ok(LossParts {
        ce: ce.to_scalar::<f32>()?,
        kd: kd.to_scalar::<f32>()?,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_hand_computed_values() -> Result<()> {
        // Expected values come from an independent f64 implementation below.
        let s = t(&[1., 2., 0., 0., 0., 3.], (2, 3));
        let te = t(&[2., 0., 1., 1., 1., 1.], (2, 3));
        let targets = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        let mask = Tensor::new(&[1f32, 1.], &Device::Cpu)?;
        let l = distill_loss(&s, Some(&te), &targets, &mask, &LossSpec::forward_kl(0.5, 2.0), 2.0)?;
        let ce = expected_ce(&[[1., 2., 0.], [0., 0., 3.]], &[1, 2]);
        let kd = expected_kd(&[[1., 2., 0.], [0., 0., 3.]], &[[2., 0., 1.], [1., 1., 1.]], 2.0);
        assert!((l.ce as f64 - ce).abs() < 1e-6, "{} vs {ce}", l.ce);
        assert!((l.kd as f64 - kd).abs() < 1e-5, "{} vs {kd}", l.kd);
        let total = l.total.to_scalar::<f32>()? as f64;
        assert!((total - 0.5 * (ce + kd)).abs() < 1e-5);
        Ok(())
    }

    fn lsm(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x - lse).collect()
    }
    fn expected_ce(s: &[[f64; 3]], y: &[usize]) -> f64 {
        s.iter().zip(y).map(|(r, &y)| -lsm(r)[y]).sum::<f64>() / s.len() as f64
    }
    fn expected_kd(s: &[[f64; 3]], t: &[[f64; 3]], temp: f64) -> f64 {
        let mut total = 0.0;
        for (rs, rt) in s.iter().zip(t) {
            let ls = lsm(&rs.map(|x| x / temp));
            let lt = lsm(&rt.map(|x| x / temp));
            total += (0..3).map(|i| lt[i].exp() * (lt[i] - ls[i])).sum::<f64>();
        }
        temp * temp * total / s.len() as f64
    }

    #[test]
    fn all_masked_batch_is_zero_not_nan() -> Result<()> {
        let s = t(&[1., 2., 0.], (1, 3));
        let targets = Tensor::new(&[1u32], &Device::Cpu)?;
        let mask = Tensor::new(&[0f32], &Device::Cpu)?;
        let l = distill_loss(&s, Some(&s), &targets, &mask, &LossSpec::forward_kl(0.5, 2.0), 0.0)?;
        assert_eq!(l.total.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn extreme_logits_stay_finite() -> Result<()> {
        let s = t(&[1e4, -1e4, 0., -1e4, 1e4, 3.], (2, 3));
        let te = t(&[-1e4, 1e4, 0., 1e4, 0., -1e4], (2, 3));
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        let mask = Tensor::new(&[1f32, 1.], &Device::Cpu)?;
        let l = distill_loss(&s, Some(&te), &targets, &mask, &LossSpec::forward_kl(0.3, 1.0), 2.0)?;
        assert!(l.total.to_scalar::<f32>()?.is_finite());
        Ok(())
    }

    #[test]
    fn kd_gradient_matches_finite_differences() -> Result<()> {
        use candle_core::Var;
        let s0 = [0.3f32, -1.2, 2.0, 0.5, 0.1, -0.4];
        let te = t(&[1.0, 0.0, -1.0, 0.2, 2.0, 0.3], (2, 3));
        let targets = Tensor::new(&[2u32, 1], &Device::Cpu)?;
        let mask = Tensor::new(&[1f32, 1.], &Device::Cpu)?;
        let s = Var::from_tensor(&t(&s0, (2, 3)))?;
        let l = distill_loss(
            s.as_tensor(),
            Some(&te),
            &targets,
            &mask,
            &LossSpec::forward_kl(0.4, 1.7),
            2.0,
        )?;
        let g = l
            .total
            .backward()?
            .get(s.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let f = |v: &[f32]| -> f64 {
            let s = t(v, (2, 3));
            let l = distill_loss(&s, Some(&te), &targets, &mask, &LossSpec::forward_kl(0.4, 1.7), 2.0).unwrap();
            l.total.to_scalar::<f32>().unwrap() as f64
        };
        for i in 0..6 {
            let h = 1e-2f32;
            let (mut up, mut dn) = (s0, s0);
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&up) - f(&dn)) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3,
                "grad {i}: analytic {} vs numeric {fd}",
                g[i]
            );
        }
        Ok(())
    }
}
