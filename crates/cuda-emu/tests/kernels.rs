//! The CUDA kernels of `kernels/divergence.cu`, run by the CPU emulator, against the CPU
//! ops of `distill::loss` (`divergence_rows`, `cross_entropy_rows`,
//! `top_k_divergence_rows`, and their backward through candle's autograd) on the same
//! inputs and dtypes.
//!
//! Shapes stay small (8 x 37, 5 x 300) because the emulator runs each CUDA thread on an
//! OS thread and every barrier has to schedule each of them: a row costs a millisecond
//! or two per warp of the block. The block sizes are the ones `launch_config` of
//! loss/cuda.rs picks (32 for V = 37, 64 for V = 300) and, for block-size independence,
//! 32, 64, 256 and 1024.

#![allow(clippy::unwrap_used)]

use std::error::Error;

use candle_core::{DType, Device, Tensor, Var, WithDType};
use distill::loss::{cross_entropy_rows, divergence_rows, top_k_divergence_rows, top_k_of_logits, Divergence, TopK};
use distill_cuda_emu::{self as emu, Elem, Params};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type TestResult = Result<(), Box<dyn Error>>;
type Rows = Result<(Vec<f32>, Vec<f32>), Box<dyn Error>>;

/// Every divergence, with the JSD end points and skew 0 as cases of their own (they go
/// through the kernels as other codes, or with ln 0 = -inf). JSD also at an asymmetric
/// beta: at 0.5, beta and 1 - beta are equal, and swapping them would go unnoticed.
const DIVERGENCES: [Divergence; 11] = [
    Divergence::ForwardKl,
    Divergence::ReverseKl,
    Divergence::Jsd { beta: 0.0 },
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 0.25 },
    Divergence::Jsd { beta: 1.0 },
    Divergence::SkewForwardKl { skew: 0.1 },
    Divergence::SkewForwardKl { skew: 0.0 },
    Divergence::SkewReverseKl { skew: 0.1 },
    Divergence::SkewReverseKl { skew: 0.0 },
    Divergence::Tvd,
];

/// One divergence per code path of the kernels' gradients: none, one or two row
/// constants, and TVD's sign. For the tests whose subject is not the formulas (dtypes,
/// block sizes), which then stay fast.
const CODE_PATHS: [Divergence; 4] = [
    Divergence::ForwardKl,
    Divergence::Jsd { beta: 0.25 },
    Divergence::SkewReverseKl { skew: 0.1 },
    Divergence::Tvd,
];

const TEMPERATURES: [f64; 2] = [1.0, 2.5];

/// f32 parity: the kernels and the CPU ops both compute in f32, in different orders.
const RTOL: f32 = 1e-5;

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

/// One test batch, as f32 (rounded to each dtype under test).
struct Batch {
    n: usize,
    v: usize,
    s: Vec<f32>, // (n, v) student logits
    t: Vec<f32>, // (n, v) teacher logits
    w: Vec<f32>, // (n,) incoming gradient of each row; 0 = masked
}

/// Seeded logits in [-4, 4), with two kinds of hard rows:
/// - rows 0, 5, 10, ... carry three entries of +-1e4 on each side, so the row's max is
///   far from the rest and log-probabilities must come from max-shifted sums;
/// - row 1 has -inf on both sides at columns 4 and 2, 34, 66, ... (vocabulary entries
///   masked for both models: probability 0, the `0 log 0 = 0` convention). With 32 or
///   64 threads, thread 2 then sees only -inf, the case the block's log-sum-exp skips,
///   and thread 4 sees -inf first and finite logits after it.
///
/// Rows 3, 7, 11, ... have weight 0 (masked), the others a weight in [0.5, 1.5).
fn batch(seed: u64, n: usize, v: usize) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let side = |rng: &mut ChaCha8Rng| {
        let mut x: Vec<f32> = (0..n * v).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        for row in (0..n).step_by(5) {
            for _ in 0..3 {
                let j = rng.random_range(0..v);
                x[row * v + j] = if rng.random::<bool>() { 1e4 } else { -1e4 };
            }
        }
        if n > 1 {
            for j in (2..v).step_by(32).chain([4]) {
                x[v + j] = f32::NEG_INFINITY;
            }
        }
        x
    };
    let s = side(&mut rng);
    let t = side(&mut rng);
    let w = (0..n)
        .map(|i| if i % 4 == 3 { 0.0 } else { rng.random_range(0.5f32..1.5) })
        .collect();
    Batch { n, v, s, t, w }
}

/// Rounds f32 values to the element type under test (to nearest even, as candle does).
fn cast<E: WithDType>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&a| E::from_f64(a as f64)).collect()
}

/// Widens values of the element type under test to f32 (exact: f16 and bf16 widen
/// exactly, and an f64 output of the kernels holds an f32 value).
fn widen<E: WithDType>(x: &[E]) -> Vec<f32> {
    x.iter().map(|a| a.to_f64() as f32).collect()
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

/// Checks `got` (emulated kernel) against `want` (CPU op), rows of `v` entries.
///
/// Both compute in f32 but differ in the order of their sums (a block-wide tree against
/// 16 lanes) and in exp/log (glibc against the CPU kernel's polynomials), so they agree
/// to rounding at the size of a row's largest terms, not to a fraction of every entry.
/// An entry passes when
///
///   |got - want| <= rtol * (|want| + scale),   scale = max(floor[r], max_j |want_rj|),
///
/// which is relative for large entries and absolute near zero. `floor` carries terms
/// that cancel inside an entry: the reverse-type gradients are q (log q - log p - L),
/// a difference of numbers the size of the row's loss L (about 1e4 in the rows with
/// +-1e4 logits), so for gradients the floor is |weight * L|. NaN must meet NaN and an
/// infinity the same infinity.
fn assert_close(what: &str, got: &[f32], want: &[f32], v: usize, floor: &[f32], rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (r, (g_row, w_row)) in got.chunks(v).zip(want.chunks(v)).enumerate() {
        let largest = w_row.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
        let scale = largest.max(floor.get(r).copied().unwrap_or(0.0));
        for (j, (&a, &b)) in g_row.iter().zip(w_row).enumerate() {
            let ok = if a.is_nan() || b.is_nan() {
                a.is_nan() && b.is_nan()
            } else if a.is_infinite() || b.is_infinite() {
                a == b
            } else {
                (a - b).abs() <= rtol * (b.abs() + scale)
            };
            assert!(
                ok,
                "{what}: row {r} col {j}: emulated kernel {a}, CPU op {b} (|diff| {}, tol {})",
                (a - b).abs(),
                rtol * (b.abs() + scale)
            );
        }
    }
}

/// `|weight * loss|` per row: the `floor` of gradient comparisons.
fn loss_floor(w: &[f32], rows: &[f32]) -> Vec<f32> {
    w.iter().zip(rows).map(|(w, l)| (w * l).abs()).collect()
}

/// The gradient tolerance for a student type: f32 parity plus the rounding of one
/// element to the type (two sides that differ in the last f32 bits can round to
/// neighbouring f16/bf16 values, one unit of 2^-10 or 2^-7 of the value apart).
fn grad_rtol<S: Elem>() -> f32 {
    match S::NAME {
        "f16" => RTOL + 2f32.powi(-10),
        "bf16" => RTOL + 2f32.powi(-7),
        _ => RTOL,
    }
}

/// Asserts that every row of weight 0 has an all-zero gradient.
fn assert_masked_rows_zero(what: &str, grad: &[f32], w: &[f32], v: usize) {
    for (r, row) in grad.chunks(v).enumerate() {
        if w[r] == 0.0 {
            assert!(
                row.iter().all(|x| *x == 0.0),
                "{what}: masked row {r} has a nonzero gradient: {row:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The two sides
// ---------------------------------------------------------------------------

/// The rows of a CPU op applied to a student Var, and d(sum_r w_r * rows_r)/d student
/// through candle's autograd, widened to f32 (the gradient is checked to come back in
/// the student's dtype first).
fn rows_and_grad<S: WithDType>(
    s: &[S],
    (n, v): (usize, usize),
    w: &[f32],
    op: impl FnOnce(&Tensor) -> distill::Result<Tensor>,
) -> Rows {
    let sv = Var::from_slice(s, (n, v), &Device::Cpu)?;
    let wt = Tensor::from_slice(w, n, &Device::Cpu)?;
    let rows = op(sv.as_tensor())?; // (N,)
    let grads = (&rows * &wt)?.sum_all()?.backward()?;
    let g = grads
        .get(sv.as_tensor())
        .ok_or("the CPU op gave the student no gradient")?; // (N, V)
    assert_eq!(g.dtype(), S::DTYPE, "the CPU op's gradient dtype");
    let g = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok((rows.to_vec1::<f32>()?, g))
}

/// The CPU op `divergence_rows` on the batch in dtypes (S, T).
fn cpu_divergence<S: WithDType, T: WithDType>(b: &Batch, s: &[S], t: &[T], d: Divergence, temp: f64) -> Rows {
    let t = Tensor::from_slice(t, (b.n, b.v), &Device::Cpu)?;
    rows_and_grad(s, (b.n, b.v), &b.w, |s| divergence_rows(s, &t, d, temp))
}

/// The emulated kernels distill_div_fwd_<s>_<t> and distill_div_bwd_<s>_<t>, the
/// gradient widened to f32.
fn emu_divergence<S: Elem + WithDType, T: Elem>(
    b: &Batch,
    s: &[S],
    t: &[T],
    d: Divergence,
    temp: f64,
    block: u32,
) -> Rows {
    let p = Params::new(d, temp);
    let rows = emu::div_fwd(s, t, b.n, b.v, p, block)?; // (N,)
    let grad = emu::div_bwd(s, t, &b.w, b.n, b.v, p, block)?; // (N, V)
    Ok((rows, widen(&grad)))
}

/// Both sides on `b` rounded to (S, T), for each divergence and temperature given.
fn check_divergences<S: Elem + WithDType, T: Elem + WithDType>(
    b: &Batch,
    divergences: &[Divergence],
    temperatures: &[f64],
    block: u32,
) -> TestResult {
    let (s, t) = (cast::<S>(&b.s), cast::<T>(&b.t));
    for &temp in temperatures {
        for &d in divergences {
            let what = format!("{d} {}/{} ({}, {}) T={temp} block {block}", S::NAME, T::NAME, b.n, b.v);
            let cpu = cpu_divergence(b, &s, &t, d, temp)?;
            let emu = emu_divergence(b, &s, &t, d, temp, block)?;
            assert_emu_matches_cpu::<S>(&what, b, emu, cpu);
        }
    }
    Ok(())
}

/// The emulated kernels' (rows, gradient) against the CPU op's: the rows to `RTOL`, the
/// gradient to the student type's tolerance against the row's scale, masked rows zero.
fn assert_emu_matches_cpu<S: Elem>(what: &str, b: &Batch, emu: (Vec<f32>, Vec<f32>), cpu: (Vec<f32>, Vec<f32>)) {
    let ((rows_emu, grad_emu), (rows_cpu, grad_cpu)) = (emu, cpu);
    assert_close(&format!("{what}: rows"), &rows_emu, &rows_cpu, 1, &[], RTOL);
    let floor = loss_floor(&b.w, &rows_cpu);
    let rtol = grad_rtol::<S>();
    assert_close(&format!("{what}: grad"), &grad_emu, &grad_cpu, b.v, &floor, rtol);
    assert_masked_rows_zero(what, &grad_emu, &b.w, b.v);
}

// ---------------------------------------------------------------------------
// Divergences
// ---------------------------------------------------------------------------

/// Every divergence at T = 1 and 2.5 on short rows; on longer rows (the block of 64
/// launch_config picks for them) at T = 2.5, which keeps the test fast.
#[test]
fn every_divergence_matches_the_cpu_op_in_values_and_gradients() -> TestResult {
    for (seed, n, v, temperatures) in [(1, 8, 37, &TEMPERATURES[..]), (2, 5, 300, &TEMPERATURES[1..])] {
        let b = batch(seed, n, v);
        check_divergences::<f32, f32>(&b, &DIVERGENCES, temperatures, emu::launch_block(v))?;
    }
    Ok(())
}

#[test]
fn student_and_teacher_dtypes_match_the_cpu_op_on_the_same_dtypes() -> TestResult {
    // The pairs training meets (a bf16 or f16 model, a cached bf16 teacher, an f64 run),
    // on each code path of the gradients.
    let b = batch(3, 5, 37);
    let block = emu::launch_block(b.v);
    let temp = [2.5];
    check_divergences::<bf16, f32>(&b, &CODE_PATHS, &temp, block)?;
    check_divergences::<f16, f16>(&b, &CODE_PATHS, &temp, block)?;
    check_divergences::<f32, bf16>(&b, &CODE_PATHS, &temp, block)?;
    check_divergences::<f64, f64>(&b, &CODE_PATHS, &temp, block)?;
    // Every entry point once: all 16 (student, teacher) pairs, with the divergence whose
    // gradient has the most terms.
    let d = [Divergence::SkewReverseKl { skew: 0.1 }];
    let b = batch(4, 4, 37);
    macro_rules! with_every_teacher {
        ($($s:ty),*) => {$(
            check_divergences::<$s, f32>(&b, &d, &temp, block)?;
            check_divergences::<$s, f16>(&b, &d, &temp, block)?;
            check_divergences::<$s, bf16>(&b, &d, &temp, block)?;
            check_divergences::<$s, f64>(&b, &d, &temp, block)?;
        )*};
    }
    with_every_teacher!(f32, f16, bf16, f64);
    Ok(())
}

/// The kernels load every element exactly as f32 and compute in f32, so a half or f64
/// input gives bit for bit the f32 kernel's results on its f32 value, and a half
/// gradient is exactly the f32 kernel's gradient rounded to the type (to nearest even,
/// as `half` rounds). This pins down the stores, which the tolerances above cannot:
/// a store that truncated would be one unit off, inside them.
#[test]
fn other_dtypes_are_exact_conversions_of_the_f32_kernels() -> TestResult {
    fn same_bits(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same, "{what}: element {j}: {a} vs {b}");
        }
    }
    /// The divergence kernels on (S, T) against the f32 kernels on the same values.
    fn divergence<S: Elem + WithDType, T: Elem + WithDType>(b: &Batch, block: u32) -> TestResult {
        let what = format!("{}/{}", S::NAME, T::NAME);
        let p = Params::new(Divergence::SkewReverseKl { skew: 0.1 }, 2.5);
        let (s, t) = (cast::<S>(&b.s), cast::<T>(&b.t));
        let (s32, t32) = (widen(&s), widen(&t)); // the values the kernels load
        let rows = emu::div_fwd(&s, &t, b.n, b.v, p, block)?;
        let rows32 = emu::div_fwd(&s32, &t32, b.n, b.v, p, block)?;
        same_bits(&format!("{what} rows"), &rows, &rows32);
        let grad = widen(&emu::div_bwd(&s, &t, &b.w, b.n, b.v, p, block)?);
        let grad32 = emu::div_bwd(&s32, &t32, &b.w, b.n, b.v, p, block)?;
        same_bits(&format!("{what} grad"), &grad, &widen(&cast::<S>(&grad32)));
        Ok(())
    }
    /// The cross-entropy gradient of S against the f32 kernel's, rounded to S.
    fn cross_entropy<S: Elem + WithDType>(b: &Batch, block: u32) -> TestResult {
        let y: Vec<u32> = (0..b.n as u32).collect();
        let s = cast::<S>(&b.s);
        let grad = widen(&emu::ce_bwd(&s, &y, &b.w, b.n, b.v, block)?);
        let grad32 = emu::ce_bwd(&widen(&s), &y, &b.w, b.n, b.v, block)?;
        same_bits(
            &format!("cross-entropy {}", S::NAME),
            &grad,
            &widen(&cast::<S>(&grad32)),
        );
        Ok(())
    }
    let b = batch(17, 5, 37);
    let block = emu::launch_block(b.v);
    divergence::<f16, f32>(&b, block)?;
    divergence::<bf16, f32>(&b, block)?;
    divergence::<f64, f32>(&b, block)?;
    divergence::<f32, f16>(&b, block)?;
    divergence::<f32, bf16>(&b, block)?;
    divergence::<f32, f64>(&b, block)?;
    cross_entropy::<f16>(&b, block)?;
    cross_entropy::<bf16>(&b, block)?;
    Ok(())
}

/// The block size changes only the order of the sums, so results agree to f32 rounding.
/// Not bit for bit: thread i of a block of B sums elements i, i + B, i + 2B, ... and the
/// block then adds the threads' sums in a tree, so another B adds the same terms in
/// another order, and f32 addition is not associative (the sums differ in their last
/// bits, and so do the log-probabilities and gradients computed from them).
#[test]
fn results_do_not_depend_on_the_block_size() -> TestResult {
    // V = 300 spreads a row over every thread; V = 37 in blocks of 64 and 256 leaves
    // whole warps without an element, which must add the reductions' identities; V = 1100
    // fills the largest block, 1024 threads in 32 warps: the whole 32-entry scratch array
    // of the reductions. Skew reverse KL makes the most reductions (two row constants);
    // TVD's gradient has a sign that a change of rounding could flip.
    let cases = [
        (5, 3, 300, &CODE_PATHS[2..], &[64, 256][..]),
        (6, 2, 37, &CODE_PATHS[2..3], &[64, 256][..]),
        (15, 1, 1100, &CODE_PATHS[2..3], &[1024][..]),
    ];
    let temp = 2.5;
    for (seed, n, v, divergences, blocks) in cases {
        let b = batch(seed, n, v);
        for &d in divergences {
            let first = emu_divergence(&b, &b.s, &b.t, d, temp, 32)?;
            for &block in blocks {
                let what = format!("{d} ({n}, {v}) block {block} against block 32");
                let (rows, grad) = emu_divergence(&b, &b.s, &b.t, d, temp, block)?;
                assert_close(&format!("{what}: rows"), &rows, &first.0, 1, &[], 1e-6);
                let floor = loss_floor(&b.w, &first.0);
                assert_close(&format!("{what}: grad"), &grad, &first.1, v, &floor, 1e-6);
            }
        }
    }
    // Cross-entropy: the same, one side only.
    let (n, v) = (3, 300);
    let b = batch(16, n, v);
    let y: Vec<u32> = (0..n as u32).map(|r| (r * 7 + 3) % v as u32).collect();
    let first = emu::ce_fwd(&b.s, &y, n, v, 32)?;
    let first_grad = emu::ce_bwd(&b.s, &y, &b.w, n, v, 32)?;
    for block in [64, 256] {
        let what = format!("cross-entropy ({n}, {v}) block {block} against block 32");
        let got = emu::ce_fwd(&b.s, &y, n, v, block)?;
        assert_close(&format!("{what}: rows"), &got.out, &first.out, 1, &[], 1e-6);
        let grad = emu::ce_bwd(&b.s, &y, &b.w, n, v, block)?;
        assert_close(&format!("{what}: grad"), &grad, &first_grad, v, &[], 1e-6);
    }
    Ok(())
}

/// A row whose loss is unused (incoming gradient 0) gets exact zeros without its logits
/// being read, so NaN in padded rows cannot leak into the gradient; the same NaN row with
/// a nonzero weight gives NaN, so the zeros come from the mask.
#[test]
fn masked_rows_get_exact_zeros_even_when_their_logits_are_nan() -> TestResult {
    let mut b = batch(7, 8, 37);
    let v = b.v;
    for r in [2, 3, 7] {
        b.s[r * v..(r + 1) * v].fill(f32::NAN);
        b.t[r * v..(r + 1) * v].fill(f32::NAN);
    }
    b.w[2] = 0.8; // a NaN row that counts
    b.w[3] = 0.0;
    b.w[7] = 0.0;
    let block = emu::launch_block(v);
    fn check<S: Elem + WithDType>(b: &Batch, divergences: &[Divergence], block: u32) -> TestResult {
        let v = b.v;
        let (s, t) = (cast::<S>(&b.s), cast::<S>(&b.t));
        let rows = |grad: &[f32], r: usize| grad[r * v..(r + 1) * v].to_vec();
        for &d in divergences {
            let what = format!("{d} {}", S::NAME);
            let grad = widen(&emu::div_bwd(&s, &t, &b.w, b.n, v, Params::new(d, 2.5), block)?);
            for r in [3, 7] {
                assert!(rows(&grad, r).iter().all(|x| *x == 0.0), "{what}: masked NaN row {r}");
            }
            assert!(
                rows(&grad, 2).iter().all(|x| x.is_nan()),
                "{what}: NaN row 2 with weight 0.8"
            );
            // Every row, NaN ones included, as the CPU op gives it.
            let (rows_cpu, grad_cpu) = cpu_divergence(b, &s, &t, d, 2.5)?;
            assert_close(
                &what,
                &grad,
                &grad_cpu,
                v,
                &loss_floor(&b.w, &rows_cpu),
                grad_rtol::<S>(),
            );
        }
        let y: Vec<u32> = (0..b.n as u32).collect();
        let grad = widen(&emu::ce_bwd(&s, &y, &b.w, b.n, v, block)?);
        for r in [3, 7] {
            assert!(
                rows(&grad, r).iter().all(|x| *x == 0.0),
                "CE {}: masked NaN row {r}",
                S::NAME
            );
        }
        assert!(rows(&grad, 2).iter().all(|x| x.is_nan()), "CE {}: NaN row 2", S::NAME);
        Ok(())
    }
    check::<f32>(&b, &DIVERGENCES, block)?;
    check::<bf16>(&b, &CODE_PATHS[..1], block)?;
    check::<f16>(&b, &CODE_PATHS[..1], block)?;
    check::<f64>(&b, &CODE_PATHS[..1], block)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------

/// Targets in range, one per row, seeded.
fn targets(seed: u64, n: usize, v: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..v as u32)).collect()
}

/// The CPU op `cross_entropy_rows` with targets `y`.
fn cpu_cross_entropy<S: WithDType>(s: &[S], y: &[u32], w: &[f32], (n, v): (usize, usize)) -> Rows {
    let yt = Tensor::from_slice(y, n, &Device::Cpu)?;
    rows_and_grad(s, (n, v), w, |s| cross_entropy_rows(s, &yt))
}

#[test]
fn cross_entropy_matches_the_cpu_op_in_values_and_gradients() -> TestResult {
    fn check<S: Elem + WithDType>(b: &Batch, y: &[u32]) -> TestResult {
        let (n, v) = (b.n, b.v);
        let block = emu::launch_block(v);
        let what = format!("cross-entropy {} ({n}, {v}) block {block}", S::NAME);
        let s = cast::<S>(&b.s);
        let (rows_cpu, grad_cpu) = cpu_cross_entropy(&s, y, &b.w, (n, v))?;
        let fwd = emu::ce_fwd(&s, y, n, v, block)?;
        assert_eq!(fwd.bad, 0, "{what}: bad flag with every target in range");
        assert_close(&format!("{what}: rows"), &fwd.out, &rows_cpu, 1, &[], RTOL);
        let grad = widen(&emu::ce_bwd(&s, y, &b.w, n, v, block)?);
        assert_close(&format!("{what}: grad"), &grad, &grad_cpu, v, &[], grad_rtol::<S>());
        assert_masked_rows_zero(&what, &grad, &b.w, v);
        Ok(())
    }
    for (seed, n, v) in [(8, 8, 37), (9, 5, 300)] {
        let b = batch(seed, n, v);
        let mut y = targets(seed, n, v);
        // Row 0 (logits of +-1e4) takes its largest logit as the target: a loss near 0
        // beside logits of 1e4. Row 5, if any, keeps a random one: a loss near 1e4.
        y[0] = (0..v).max_by(|&i, &j| b.s[i].total_cmp(&b.s[j])).unwrap() as u32;
        // Row 1's -inf columns are no targets (the loss would be +inf).
        if (y[1] as usize) % 32 == 2 || y[1] == 4 {
            y[1] += 1;
        }
        check::<f32>(&b, &y)?;
        check::<f16>(&b, &y)?;
        check::<bf16>(&b, &y)?;
        check::<f64>(&b, &y)?;
    }
    Ok(())
}

/// A target outside [0, V) makes the forward's row NaN and sets `bad` to u32::MAX minus
/// the first such row (the smallest, whatever order the blocks run in); loss/cuda.rs
/// turns that into an error naming the row, as the CPU op errs. The backward gives such
/// a row the softmax with no -1 (the CPU kernel's rule).
#[test]
fn out_of_vocabulary_targets_set_the_bad_flag_to_the_first_bad_row() -> TestResult {
    let (n, v) = (9, 37);
    let b = batch(10, n, v);
    let block = emu::launch_block(v);
    let good = targets(10, n, v);
    let mut y = good.clone();
    y[4] = v as u32; // just past the end
    y[6] = u32::MAX;
    y[8] = v as u32 + 5;
    let fwd = emu::ce_fwd(&b.s, &y, n, v, block)?;
    assert_eq!(fwd.bad, u32::MAX - 4, "bad flag");
    assert_eq!(fwd.first_bad_row(), Some(4));
    // The CPU op refuses the batch (the error loss/cuda.rs raises from the flag).
    let yt = Tensor::from_slice(&y, n, &Device::Cpu)?;
    let st = Tensor::from_slice(&b.s, (n, v), &Device::Cpu)?;
    let err = cross_entropy_rows(&st, &yt)
        .err()
        .ok_or("the CPU op accepted an out-of-vocabulary target")?;
    assert!(err.to_string().contains("row 4"), "CPU error: {err}");
    // Bad rows are NaN; the others are the CPU op's values with the good targets.
    let (rows_cpu, grad_cpu) = cpu_cross_entropy(&b.s, &good, &b.w, (n, v))?;
    for r in 0..n {
        if [4, 6, 8].contains(&r) {
            assert!(fwd.out[r].is_nan(), "row {r}: {}", fwd.out[r]);
        } else {
            assert_close(&format!("CE row {r}"), &fwd.out[r..=r], &rows_cpu[r..=r], 1, &[], RTOL);
        }
    }
    // Backward: a bad row's gradient is the good target's plus w at that target (no -1).
    let grad = emu::ce_bwd(&b.s, &y, &b.w, n, v, block)?;
    let mut want = grad_cpu.clone();
    for r in [4, 6, 8] {
        want[r * v + good[r] as usize] += b.w[r];
    }
    assert_close("CE grad with bad targets", &grad, &want, v, &[], RTOL);
    // A clean batch leaves the flag at 0.
    assert_eq!(emu::ce_fwd(&b.s, &good, n, v, block)?.first_bad_row(), None);
    Ok(())
}

// ---------------------------------------------------------------------------
// Top-k teachers
// ---------------------------------------------------------------------------

/// The teacher's top k of a batch at `temp` (`top_k_of_logits`, as the online teacher and
/// the logit cache give it): (indices (n, k), log_probs (n, k)) as vectors.
fn top_k(b: &Batch, k: usize, temp: f64) -> Result<(Vec<u32>, Vec<f32>), Box<dyn Error>> {
    let t = Tensor::from_slice(&b.t, (b.n, b.v), &Device::Cpu)?;
    let top = top_k_of_logits(&t, k, temp)?;
    Ok((
        top.indices.flatten_all()?.to_vec1::<u32>()?,
        top.log_probs.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The CPU op `top_k_divergence_rows`.
fn cpu_top_k<S: WithDType>(b: &Batch, s: &[S], (idx, lp): (&[u32], &[f32]), d: Divergence, temp: f64) -> Rows {
    let k = idx.len() / b.n;
    let top = TopK {
        indices: Tensor::from_slice(idx, (b.n, k), &Device::Cpu)?,
        log_probs: Tensor::from_slice(lp, (b.n, k), &Device::Cpu)?,
    };
    rows_and_grad(s, (b.n, b.v), &b.w, |s| top_k_divergence_rows(s, &top, d, temp))
}

/// The emulated distill_topk_fwd_<s> and distill_topk_bwd_<s>, checked to flag nothing.
fn emu_top_k<S: Elem + WithDType>(
    b: &Batch,
    s: &[S],
    (idx, lp): (&[u32], &[f32]),
    d: Divergence,
    temp: f64,
    block: u32,
) -> Rows {
    let (p, dims) = (Params::new(d, temp), (b.n, b.v, idx.len() / b.n));
    let fwd = emu::topk_fwd(s, idx, lp, dims, p, block)?;
    let bwd = emu::topk_bwd(s, idx, lp, &b.w, dims, p, block)?;
    assert_eq!(
        (fwd.first_bad_row(), bwd.first_bad_row()),
        (None, None),
        "{d}: bad row flagged"
    );
    Ok((fwd.out, widen(&bwd.out)))
}

fn check_top_k<S: Elem + WithDType>(
    b: &Batch,
    k: usize,
    divergences: &[Divergence],
    temp: f64,
    block: u32,
) -> TestResult {
    let (idx, lp) = top_k(b, k, temp)?;
    let s = cast::<S>(&b.s);
    for &d in divergences {
        let what = format!("top-{k} {d} {} ({}, {}) T={temp} block {block}", S::NAME, b.n, b.v);
        let cpu = cpu_top_k(b, &s, (&idx, &lp), d, temp)?;
        let emu = emu_top_k(b, &s, (&idx, &lp), d, temp, block)?;
        assert_emu_matches_cpu::<S>(&what, b, emu, cpu);
    }
    Ok(())
}

#[test]
fn top_k_kernels_match_the_cpu_op_in_values_and_gradients() -> TestResult {
    let b = batch(12, 6, 37);
    let block = emu::launch_block(b.v);
    // Each divergence code with a tail (the formulas themselves are the full kernels',
    // checked above); then k = V (an empty tail on both sides).
    let codes = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.25 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::Tvd,
    ];
    check_top_k::<f32>(&b, 5, &codes, 2.5, block)?;
    check_top_k::<f32>(&b, 5, &CODE_PATHS[..1], 1.0, block)?;
    check_top_k::<f32>(&b, b.v, &CODE_PATHS[1..3], 2.5, block)?;
    // The other students.
    check_top_k::<bf16>(&b, 5, &CODE_PATHS[2..3], 2.5, block)?;
    check_top_k::<f16>(&b, 5, &CODE_PATHS[2..3], 2.5, block)?;
    check_top_k::<f64>(&b, 5, &CODE_PATHS[2..3], 2.5, block)?;
    // A longer row, the block launch_config picks for it, and a block of 256.
    let b = batch(13, 3, 300);
    check_top_k::<f32>(&b, 20, &CODE_PATHS[2..], 2.5, emu::launch_block(b.v))?;
    check_top_k::<f32>(&b, 20, &CODE_PATHS[2..3], 2.5, 256)?;
    Ok(())
}

/// A bad teacher row (an id outside the vocabulary or listed twice, a log-probability
/// above 0 or NaN, probabilities summing past 1) makes the forward's row NaN, the
/// backward's row zeros, and sets `bad` to u32::MAX minus the first bad row; loss/cuda.rs
/// then asks the CPU's check for the message. A masked row is not checked in the
/// backward, as on the CPU.
#[test]
fn bad_top_k_teacher_rows_set_the_bad_flag() -> TestResult {
    let (n, v, k) = (8, 37, 4);
    let mut b = batch(14, n, v);
    b.w[1] = 0.0; // bad and masked: the backward neither checks nor flags it
    let temp = 2.0;
    let (good_idx, good_lp) = top_k(&b, k, temp)?;
    let (mut idx, mut lp) = (good_idx.clone(), good_lp.clone());
    idx[k] = v as u32; // row 1: outside the vocabulary
    idx[2 * k + 1] = idx[2 * k]; // row 2: listed twice
    lp[4 * k] = 0.5; // row 4: a positive log-probability
    lp[5 * k + 2] = f32::NAN; // row 5: NaN
    lp[6 * k..7 * k].fill(-0.5); // row 6: probabilities summing to 4 e^-0.5 = 2.4
    let bad_rows = [1, 2, 4, 5, 6];
    let s = b.s.clone();
    let p = Params::new(Divergence::ForwardKl, temp);
    let fwd = emu::topk_fwd(&s, &idx, &lp, (n, v, k), p, emu::launch_block(v))?;
    assert_eq!(fwd.first_bad_row(), Some(1), "forward flag");
    let bwd = emu::topk_bwd(&s, &idx, &lp, &b.w, (n, v, k), p, emu::launch_block(v))?;
    assert_eq!(bwd.first_bad_row(), Some(2), "backward flag: row 1 is masked");
    // Good rows: the CPU op on the uncorrupted teacher. Bad rows: NaN, zeros.
    let (rows_cpu, grad_cpu) = cpu_top_k(&b, &s, (&good_idx, &good_lp), Divergence::ForwardKl, temp)?;
    for r in 0..n {
        let (got, want) = (&bwd.out[r * v..(r + 1) * v], &grad_cpu[r * v..(r + 1) * v]);
        if bad_rows.contains(&r) {
            assert!(fwd.out[r].is_nan(), "bad row {r}: loss {}", fwd.out[r]);
            assert!(got.iter().all(|x| *x == 0.0), "bad row {r}: gradient {got:?}");
        } else {
            assert_close(
                &format!("top-k row {r}"),
                &fwd.out[r..=r],
                &rows_cpu[r..=r],
                1,
                &[],
                RTOL,
            );
            assert_close(&format!("top-k grad row {r}"), got, want, v, &[], RTOL);
        }
    }
    // The CPU op refuses the corrupted teacher, naming the first bad row.
    let top = TopK {
        indices: Tensor::from_slice(&idx, (n, k), &Device::Cpu)?,
        log_probs: Tensor::from_slice(&lp, (n, k), &Device::Cpu)?,
    };
    let st = Tensor::from_slice(&s, (n, v), &Device::Cpu)?;
    let err = top_k_divergence_rows(&st, &top, Divergence::ForwardKl, temp)
        .err()
        .ok_or("the CPU op accepted bad top-k rows")?;
    assert!(err.to_string().contains("row 1"), "CPU error: {err}");
    Ok(())
}

// ---------------------------------------------------------------------------
// The emulator itself
// ---------------------------------------------------------------------------

/// f16 conversions against the `half` crate, which the CPU ops use: every f16 value
/// widened, and f32 values at and beside every rounding boundary narrowed.
#[test]
fn f16_conversions_match_the_half_crate() {
    for h in 0..=u16::MAX {
        let want = f16::from_bits(h).to_f32();
        let got = emu::f16_bits_to_f32(h);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "f16 {h:#06x}: {got} vs {want}"
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for exp in 0..=255u32 {
        // Mantissas at and beside the halfway points of every rounding position (bit 12
        // for normal results, higher bits for subnormal ones), and random ones.
        let mut mans: Vec<u32> = vec![0, 1, 0x7f_ffff, 0x40_0000];
        for shift in 12..23 {
            let half = 1u32 << shift;
            mans.extend([half, half - 1, half + 1, half | (half << 1), (half << 1) - 1]);
        }
        mans.extend((0..40).map(|_| rng.random_range(0..0x80_0000u32)));
        for man in mans {
            for sign in [0u32, 1 << 31] {
                let x = f32::from_bits(sign | (exp << 23) | (man & 0x7f_ffff));
                let want = f16::from_f32(x);
                let got = emu::f32_to_f16_bits(x);
                assert!(
                    got == want.to_bits() || (want.is_nan() && f16::from_bits(got).is_nan()),
                    "f32 {x:e} ({:#010x}): {got:#06x} vs half {:#06x}",
                    x.to_bits(),
                    want.to_bits()
                );
            }
        }
    }
}

#[test]
fn shuffles_and_dynamic_shared_memory_give_cuda_results() -> TestResult {
    let (grid, block) = (2u32, 64u32);
    let out = emu::self_test(emu::SelfTest::Shuffles, grid, block)?;
    for id in 0..(grid * block) as usize {
        let (lane, warp_start) = (id % 32, id - id % 32);
        let warp_sum: usize = (warp_start + 1..=warp_start + 32).sum();
        let got = &out[4 * id..4 * id + 4];
        assert_eq!(got[0], warp_sum as f32, "thread {id}: xor butterfly sum");
        let next = if lane == 31 { id + 1 } else { id + 2 };
        assert_eq!(got[1], next as f32, "thread {id}: __shfl_down_sync");
        assert_eq!(got[2], (warp_start + 1) as f32, "thread {id}: __shfl_sync from lane 0");
        assert_eq!(got[3], 1.0, "thread {id}: __ballot_sync");
    }
    let out = emu::self_test(emu::SelfTest::DynamicShared, 1, 96)?;
    for t in 0..96 {
        assert!(
            out[2 * t].is_nan(),
            "thread {t}: fresh dynamic shared memory reads {}",
            out[2 * t]
        );
        assert_eq!(
            out[2 * t + 1],
            (95 - t) as f32,
            "thread {t}: value from the mirror thread"
        );
    }
    Ok(())
}

/// Barrier misuse that hangs or corrupts a GPU run must be an error here, not a hang.
#[test]
fn barrier_misuse_is_an_error_not_a_hang() {
    match emu::self_test(emu::SelfTest::DivergentBarrier, 2, 64) {
        Err(emu::Error::Launch(m)) => assert!(m.contains("__syncthreads"), "{m}"),
        other => panic!("a __syncthreads() skipped by warp 0 was not reported: {other:?}"),
    }
    match emu::self_test(emu::SelfTest::SplitWarp, 1, 32) {
        Err(emu::Error::Launch(m)) => assert!(m.contains("deadlock"), "{m}"),
        other => panic!("half a warp shuffling against a barrier was not reported: {other:?}"),
    }
    // The emulator still works after a failed launch.
    assert!(emu::self_test(emu::SelfTest::Shuffles, 1, 32).is_ok());
}

#[test]
fn bad_launch_arguments_are_rejected_before_launching() {
    let s = vec![0f32; 2 * 37];
    let p = Params::new(Divergence::ForwardKl, 1.0);
    for block in [0, 16, 48, 2048] {
        assert!(
            matches!(emu::div_fwd(&s, &s, 2, 37, p, block), Err(emu::Error::Invalid(_))),
            "block {block} accepted"
        );
    }
    assert!(matches!(
        emu::div_fwd(&s, &s[1..], 2, 37, p, 32),
        Err(emu::Error::Invalid(_))
    ));
    assert!(matches!(
        emu::div_bwd(&s, &s, &[1.0], 2, 37, p, 32),
        Err(emu::Error::Invalid(_))
    ));
    assert!(matches!(
        emu::ce_fwd(&s, &[0, 1, 2], 2, 37, 32),
        Err(emu::Error::Invalid(_))
    ));
    let (idx, lp) = (vec![0u32; 2 * 38], vec![0f32; 2 * 38]);
    assert!(
        matches!(
            emu::topk_fwd(&s, &idx, &lp, (2, 37, 38), p, 32),
            Err(emu::Error::Invalid(_))
        ),
        "k > V accepted"
    );
    // No rows: nothing to launch (CUDA rejects an empty grid; loss/cuda.rs skips it).
    assert_eq!(
        emu::div_fwd::<f32, f32>(&[], &[], 0, 37, p, 32).unwrap(),
        Vec::<f32>::new()
    );
}
