//! The policy-gradient loss of the on-policy stages, on candle's graph: GRPO's clipped
//! ratio objective with an optional KL penalty to a reference model (Shao et al. 2024,
//! "DeepSeekMath", eq. 3), and the sampled-token estimator of on-policy distillation,
//! whose per-token advantage is the teacher's log-probability of the sampled token minus
//! the student's (the Tinker cookbook's on-policy distillation, 2025).
//!
//! Both score the tokens the model sampled itself: position t of a row carries the
//! sampled token `x_t` as its target, and the loss mask covers the sampled tokens.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// What a policy-gradient micro-batch carries besides its tokens: one entry per position
/// of the batch (B*T), f32.
#[derive(Clone, Debug)]
pub struct PolicyTargets {
    /// The advantage of each position (GRPO: its sequence's group-normalised reward).
    pub advantages: Tensor,
    /// The teacher's log-probability of each sampled token: the advantage gains
    /// `log p_teacher(x_t) - log q(x_t)` (the sampled-token estimator of reverse KL).
    pub teacher_log_probs: Option<Tensor>,
    /// The reference model's log-probability of each sampled token, for the KL penalty.
    pub ref_log_probs: Option<Tensor>,
}

/// The objective's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicySpec {
    /// PPO's clip range epsilon: the ratio is clipped to [1 - clip, 1 + clip].
    pub clip: f64,
    /// Weight of the KL penalty to the reference model (0: none).
    pub kl: f64,
}

/// The loss and its two terms (summed over the masked positions, divided by `denom`).
pub struct PolicyParts {
    /// The scalar to differentiate.
    pub total: Tensor,
    /// The clipped surrogate objective, negated (lower is better).
    pub surrogate: f32,
    /// The KL estimate to the reference (0 without one).
    pub kl: f32,
}

/// Log-probability of each row's target under `logits` (N, V): (N,), on the graph.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok((picked - lse)?.squeeze(1)?)
}

/// `-sum_t m_t min(r_t A_t, clip(r_t) A_t) + kl * sum_t m_t k3_t`, divided by `denom`,
/// where `r_t = q(x_t) / q_old(x_t)` and `q_old` is the sampling policy: the current
/// weights, detached (one update per batch of samples, so the ratio is 1 in value and
/// its gradient is the policy gradient). `k3_t = exp(l_t) - l_t - 1` with
/// `l_t = log q_ref(x_t) - log q(x_t)` is the unbiased, non-negative KL estimator
/// GRPO uses. With `teacher_log_probs`, `A_t += log p_teacher(x_t) - log q_old(x_t)`.
pub fn policy_loss(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    t: &PolicyTargets,
    spec: &PolicySpec,
    denom: f64,
) -> Result<PolicyParts> {
    if !(0.0..1.0).contains(&spec.clip) || !spec.kl.is_finite() || spec.kl < 0.0 {
        return Err(Error::Invalid(format!(
            "policy loss: clip must lie in [0, 1) and kl be >= 0, got clip {} and kl {}",
            spec.clip, spec.kl
        )));
    }
    let logp = token_log_probs(logits, targets)?;
    let old = logp.detach();
    let mask = mask.to_dtype(DType::F32)?;
    let mut adv = t.advantages.to_dtype(DType::F32)?;
    if let Some(tl) = &t.teacher_log_probs {
        adv = (adv + (tl.to_dtype(DType::F32)? - &old)?)?;
    }
    let ratio = (&logp - &old)?.exp()?;
    let clipped = ratio.clamp(1.0 - spec.clip, 1.0 + spec.clip)?;
    let objective = (&ratio * &adv)?.minimum(&(clipped * &adv)?)?;
    let surrogate = ((objective * &mask)?.sum_all()? / -denom)?;
    let (total, kl) = match (&t.ref_log_probs, spec.kl > 0.0) {
        (Some(r), true) => {
            let l = (r.to_dtype(DType::F32)? - &logp)?;
            let k3 = ((l.exp()? - &l)? - 1.0)?;
            let kl = ((k3 * &mask)?.sum_all()? / denom)?;
            ((&surrogate + (&kl * spec.kl)?)?, kl.to_scalar::<f32>()?)
        }
        (None, true) => {
            return Err(Error::Invalid(
                "policy loss: a KL penalty needs the reference model's log-probabilities".into(),
            ))
        }
        _ => (surrogate.clone(), 0.0),
    };
    Ok(PolicyParts {
        surrogate: surrogate.to_scalar::<f32>()?,
        kl,
        total,
    })
}

/// GRPO's advantages: each reward minus its group's mean, divided by the group's
/// standard deviation (unbiased, as TRL computes it) plus 1e-4. `rewards` holds whole
/// groups of `group` in a row; a group whose rewards are all equal gets zeros.
pub fn group_advantages(rewards: &[f64], group: usize) -> Result<Vec<f64>> {
    if group < 2 || !rewards.len().is_multiple_of(group) {
        return Err(Error::Invalid(format!(
            "group advantages: {} rewards do not split into groups of {group} (the group needs at least 2)",
            rewards.len()
        )));
    }
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / group as f64;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (group - 1) as f64;
        out.extend(g.iter().map(|r| (r - mean) / (var.sqrt() + 1e-4)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// Rewards [1, 0, 0, 1] and [1, 1, 1, 1]: mean 0.5, unbiased std sqrt(1/3); an
    /// all-equal group gets zeros.
    #[test]
    fn group_advantages_by_hand() -> Result<()> {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4)?;
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        let want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0, 0.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        assert!(group_advantages(&[1.0, 0.0, 1.0], 2).is_err());
        Ok(())
    }

    /// Two positions of vocabulary 2, the second masked out. Logits [0, ln 3] give
    /// q(x = 1) = 3/4. With A = 2 the loss is -A * ratio = -2 (the ratio is 1); its
    /// gradient with respect to the logits is -A (onehot - q) = -2 [-1/4, 1/4].
    /// With a reference log-prob l_ref = ln(1/2): k3 = exp(l) - l - 1 with
    /// l = ln(1/2) - ln(3/4) = ln(2/3): 2/3 - ln(2/3) - 1.
    #[test]
    fn clipped_objective_and_kl_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::new(&[[0f32, 3f32.ln()], [1.0, 2.0]], &dev)?)?;
        let targets = Tensor::new(&[1u32, 0], &dev)?;
        let mask = t(&[1.0, 0.0]);
        let targets_of = |adv: f32, r: Option<f32>| PolicyTargets {
            advantages: t(&[adv, 5.0]),
            teacher_log_probs: None,
            ref_log_probs: r.map(|r| t(&[r, 0.0])),
        };
        let spec = PolicySpec { clip: 0.2, kl: 0.0 };
        let p = policy_loss(logits.as_tensor(), &targets, &mask, &targets_of(2.0, None), &spec, 1.0)?;
        assert!((p.surrogate + 2.0).abs() < 1e-6, "{}", p.surrogate);
        let g = p.total.backward()?;
        let dl = g.get(logits.as_tensor()).expect("grad").to_vec2::<f32>()?;
        // d(-A log q_1)/d logits = -A (onehot_1 - q) = -2 * [-1/4, 1/4].
        let want = [[0.5f32, -0.5], [0.0, 0.0]];
        for (row, w) in dl.iter().zip(want) {
            for (x, y) in row.iter().zip(w) {
                assert!((x - y).abs() < 1e-6, "{dl:?}");
            }
        }
        let spec = PolicySpec { clip: 0.2, kl: 0.5 };
        let p = policy_loss(
            logits.as_tensor(),
            &targets,
            &mask,
            &targets_of(2.0, Some(0.5f32.ln())),
            &spec,
            2.0,
        )?;
        let l = (2.0f64 / 3.0).ln();
        let k3 = l.exp() - l - 1.0;
        assert!((p.kl as f64 - k3 / 2.0).abs() < 1e-6, "{} vs {}", p.kl, k3 / 2.0);
        let total = p.total.to_scalar::<f32>()? as f64;
        assert!((total - (-1.0 + 0.5 * k3 / 2.0)).abs() < 1e-6, "{total}");
        Ok(())
    }

    /// The clip by hand: with q_old fixed at 3/4 and the current q at 0.95, the ratio
    /// 0.95/0.75 = 1.267 is clipped to 1.2 for a positive advantage (no gradient) and
    /// not for a negative one (min picks the unclipped, more pessimistic term).
    #[test]
    fn the_clip_binds_on_the_side_the_advantage_favours() -> Result<()> {
        let ratio = t(&[0.95 / 0.75]);
        let adv_pos = t(&[1.0]);
        let clipped = ratio.clamp(0.8, 1.2)?;
        let obj = (&ratio * &adv_pos)?.minimum(&(&clipped * &adv_pos)?)?;
        assert!((obj.to_vec1::<f32>()?[0] - 1.2).abs() < 1e-6);
        let adv_neg = t(&[-1.0]);
        let obj = (&ratio * &adv_neg)?.minimum(&(&clipped * &adv_neg)?)?;
        assert!((obj.to_vec1::<f32>()?[0] + 0.95 / 0.75).abs() < 1e-6);
        Ok(())
    }

    /// The surrogate's gradient is the policy gradient `-sum m A grad log q(x) / denom`:
    /// checked against central finite differences of that sum, with the sampled-token
    /// advantage (teacher log-probs) and per-position advantages.
    #[test]
    fn the_surrogate_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (3usize, 5usize);
        let vals: Vec<f32> = (0..n * v).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let logits = Var::from_tensor(&Tensor::from_vec(vals.clone(), (n, v), &dev)?)?;
        let targets = Tensor::new(&[4u32, 0, 2], &dev)?;
        let mask = t(&[1.0, 1.0, 0.0]);
        let tl = [-0.7f32, -2.1, -1.0];
        let pt = PolicyTargets {
            advantages: t(&[0.3, -1.2, 4.0]),
            teacher_log_probs: Some(t(&tl)),
            ref_log_probs: None,
        };
        let spec = PolicySpec { clip: 0.2, kl: 0.0 };
        let p = policy_loss(logits.as_tensor(), &targets, &mask, &pt, &spec, 3.0)?;
        let g = p
            .total
            .backward()?
            .get(logits.as_tensor())
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f32>()?;
        // The advantage the surrogate uses, frozen at the current weights.
        let lq = token_log_probs(logits.as_tensor(), &targets)?.to_vec1::<f32>()?;
        let adv: Vec<f64> = (0..n).map(|i| [0.3, -1.2, 4.0][i] + (tl[i] - lq[i]) as f64).collect();
        let objective = |x: &[f32]| -> f64 {
            let l = Tensor::from_vec(x.to_vec(), (n, v), &dev).unwrap();
            let lp = token_log_probs(&l, &targets).unwrap().to_vec1::<f32>().unwrap();
            -(0..2).map(|i| adv[i] * lp[i] as f64).sum::<f64>() / 3.0
        };
        for j in 0..n * v {
            let (mut a, mut b) = (vals.clone(), vals.clone());
            a[j] += 1e-2;
            b[j] -= 1e-2;
            let fd = (objective(&a) - objective(&b)) / 2e-2;
            assert!((fd - g[j] as f64).abs() < 2e-3, "logit {j}: fd {fd} vs {}", g[j]);
        }
        Ok(())
    }
}
