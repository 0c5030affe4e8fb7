//! Attention of new tokens over a slotted KV cache: the decode step of the rollout
//! engine (`model::generate`), fused for the CPU in f32 and beside it the plain candle
//! composition that every device runs and that the fused kernel is tested against.
//!
//! The cache of one layer is two tensors of (slots * max_len, Hkv * D) rows: row
//! `slot * max_len + j` holds the key (or value) of position j of the sequence that
//! occupies `slot`. Each query r names its slot and its position `pos[r]`, and attends
//! the keys 0..=pos[r] of that slot. A prompt being prefilled is T queries of one slot
//! at positions 0..T; a sequence being decoded is one query at its current length. Both
//! go through the same call, so a step may mix them (continuous batching).
//!
//! Each (query, head) pair is computed on its own, with a sequential sum over its keys,
//! so a query's output does not depend on which other queries share the call.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::cpu::{avx512_dispatch, exp_f32, lanes_max, with_cpu_f32, Isa, LANES};

/// Where the queries of one call read: query r attends keys 0..=pos[r] of slot slot[r].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRows {
    pub slot: Vec<usize>,
    pub pos: Vec<usize>,
    /// Positions per slot in the cache tensors.
    pub max_len: usize,
}

impl CacheRows {
    pub fn len(&self) -> usize {
        self.slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot.is_empty()
    }

    /// The cache row that query r's own key and value are written to.
    pub fn row(&self, r: usize) -> usize {
        self.slot[r] * self.max_len + self.pos[r]
    }
}

/// The sizes of one call: queries (n, h, d), cache (slots * max_len, hkv * d).
fn dims(q: &Tensor, k: &Tensor, v: &Tensor, rows: &CacheRows) -> Result<(usize, usize, usize, usize)> {
    let (n, h, d) = q.dims3()?;
    let (cache_rows, width) = k.dims2()?;
    let bad = n != rows.len()
        || v.dims() != k.dims()
        || d == 0
        || width % d != 0
        || h % (width / d).max(1) != 0
        || cache_rows % rows.max_len.max(1) != 0
        || rows.pos.len() != n
        || rows
            .slot
            .iter()
            .zip(&rows.pos)
            .any(|(&s, &p)| p >= rows.max_len || s * rows.max_len >= cache_rows);
    if bad {
        return Err(Error::Shape(format!(
            "decode attention: queries {:?}, cache {:?} / {:?}, {} query rows of slots {:?} at positions {:?} \
             (max_len {})",
            q.dims(),
            k.dims(),
            v.dims(),
            rows.len(),
            rows.slot,
            rows.pos,
            rows.max_len
        )));
    }
    Ok((n, h, d, width / d))
}

/// softmax(q k^T * scale) v of each query over its slot's keys 0..=pos, fused: f32 on the
/// CPU. q (n, H, D); k and v the layer's cache (slots * max_len, Hkv * D). Returns
/// (n, H, D).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, rows: &CacheRows, scale: f32) -> Result<Tensor> {
    let (n, h, d, hkv) = dims(q, k, v, rows)?;
    let group = h / hkv;
    let out = with_cpu_f32(q, "decode-attention", |q| {
        with_cpu_f32(k, "decode-attention", |k| {
            with_cpu_f32(v, "decode-attention", |v| {
                let isa = Isa::detect();
                let mut out = vec![0f32; n * h * d];
                out.par_chunks_mut(d).enumerate().for_each(|(rh, o)| {
                    let (r, head) = (rh / h, rh % h);
                    // Key j of this head is k[first + j * hkv * d..][..d], its value in v.
                    let first = rows.slot[r] * rows.max_len * hkv * d + (head / group) * d;
                    let kv = HeadKv {
                        keys: &k[first..],
                        values: &v[first..],
                        stride: hkv * d,
                    };
                    one_query(isa, &q[rh * d..][..d], kv, rows.pos[r] + 1, scale, o);
                });
                out
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (n, h, d), q.device())?)
}

/// Where one (query, head) reads the cache: key j is `keys[j * stride..]` and its value
/// `values[j * stride..]`, the query's length each.
#[derive(Clone, Copy)]
pub(crate) struct HeadKv<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
}

/// One (query, head): scores over the first `len` keys of `kv`, their softmax, and the
/// weighted sum of the values, written to `out`. The scores go four keys at a time
/// through `dots` (the same bits as one `dot` each).
#[inline(always)]
fn one_query_kernel(q: &[f32], kv: HeadKv<'_>, len: usize, scale: f32, out: &mut [f32]) {
    let HeadKv { keys, values, stride } = kv;
    let d = q.len();
    let key = |j: usize| &keys[j * stride..][..d];
    let mut scores = Vec::with_capacity(len);
    let whole = len - len % DOT_BLOCK;
    for j in (0..whole).step_by(DOT_BLOCK) {
        scores.extend(dots::<DOT_BLOCK>(&keys[j * stride..], stride, q).map(|s| s * scale));
    }
    scores.extend((whole..len).map(|j| dot(key(j), q) * scale));
    let max = lanes_max(&scores);
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = exp_f32(*s - max);
        total += *s;
    }
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(&values[j * stride..][..d]) {
            *o += p * x;
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}
avx512_dispatch!(one_query, one_query_avx512, one_query_avx2, one_query_kernel,
    (q: &[f32], kv: HeadKv<'_>, len: usize, scale: f32, out: &mut [f32]) -> ());

/// `sum_i a_i b_i` in LANES independent accumulators, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The plain composition of `decode_attention`, on any device and in the cache's dtype
/// (scores and softmax in f32): gathers each query's slot, masks the keys past its
/// position, and runs the two matmuls. q (n, H, D) -> (n, H, D).
pub fn decode_attention_plain(q: &Tensor, k: &Tensor, v: &Tensor, rows: &CacheRows, scale: f32) -> Result<Tensor> {
    let (n, h, d, hkv) = dims(q, k, v, rows)?;
    let s = rows.pos.iter().max().map_or(0, |p| p + 1);
    let dev = q.device();
    let slots = Tensor::from_vec(rows.slot.iter().map(|&x| x as u32).collect::<Vec<_>>(), n, dev)?;
    let gather = |c: &Tensor| -> Result<Tensor> {
        let c = c.reshape((c.dim(0)? / rows.max_len, rows.max_len, hkv, d))?;
        let c = c.index_select(&slots, 0)?.narrow(1, 0, s)?; // (n, S, Hkv, D)
        let c = c.transpose(1, 2)?.contiguous()?; // (n, Hkv, S, D)
        Ok(c.unsqueeze(2)?.expand((n, hkv, h / hkv, s, d))?.reshape((n, h, s, d))?)
    };
    let (keys, values) = (gather(k)?, gather(v)?);
    let mask: Vec<f32> = rows
        .pos
        .iter()
        .flat_map(|&p| (0..s).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, 1, 1, s), dev)?;
    let q = q.unsqueeze(2)?; // (n, H, 1, D)
    let scores = (q.matmul(&keys.t()?)?.to_dtype(DType::F32)? * scale as f64)?.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(values.dtype())?;
    Ok(p.matmul(&values)?.squeeze(2)?) // (n, H, D)
}

/// Rows up to which `linear_rows` beats `gemm`: gemm packs the whole weight on every
/// call, which costs as much as the product itself when only a few rows decode.
pub const SKINNY_ROWS: usize = 16;

/// y (n, o) = x (n, i) @ w^T, w (o, i), for a few rows of x (n <= `SKINNY_ROWS`),
/// reading each weight row once: the decode step of a small batch, which is bound by
/// reading the weights. `ops::linear_fwd` calls it for such n. Each output is one `dot`
/// with a fixed order, so a row's result does not depend on the other rows.
pub(crate) fn linear_rows(x: &[f32], w: &[f32], (n, o, i): (usize, usize, usize)) -> Vec<f32> {
    let isa = Isa::detect();
    let chunk = rows_per_task(o);
    let mut yt = vec![0f32; o * n]; // (o, n): each task owns whole weight rows
    yt.par_chunks_mut(n * chunk).enumerate().for_each(|(c, out)| {
        let rows = out.len() / n;
        task_dots(isa, x, &w[c * chunk * i..][..rows * i], i, out);
    });
    let mut y = vec![0f32; n * o];
    for (j, col) in yt.chunks(n).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * o + j] = v;
        }
    }
    y
}

/// Weight rows per task of a few-row linear over `o` of them: at most 64, and a whole
/// multiple of tasks per thread, so that no thread waits on a last, lone task (a 192-row
/// projection in chunks of 64 left one of two threads idle for a third of the op).
pub(crate) fn rows_per_task(o: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_thread = o.div_ceil(threads * 64).max(1);
    o.div_ceil(threads * per_thread).max(1)
}

/// out (rows, n) = the weight rows of one task, w (rows, i), against every row of x
/// (n, i). The rows of x go four at a time in the outer loop, so that a block of x stays
/// in L1 while the task's weight rows pass under it (from memory for the first block,
/// from L2 after); each output keeps `dot`'s order, so its bits. With one weight row
/// (the int8 linear's widened row), out[r] = x_r . w.
#[inline(always)]
fn task_dots_kernel(x: &[f32], w: &[f32], i: usize, out: &mut [f32]) {
    let n = x.len() / i;
    let whole = n - n % DOT_BLOCK;
    for b in (0..whole).step_by(DOT_BLOCK) {
        for (wr, y) in w.chunks_exact(i).zip(out.chunks_exact_mut(n)) {
            y[b..b + DOT_BLOCK].copy_from_slice(&dots::<DOT_BLOCK>(&x[b * i..], i, wr));
        }
    }
    for r in whole..n {
        let xr = &x[r * i..][..i];
        for (wr, y) in w.chunks_exact(i).zip(out.chunks_exact_mut(n)) {
            y[r] = dot(xr, wr);
        }
    }
}
avx512_dispatch!(task_dots, task_dots_avx512, task_dots_avx2, task_dots_kernel,
    (x: &[f32], w: &[f32], i: usize, out: &mut [f32]) -> ());

/// Rows that `dots` takes at once in the kernels: 4 x 16 accumulator lanes fill eight
/// AVX2 registers and leave room for the other operand.
const DOT_BLOCK: usize = 4;

/// `dot(x_r, w)` for the B rows x_r = `x[r * stride..][..w.len()]` at once, each in
/// `dot`'s order: the LANES lane sums over the whole chunks, then the lanes in order,
/// plus the tail.
#[inline(always)]
fn dots<const B: usize>(x: &[f32], stride: usize, w: &[f32]) -> [f32; B] {
    let i = w.len();
    let whole = i - i % LANES;
    let mut acc = [[0f32; LANES]; B];
    for c in (0..whole).step_by(LANES) {
        let wc = &w[c..c + LANES];
        for (r, a) in acc.iter_mut().enumerate() {
            let xc = &x[r * stride + c..r * stride + c + LANES];
            for l in 0..LANES {
                a[l] += xc[l] * wc[l];
            }
        }
    }
    let mut out = [0f32; B];
    for (r, (a, y)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let tail: f32 = x[r * stride + whole..r * stride + i]
            .iter()
            .zip(&w[whole..])
            .map(|(p, q)| p * q)
            .sum();
        *y = a.iter().sum::<f32>() + tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(n: usize, shape: &[usize], seed: u32) -> Tensor {
        let data: Vec<f32> = (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Three queries of two slots, one of them a prefill of three positions, with
    /// grouped-query heads: the fused kernel matches the plain ops.
    #[test]
    fn fused_decode_attention_matches_the_plain_ops() -> Result<()> {
        let (slots, max_len, h, hkv, d) = (3, 6, 4, 2, 8);
        let k = tensor(slots * max_len * hkv * d, &[slots * max_len, hkv * d], 1);
        let v = tensor(slots * max_len * hkv * d, &[slots * max_len, hkv * d], 2);
        let rows = CacheRows {
            slot: vec![2, 0, 0, 0, 1],
            pos: vec![5, 0, 1, 2, 3],
            max_len,
        };
        let q = tensor(rows.len() * h * d, &[rows.len(), h, d], 3);
        let fused = decode_attention(&q, &k, &v, &rows, 0.35)?;
        let plain = decode_attention_plain(&q, &k, &v, &rows, 0.35)?;
        let diff = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max difference {diff}");
        Ok(())
    }

    /// A query's output is the same bits whatever else shares the call.
    #[test]
    fn a_query_does_not_depend_on_the_other_queries() -> Result<()> {
        let (max_len, h, hkv, d) = (5, 2, 1, 4);
        let k = tensor(2 * max_len * hkv * d, &[2 * max_len, hkv * d], 4);
        let v = tensor(2 * max_len * hkv * d, &[2 * max_len, hkv * d], 5);
        let q = tensor(2 * h * d, &[2, h, d], 6);
        let both = CacheRows {
            slot: vec![0, 1],
            pos: vec![4, 2],
            max_len,
        };
        let alone = CacheRows {
            slot: vec![1],
            pos: vec![2],
            max_len,
        };
        let b = decode_attention(&q, &k, &v, &both, 0.5)?.get(1)?;
        let a = decode_attention(&q.narrow(0, 1, 1)?, &k, &v, &alone, 0.5)?.get(0)?;
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// The few-row linear (through the fused op) matches the plain matmul, and a row's
    /// result is the same bits alone or beside others.
    #[test]
    fn linear_rows_matches_the_plain_matmul_row_by_row() -> Result<()> {
        use crate::kernels::ops::{linear, linear_plain};
        let (m, o, i) = (5, 130, 70);
        let x = tensor(m * i, &[1, m, i], 7);
        let w = tensor(o * i, &[o, i], 8);
        let fast = linear(&x, &w)?;
        let diff = (&fast - linear_plain(&x, &w)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max difference {diff}");
        // Rows 0-3 go through the four-row block, row 4 alone: every one has `dot`'s bits.
        for r in 0..m {
            let alone = linear(&x.narrow(1, r, 1)?, &w)?;
            assert_eq!(
                alone.flatten_all()?.to_vec1::<f32>()?,
                fast.narrow(1, r, 1)?.flatten_all()?.to_vec1::<f32>()?,
                "row {r}"
            );
        }
        Ok(())
    }

    /// The AVX-512, AVX2 and baseline builds of the few-row dot (one weight row, seven
    /// input rows) agree bit for bit (on a
    /// CPU without AVX-512 or AVX2 the comparison covers the builds it has).
    #[test]
    fn one_weight_row_is_the_same_bits_on_every_instruction_set() -> Result<()> {
        let (n, i) = (7, 70); // a block of four rows, three alone, and a tail of 6 inputs
        let x = tensor(n * i, &[n * i], 9).to_vec1::<f32>()?;
        let w = tensor(i, &[i], 10).to_vec1::<f32>()?;
        let best = Isa::detect();
        let avx2 = Isa { avx512: false, ..best };
        let mut outs = Vec::new();
        for isa in [Isa::baseline(), avx2, best] {
            let mut out = vec![0f32; n];
            task_dots(isa, &x, &w, i, &mut out);
            outs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        Ok(())
    }

    /// The few-row linear's tasks and the attention's scores (blocks of four rows or
    /// keys, then the rest one by one) give `dot`'s bits on every instruction set, at
    /// widths with whole 16-lane chunks and a tail.
    #[test]
    fn task_dots_and_one_query_are_the_same_bits_on_every_instruction_set() -> Result<()> {
        let best = Isa::detect();
        let isas = [Isa::baseline(), Isa { avx512: false, ..best }, best];
        let vec = |n: usize, seed: u32| tensor(n, &[n], seed).to_vec1::<f32>();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (n, rows, i) = (7, 3, 70);
        let (x, w) = (vec(n * i, 11)?, vec(rows * i, 12)?);
        let (d, stride, len) = (40, 48, 11);
        let (q, keys, values) = (vec(d, 13)?, vec(len * stride, 14)?, vec(len * stride, 15)?);
        let mut runs = Vec::new();
        for isa in isas {
            let mut y = vec![0f32; rows * n];
            task_dots(isa, &x, &w, i, &mut y);
            let mut o = vec![0f32; d];
            let kv = HeadKv {
                keys: &keys,
                values: &values,
                stride,
            };
            one_query(isa, &q, kv, len, 0.3, &mut o);
            runs.push((bits(&y), bits(&o)));
        }
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[0], runs[2]);
        for (k, &y) in runs[0].0.iter().enumerate() {
            let (j, r) = (k / n, k % n);
            assert_eq!(
                y,
                dot(&x[r * i..][..i], &w[j * i..][..i]).to_bits(),
                "row {r}, weight row {j}"
            );
        }
        Ok(())
    }

    #[test]
    fn positions_past_the_slot_are_an_error() {
        let k = tensor(2 * 4, &[2, 4], 0);
        let q = tensor(4, &[1, 1, 4], 0);
        let rows = CacheRows {
            slot: vec![0],
            pos: vec![2],
            max_len: 2,
        };
        assert!(decode_attention(&q, &k, &k, &rows, 1.0).is_err());
    }
}
