//! The CPU building blocks every fused kernel uses: contiguous slices of candle
//! storages, the vectorisable `exp_f32` and `ln(1 + y)`, lane-parallel max and sum, the
//! streaming log-sum-exp, and the AVX2 and AVX-512 dispatch. A leaf: nothing of the
//! crate's but the error type.
//!
//! Every loop over a row is written so that LLVM can vectorise it without being
//! allowed to reassociate floating point: sums go into LANES independent accumulators
//! (added up in a fixed order at the end), branches are selects, and exp/log are the
//! branch-free polynomials below instead of libm calls (which stay scalar). The
//! summation order differs from candle's sequential sums, which is why parity with
//! the plain references is checked to a tolerance, not bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};

/// The contiguous part of a storage that a layout covers.
pub(crate) fn contiguous_slice<'a, E>(
    data: &'a [E],
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [E]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }.bt()),
    }
}

/// Binds `$x` to the contiguous slice of a float storage and evaluates `$body` once per
/// element type, so that the kernels below are monomorphised per dtype.
macro_rules! with_float_slice {
    ($op:expr, $storage:expr, $layout:expr, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(data) => {
                let $x = $crate::kernels::cpu::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::F16(data) => {
                let $x = $crate::kernels::cpu::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::BF16(data) => {
                let $x = $crate::kernels::cpu::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::F64(data) => {
                let $x = $crate::kernels::cpu::contiguous_slice(data, $layout, $op)?;
                $body
            }
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), $op).bt()),
        }
    };
}
pub(crate) use with_float_slice;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(data) => contiguous_slice(data, l, op),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    }
}

pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(data) => contiguous_slice(data, l, op),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    }
}

/// Independent accumulators per row loop; 16 f32 fill an AVX-512 register, and
/// narrower targets split them.
pub(crate) const LANES: usize = 16;

/// Elements per block of the streaming log-sum-exp: two blocks of f32 (student and
/// teacher) stay in L1 between the max and the sum.
pub(crate) const BLOCK: usize = 512;

/// Loads one element as f32 (exact for f16 and bf16; rounds f64; free for f32).
#[inline(always)]
pub(crate) fn ld<E: WithDType>(x: E) -> f32 {
    x.to_f64() as f32
}

/// `exp(x)` in f32 without a libm call, so that loops calling it vectorise.
///
/// Cephes' `expf`: `x = n ln2 + r`, |r| <= ln2/2, `exp(r)` by a degree-6 polynomial,
/// `2^n` built in the exponent bits. Relative error about 1 ulp on [-87.3, 88]
/// (checked against f64 in the tests). Below -87.33 (where f32 would go subnormal) it
/// returns exactly 0, so `exp(-inf) = 0` and the `0 log 0` guards see a true zero; above
/// 88 it returns +inf (our arguments are <= 0 up to rounding); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits, with no
    // rounding instruction (SSE2 has none for packed floats).
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_55, 88.0);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER; // round(x / ln 2), in [-126, 127]
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes lists 5.0000001201e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    // Integer n sits in t's mantissa; (n + 127) << 23 is 2^n as an f32.
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let two_n = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    let e = er * two_n;
    if x < -87.336_55 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        e
    }
}

/// `ln(1 + y)` for y in [0, 1] (the range `log_add_exp` needs), without libm.
///
/// Cephes' `logf` polynomial on `ln(1 + x)`, |x| <= sqrt(2) - 1: for y above that,
/// `1 + y = 2 (1 + x)` with `x = (y - 1) / 2`. Both reductions are exact, so small y
/// keep full relative precision (no `1 + y` rounding). About 1 ulp; NaN stays NaN.
#[inline(always)]
pub(crate) fn ln_1p_unit(y: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let big = y > std::f32::consts::SQRT_2 - 1.0;
    let x = if big { (y - 1.0) * 0.5 } else { y };
    let e = if big { 1.0 } else { 0.0 };
    let z = x * x;
    let mut p = 7.037_683_6e-2;
    p = p * x - 1.151_461e-1;
    p = p * x + 1.167_699_9e-1;
    p = p * x - 1.242_014_1e-1;
    p = p * x + 1.424_932_3e-1;
    p = p * x - 1.666_805_8e-1;
    p = p * x + 2.000_071_4e-1;
    p = p * x - 2.499_999_4e-1;
    p = p * x + 3.333_333e-1;
    let tail = p * x * z + e * LN2_LO - 0.5 * z;
    x + tail + e * LN2_HI
}

/// Largest element, NaN ignored (NaN is caught by the sum that follows).
#[inline(always)]
pub(crate) fn lanes_max(xs: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    rest.iter()
        .fold(m.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)), |a, b| a.max(*b))
}

/// A function of one element pair, summed or written by the row loops. The method is
/// `#[inline(always)]`: closures of this size are not inlined into the loops, and a
/// call per element stops them from vectorising (measured: 8x slower for JSD).
pub(crate) trait PairFn<A, B>: Copy {
    fn at(self, a: A, b: B) -> f32;
}

/// `sum_j f(a_j, b_j)` in LANES accumulators.
#[inline(always)]
pub(crate) fn lanes_sum<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl PairFn<A, B>) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f.at(xa[l], xb[l]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (&x, &y) in ra.iter().zip(rb) {
        total += f.at(x, y);
    }
    total
}

/// `exp(x - max)`, the terms of a log-sum-exp (the second argument is unused).
#[derive(Clone, Copy)]
pub(crate) struct ExpShifted {
    max: f32,
}

impl PairFn<f32, f32> for ExpShifted {
    #[inline(always)]
    fn at(self, x: f32, _: f32) -> f32 {
        exp_f32(x - self.max)
    }
}

/// Streaming log-sum-exp of one side of a row, fed block by block: the running sum
/// of exp(x - max) is rescaled once per block whose max is larger, so each element
/// costs one exp and the row is read once.
#[derive(Clone, Copy)]
pub(crate) struct OnlineLse {
    pub(crate) max: f32,
    pub(crate) sum: f32,
}

impl OnlineLse {
    #[inline(always)]
    pub(crate) fn new() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Adds a block of temperature-scaled logits.
    #[inline(always)]
    pub(crate) fn push_block(&mut self, xs: &[f32]) {
        let m = lanes_max(xs);
        if m > self.max {
            self.sum *= exp_f32(self.max - m); // 0 while the max was -inf
            self.max = m;
        }
        if self.max == f32::NEG_INFINITY {
            return; // all -inf so far: they add exp(-inf) = 0, and -inf - -inf would be NaN
        }
        self.sum += lanes_sum(xs, xs, ExpShifted { max: self.max });
    }

    /// `log p_j = (x_j - max) - log(sum)`: subtracting the max first keeps the
    /// log-probabilities exact near the max even for logits like 1e4 (the same order
    /// of operations as the max-shifted log-softmax in `loss::family`).
    #[inline(always)]
    pub(crate) fn finish(self) -> LogNorm {
        LogNorm {
            max: self.max,
            log_sum: self.sum.ln(),
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct LogNorm {
    pub(crate) max: f32,
    pub(crate) log_sum: f32,
}

impl LogNorm {
    #[inline(always)]
    pub(crate) fn log_prob(self, x: f32) -> f32 {
        (x - self.max) - self.log_sum
    }

    /// Normaliser of `inv_t * x` over a row: one streaming pass.
    #[inline(always)]
    pub(crate) fn of_row<S: WithDType>(s: &[S], inv_t: f32) -> Self {
        let mut lse = OnlineLse::new();
        let mut buf = [0f32; BLOCK];
        for block in s.chunks(BLOCK) {
            let buf = &mut buf[..block.len()];
            buf.iter_mut().zip(block).for_each(|(b, &x)| *b = ld(x) * inv_t);
            lse.push_block(buf);
        }
        lse.finish()
    }
}

/// Which instruction set the row kernels run with, chosen once per op call.
#[derive(Clone, Copy)]
pub(crate) struct Isa {
    pub(crate) avx2: bool,
    /// AVX-512F: only the kernels of `avx512_dispatch` use it.
    pub(crate) avx512: bool,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        let (avx2, avx512) = (
            std::arch::is_x86_feature_detected!("avx2"),
            std::arch::is_x86_feature_detected!("avx512f"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2, avx512) = (false, false);
        Self { avx2, avx512 }
    }

    /// The build's baseline only: what the dispatched kernels are tested against.
    #[cfg(test)]
    pub(crate) fn baseline() -> Self {
        Self {
            avx2: false,
            avx512: false,
        }
    }
}

/// Defines `$name(isa, args..)`, which runs the `#[inline(always)]` row kernel `$kernel`
/// compiled for AVX2 (8 lanes) when the CPU has it, else for the build's baseline
/// (SSE2, 4 lanes, on x86-64). Both compute the same LANES accumulators in the same
/// order, so they agree bit for bit (tested).
macro_rules! avx2_dispatch {
    ($name:ident, $avx2:ident, $kernel:ident, <$($g:ident),*>, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn $avx2<$($g: WithDType),*>($($arg: $ty),*) -> $ret {
            $kernel($($arg),*)
        }

        pub(crate) fn $name<$($g: WithDType),*>(isa: Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if isa.avx2 {
                // SAFETY: `isa.avx2` is true only when `Isa::detect` found AVX2 on this CPU.
                return unsafe { $avx2($($arg),*) };
            }
            let _ = isa;
            $kernel($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// `avx2_dispatch` with an AVX-512F build in front, for the decode kernels that are
/// bound by arithmetic rather than by memory: LANES = 16 is one zmm register, so the
/// build does the same operations in the same order, a register at a time, and agrees
/// with the others bit for bit (no fused multiply-add: Rust never contracts `a * b + c`).
macro_rules! avx512_dispatch {
    ($name:ident, $avx512:ident, $avx2:ident, $kernel:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $kernel($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $kernel($($arg),*)
        }

        pub(crate) fn $name(isa: Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if isa.avx512 {
                    // SAFETY: `isa.avx512` is true only when `Isa::detect` found AVX-512F.
                    return unsafe { $avx512($($arg),*) };
                }
                if isa.avx2 {
                    // SAFETY: `isa.avx2` is true only when `Isa::detect` found AVX2.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            let _ = isa;
            $kernel($($arg),*)
        }
    };
}
pub(crate) use avx512_dispatch;

/// Runs `f` on the f32 contents of a CPU tensor, made contiguous first (a no-op when
/// it already is).
pub(crate) fn with_cpu_f32<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Ok(f(contiguous_slice(data, layout, op)?)),
        Storage::Cpu(other) => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
        _ => Err(candle_core::Error::Msg(format!("{op}: the fused kernels run on the CPU only")).bt()),
    }
}
