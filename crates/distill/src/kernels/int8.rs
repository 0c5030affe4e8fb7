//! Matmuls by 8-bit weights, for a model that only runs forward (a teacher that
//! samples or scores), fused for the CPU, and beside them the plain composition they
//! are tested against.
//!
//! A weight (o, i) is stored as int8 values and one f32 scale per block of 32 along
//! the input, the scheme of ggml's Q8_0 (which keeps the scale in f16): the weight
//! stands for `scale * q`, and takes 1.125 bytes where f32 takes 4. Decoding a token is
//! bound by reading the weights, so it reads a quarter of the bytes.
//!
//! The activations stay f32: a weight row is widened to `scale * q` (in L1) and
//! multiplied by the f32 inputs, so the only rounding is the weights' own. The dot is
//! the dense few-row kernel's (`decode::linear_rows`), so for a few rows the result is
//! bit for bit the dense linear on the dequantized weights, and a row's result does not
//! depend on the other rows. More rows (a prefill) widen the whole weight once and go
//! through the dense gemm, as the dense linear does: compute-bound, they gain nothing
//! from reading fewer bytes.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::cpu::{avx2_dispatch, with_cpu_f32, Isa, LANES};
use crate::kernels::decode::{rows_per_task, task_dots, SKINNY_ROWS};
use crate::kernels::ops;

/// Weights per scale, along the input.
pub const BLOCK: usize = 32;

/// An (o, i) weight as int8 values and one f32 scale per block of `BLOCK` inputs.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    out_features: usize,
    in_features: usize,
    /// (o, i) row-major.
    q: Vec<i8>,
    /// (o, i / BLOCK) row-major.
    scales: Vec<f32>,
}

impl Int8Weight {
    /// Round to nearest per block: scale = max |w| / 127, q = round(w / scale) (a block of
    /// zeros gets scale 0). `w` is (o, i) f32 with i a multiple of `BLOCK`.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        if i % BLOCK != 0 {
            return Err(Error::Shape(format!(
                "int8 weight: input width {i} is not a multiple of the {BLOCK}-weight block"
            )));
        }
        let data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut q = vec![0i8; o * i];
        let mut scales = vec![0f32; o * i / BLOCK];
        let rows = q
            .par_chunks_mut(i)
            .zip(scales.par_chunks_mut(i / BLOCK))
            .zip(data.par_chunks(i));
        rows.for_each(|((q, scales), data)| {
            for ((block, qb), s) in data.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(scales) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *s = amax / 127.0;
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                for (qv, v) in qb.iter_mut().zip(block) {
                    *qv = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        });
        Ok(Self {
            out_features: o,
            in_features: i,
            q,
            scales,
        })
    }

    /// The f32 weight (o, i) it stands for: `scale * q`, the values every matmul uses.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.widen(),
            (self.out_features, self.in_features),
            device,
        )?)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Bytes held: the int8 values and the scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    fn widen(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.q.len()];
        for ((wb, qb), &s) in w
            .chunks_exact_mut(BLOCK)
            .zip(self.q.chunks_exact(BLOCK))
            .zip(&self.scales)
        {
            widen_block(qb, s, wb);
        }
        w
    }
}

#[inline(always)]
fn widen_block(q: &[i8], scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(q) {
        *o = scale * v as f32;
    }
}

/// y (..., o) = x (..., i) @ W^T for an int8 weight W, x f32 on the CPU.
pub fn linear(x: &Tensor, w: &Int8Weight) -> Result<Tensor> {
    let (o, i) = w.dims();
    let mut shape = x.dims().to_vec();
    if shape.last() != Some(&i) {
        return Err(Error::Shape(format!(
            "int8 linear: input {shape:?} does not end in the weight's {i} input features"
        )));
    }
    let n = x.elem_count() / i;
    let y = with_cpu_f32(x, "int8 linear", |x| -> Result<Vec<f32>> {
        if n > SKINNY_ROWS {
            return Ok(ops::linear_fwd(x, &w.widen(), (n, o, i))?);
        }
        Ok(linear_rows(x, w))
    })??;
    *shape.last_mut().unwrap_or(&mut 0) = o;
    Ok(Tensor::from_vec(y, shape, x.device())?)
}

/// The plain composition: the dequantized weight through candle's matmul.
pub fn linear_plain(x: &Tensor, w: &Int8Weight) -> Result<Tensor> {
    ops::linear_plain(x, &w.dequantize(x.device())?)
}

/// y (n, o) for a few rows x (n, i), reading each weight row once (tasks own up to 64
/// weight rows), as `decode::linear_rows` does for a dense weight: one row of x widens in
/// registers; more rows widen each weight row to f32 once and dot it with every row.
fn linear_rows(x: &[f32], w: &Int8Weight) -> Vec<f32> {
    let ((o, i), n, isa) = (w.dims(), x.len() / w.in_features, Isa::detect());
    let chunk = rows_per_task(o);
    let blocks = i / BLOCK;
    let mut yt = vec![0f32; o * n]; // (o, n)
    yt.par_chunks_mut(n * chunk).enumerate().for_each(|(c, out)| {
        let mut row_f32 = vec![0f32; if n > 1 { i } else { 0 }];
        for (j, y) in out.chunks_mut(n).enumerate() {
            let row = c * chunk + j;
            let (q, scales) = (&w.q[row * i..][..i], &w.scales[row * blocks..][..blocks]);
            if n == 1 {
                y[0] = dot_int8(isa, x, q, scales);
            } else {
                widen_row(isa, q, scales, &mut row_f32);
                task_dots(isa, x, &row_f32, i, y);
            }
        }
    });
    let mut y = vec![0f32; n * o];
    for (j, col) in yt.chunks(n).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * o + j] = v;
        }
    }
    y
}

/// x . (scale * q) for one row of x, widening in registers: the products and sums of
/// `decode::linear_rows`'s dot on the widened row, in its order, so the same bits.
#[inline(always)]
fn dot_int8_kernel(x: &[f32], q: &[i8], scales: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for ((xb, qb), &s) in x.chunks_exact(BLOCK).zip(q.chunks_exact(BLOCK)).zip(scales) {
        for (xc, qc) in xb.chunks_exact(LANES).zip(qb.chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] += xc[l] * (s * qc[l] as f32);
            }
        }
    }
    let tail: f32 = std::iter::empty::<f32>().sum(); // the dot's empty remainder (BLOCK is a multiple of LANES)
    acc.iter().sum::<f32>() + tail
}
avx2_dispatch!(dot_int8, dot_int8_avx2, dot_int8_kernel, <>, (x: &[f32], q: &[i8], scales: &[f32]) -> f32);

#[inline(always)]
fn widen_row_kernel(q: &[i8], scales: &[f32], out: &mut [f32]) {
    for ((ob, qb), &s) in out.chunks_exact_mut(BLOCK).zip(q.chunks_exact(BLOCK)).zip(scales) {
        widen_block(qb, s, ob);
    }
}
avx2_dispatch!(widen_row, widen_row_avx2, widen_row_kernel, <>, (q: &[i8], scales: &[f32], out: &mut [f32]) -> ());

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(n: usize, shape: &[usize], seed: u32) -> Tensor {
        let v: Vec<f32> = (0..n as u32)
            .map(|k| ((k.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape")
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().expect("flat").to_vec1().expect("f32");
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn quantization_keeps_each_weight_within_half_a_step() -> Result<()> {
        let w = tensor(70 * 96, &[70, 96], 3);
        let q = Int8Weight::quantize(&w)?;
        let back: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let orig: Vec<f32> = w.flatten_all()?.to_vec1()?;
        for ((b, o), s) in back.chunks(BLOCK).zip(orig.chunks(BLOCK)).zip(&q.scales) {
            let amax = o.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(*s, amax / 127.0);
            for (x, y) in b.iter().zip(o) {
                assert!((x - y).abs() <= s / 2.0 * 1.0001, "{x} vs {y}, scale {s}");
            }
        }
        assert_eq!(q.bytes(), 70 * 96 + 4 * 70 * 3);
        let zeros = Int8Weight::quantize(&Tensor::zeros((2, 32), DType::F32, &Device::Cpu)?)?;
        assert!(zeros.widen().iter().all(|v| *v == 0.0));
        assert!(Int8Weight::quantize(&tensor(40, &[2, 20], 1)).is_err());
        Ok(())
    }

    /// The fused op is the dense fused linear on the dequantized weight, bit for bit (few
    /// rows and gemm rows); a decode row alone gives the same bits as in a batch; both
    /// stay within float rounding of the plain composition.
    #[test]
    fn fused_int8_linear_is_the_dense_linear_of_the_dequantized_weight() -> Result<()> {
        let w = Int8Weight::quantize(&tensor(200 * 64, &[200, 64], 5))?;
        let dense = w.dequantize(&Device::Cpu)?;
        for n in [1, 3, SKINNY_ROWS, SKINNY_ROWS + 5, 150] {
            let x = tensor(n * 64, &[1, n, 64], n as u32);
            let got = linear(&x, &w)?;
            let plain = linear_plain(&x, &w)?;
            let diff = (&got - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "n = {n}: {diff}");
            assert_eq!(bits(&got), bits(&ops::linear(&x, &dense)?), "n = {n}");
            if n <= SKINNY_ROWS {
                let alone = linear(&x.narrow(1, n - 1, 1)?, &w)?;
                assert_eq!(bits(&alone), bits(&got.narrow(1, n - 1, 1)?), "n = {n}");
            }
        }
        Ok(())
    }
}
