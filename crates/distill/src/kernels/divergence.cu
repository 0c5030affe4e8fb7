// CUDA kernels of the fused distillation losses in loss/fused.rs: the divergence family
// between p = softmax(teacher / T) and q = softmax(student / T), its student gradient,
// the same against a top-k teacher (loss/topk.rs), and the hard-label cross-entropy with
// its gradient.
//
// The math is the CPU kernel's, term for term (the formulas are in the header of
// loss/fused.rs; the device functions below carry the same names as its `elem_fn!`s):
// log-probabilities from max-shifted log-sum-exp, ratios such as p/m evaluated as
// exp(log p - log m), `0 log 0 = 0`, and f32 arithmetic for every input type. Only the
// order of the sums differs (a block-wide tree here), so CPU and CUDA agree to f32
// rounding, not bit for bit.
//
// Organisation:
//   - one thread block per row: grid = (rows, 1, 1); blockIdx.x is the row;
//   - blockDim.x must be a multiple of 32 and at most 1024 (full-warp shuffles, and at
//     most 32 warps share the 32-entry scratch array); loss/cuda.rs picks it from V;
//   - threads stride over the row (j = threadIdx.x, += blockDim.x), so consecutive
//     threads read consecutive elements (coalesced) and any V works;
//   - pass 1 computes both sides' (max, sum of exp) with an online update per element,
//     merged across the block; later passes read the row again (from L2 for rows of a
//     few hundred KB) for the loss sum, the gradient's row constants, and the gradient.
//
// No #include: NVRTC finds no CUDA headers unless given an include path, so the 16-bit
// types are handled as raw bits (bf16 by shifting, f16 by one PTX cvt instruction) and
// -inf is spelled as its bit pattern. This file compiles with nothing but NVRTC's
// built-in declarations, at run time (loss/cuda.rs) exactly as in
// scripts/check_cuda_kernels.py: both pass `--std=c++17`, one `--gpu-architecture`, and
// one of the `nvrtc-variants` listed at the end of the file.
//
// Kernel names: distill_div_fwd_<s>_<t>, distill_div_bwd_<s>_<t>, distill_ce_fwd_<s>,
// distill_ce_bwd_<s>, distill_topk_fwd_<s>, distill_topk_bwd_<s>, where <s>, <t> in
// {f32, f16, bf16, f64} are the student's and the teacher's element types (a top-k
// teacher is always u32 ids and f32 log-probabilities).

// DISTILL_CUDA_EMU: compiled as host C++ by crates/cuda-emu, whose header defines the
// CUDA built-ins this file uses and the two f16 conversions below (no inline PTX on a CPU).
// Nothing else in the file differs between the two builds.

#define NEG_INF __uint_as_float(0xff800000u)

// Divergence codes, the `kind` argument; loss/cuda.rs passes the same numbers.
#define DIV_FORWARD_KL 0
#define DIV_REVERSE_KL 1
#define DIV_JSD 2
#define DIV_SKEW_FORWARD_KL 3
#define DIV_SKEW_REVERSE_KL 4
#define DIV_TVD 5

// ---------------------------------------------------------------------------
// Element types: storage type, exact load as f32, rounded store from f32.
// ---------------------------------------------------------------------------

struct F32 {
    typedef float raw;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

struct F64 {
    typedef double raw;
    // Rounds to nearest, as the CPU kernel's `x.to_f64() as f32`.
    static __device__ __forceinline__ float load(double x) { return (float)x; }
    static __device__ __forceinline__ double store(float x) { return (double)x; }
};

struct F16 {
    typedef unsigned short raw;
    static __device__ __forceinline__ float load(unsigned short h) {
#ifdef DISTILL_CUDA_EMU
        return distill_emu_f16_to_f32(h);
#else
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
#endif
    }
    // Round to nearest even, subnormals and overflow to inf included, as half::f16.
    static __device__ __forceinline__ unsigned short store(float f) {
#ifdef DISTILL_CUDA_EMU
        return distill_emu_f32_to_f16(f);
#else
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
#endif
    }
};

struct BF16 {
    typedef unsigned short raw;
    // bf16 is the top half of an f32: widening is exact.
    static __device__ __forceinline__ float load(unsigned short h) {
        return __uint_as_float(((unsigned int)h) << 16);
    }
    // Round to nearest even by integer arithmetic (cvt.rn.bf16.f32 needs sm_80; this runs
    // anywhere), NaN kept NaN with the quiet bit set, as half::bf16::from_f32 does.
    static __device__ __forceinline__ unsigned short store(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            return (unsigned short)((u >> 16) | 0x0040u);
        }
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
};

// ---------------------------------------------------------------------------
// Scalar helpers, mirroring loss/fused.rs.
// ---------------------------------------------------------------------------

// w (la - lb), with 0 log 0 = 0: a zero weight contributes 0 even if the logs are -inf.
static __device__ __forceinline__ float w_log_ratio(float w, float la, float lb) {
    return w == 0.0f ? 0.0f : w * (la - lb);
}

// log(exp(a) + exp(b)): exact when one side is -inf, -inf when both are.
static __device__ __forceinline__ float log_add_exp(float a, float b) {
    float hi = a >= b ? a : b;
    float lo = a >= b ? b : a;
    if (hi == NEG_INF) {
        return NEG_INF;
    }
    return hi + log1pf(expf(lo - hi));
}

// exp(ln_c + la - lm) where the weight exp(la) is nonzero, else 0: the bounded ratios
// r and u of the skew gradients.
static __device__ __forceinline__ float ratio(float ln_c, float la, float lm) {
    return la == NEG_INF ? 0.0f : expf(ln_c + la - lm);
}

static __device__ __forceinline__ float sign0(float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

// ---------------------------------------------------------------------------
// Block-wide reductions. Every thread of the block must call them (they contain
// __syncthreads); all threads get the result. `scratch` holds 32 floats.
// ---------------------------------------------------------------------------

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// One value per warp into scratch, then warp 0 combines them; `IS_MAX` picks the
// operation (max's identity is -inf, the sum's 0).
template <bool IS_MAX>
static __device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    __syncthreads(); // a previous reduction may still be reading scratch[0]
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? scratch[lane] : (IS_MAX ? NEG_INF : 0.0f);
        v = IS_MAX ? warp_max(v) : warp_sum(v);
        if (lane == 0) {
            scratch[0] = v;
        }
    }
    __syncthreads();
    return scratch[0];
}

static __device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<false>(v, scratch);
}

// A running log-sum-exp: sum of exp(x - max) over the elements seen, and their max.
struct Lse {
    float max;
    float sum;
};

// Adds one element. An element above the max rescales the sum once; -inf elements add
// exp(-inf) = 0 and are skipped, so that an all -inf prefix never computes -inf - -inf.
// A NaN element fails the first test and passes the second: the sum, and so the row,
// becomes NaN, as on the CPU.
static __device__ __forceinline__ void lse_push(Lse& a, float x) {
    if (x > a.max) {
        a.sum = a.sum * expf(a.max - x) + 1.0f; // expf(-inf) = 0 while the max was -inf
        a.max = x;
    } else if (x != NEG_INF) {
        a.sum += expf(x - a.max);
    }
}

// Combines the threads' running log-sum-exps: the block's max first, then each thread
// rescales its sum to it once (one exp per thread, not one per step of a merge tree).
static __device__ Lse block_lse(Lse a, float* scratch) {
    const float m = block_reduce<true>(a.max, scratch);
    // A thread that saw only -inf has sum 0; skipping it avoids -inf - -inf when the
    // whole row is -inf.
    const float scaled = a.max == NEG_INF ? 0.0f : a.sum * expf(a.max - m);
    Lse r;
    r.max = m;
    r.sum = block_sum(scaled, scratch);
    return r;
}

// A finished normaliser: log p_j = (x_j - max) - log_sum. Subtracting the max first
// keeps log-probabilities near the max exact even for logits like 1e4 (the CPU order).
struct LogNorm {
    float max;
    float log_sum;
    __device__ __forceinline__ float log_prob(float x) const { return (x - max) - log_sum; }
};

static __device__ __forceinline__ LogNorm finish(Lse a) {
    LogNorm n;
    n.max = a.max;
    n.log_sum = logf(a.sum);
    return n;
}

// ---------------------------------------------------------------------------
// Per-element terms of the divergences and of their gradients (lq = log q_j,
// lp = log p_j). Names follow the `elem_fn!`s of loss/fused.rs.
// ---------------------------------------------------------------------------

// The per-call constants: 1/T (rounded to f32 by the caller as the CPU kernel rounds
// it), the mixture weight w (beta or skew) and ln w, ln(1 - w) (ln 0 = -inf makes the
// mixture exactly its other side).
struct Params {
    int kind;
    float inv_t;
    float w;
    float ln_w;
    float ln_1mw;
};

// The loss term of element j; the row's divergence is the sum (halved for TVD).
static __device__ __forceinline__ float loss_term(const Params& k, float lq, float lp) {
    switch (k.kind) {
    case DIV_FORWARD_KL: // p (log p - log q)
        return w_log_ratio(expf(lp), lp, lq);
    case DIV_REVERSE_KL: // q (log q - log p)
        return w_log_ratio(expf(lq), lq, lp);
    case DIV_JSD: { // beta p (log p - log m) + (1 - beta) q (log q - log m), m = beta p + (1 - beta) q
        const float lm = log_add_exp(lp + k.ln_w, lq + k.ln_1mw);
        return k.w * w_log_ratio(expf(lp), lp, lm) + (1.0f - k.w) * w_log_ratio(expf(lq), lq, lm);
    }
    case DIV_SKEW_FORWARD_KL: // p (log p - log m), m = a p + (1 - a) q
        return w_log_ratio(expf(lp), lp, log_add_exp(lp + k.ln_w, lq + k.ln_1mw));
    case DIV_SKEW_REVERSE_KL: // q (log q - log m), m = a q + (1 - a) p
        return w_log_ratio(expf(lq), lq, log_add_exp(lq + k.ln_w, lp + k.ln_1mw));
    default: // DIV_TVD: |p - q|
        return fabsf(expf(lp) - expf(lq));
    }
}

// The first row constant of a gradient (loss/fused.rs header): L for reverse KL and
// skew reverse KL, K = KL(q || m) for JSD, R for skew forward KL, G for TVD. Forward KL
// needs none (never called for it).
static __device__ __forceinline__ float grad_const1(const Params& k, float lq, float lp) {
    switch (k.kind) {
    case DIV_REVERSE_KL: // RevKl
        return w_log_ratio(expf(lq), lq, lp);
    case DIV_JSD: // JsdK: q (log q - log m)
        return w_log_ratio(expf(lq), lq, log_add_exp(lp + k.ln_w, lq + k.ln_1mw));
    case DIV_SKEW_FORWARD_KL: // SkewFwdR: p r, r = (1 - a) q / m
        return expf(lp) * ratio(k.ln_1mw, lq, log_add_exp(lp + k.ln_w, lq + k.ln_1mw));
    case DIV_SKEW_REVERSE_KL: // SkewRev: the row's loss L
        return w_log_ratio(expf(lq), lq, log_add_exp(lq + k.ln_w, lp + k.ln_1mw));
    default: { // DIV_TVD, TvdG: q g, g = 0.5 sign(q - p)
        const float q = expf(lq);
        return q * 0.5f * sign0(q - expf(lp));
    }
    }
}

// The second row constant, U = sum q u (u = a q / m), for skew reverse KL only.
static __device__ __forceinline__ float grad_const2(const Params& k, float lq, float lp) {
    return expf(lq) * ratio(k.ln_w, lq, log_add_exp(lq + k.ln_w, lp + k.ln_1mw));
}

// dL/ds_j (before the factor grad_row / T), given the row constants c1, c2.
static __device__ __forceinline__ float grad_term(const Params& k, float lq, float lp, float c1, float c2) {
    switch (k.kind) {
    case DIV_FORWARD_KL: // FwdKlGrad: q - p
        return expf(lq) - expf(lp);
    case DIV_REVERSE_KL: // RevKlGrad: q (log q - log p - L)
        return w_log_ratio(expf(lq), lq, lp + c1);
    case DIV_JSD: // JsdGrad: (1 - beta) q (log q - log m - K)
        return (1.0f - k.w) * w_log_ratio(expf(lq), lq, log_add_exp(lp + k.ln_w, lq + k.ln_1mw) + c1);
    case DIV_SKEW_FORWARD_KL: // SkewFwdGrad: q R - p r
        return expf(lq) * c1 - expf(lp) * ratio(k.ln_1mw, lq, log_add_exp(lp + k.ln_w, lq + k.ln_1mw));
    case DIV_SKEW_REVERSE_KL: { // SkewRevGrad: q ((log q - log m - L) - (u - U))
        const float lm = log_add_exp(lq + k.ln_w, lp + k.ln_1mw);
        return w_log_ratio(expf(lq), lq, lm + c1 + (ratio(k.ln_w, lq, lm) - c2));
    }
    default: { // DIV_TVD, TvdGrad: q (g - G)
        const float q = expf(lq);
        return q * (0.5f * sign0(q - expf(lp)) - c1);
    }
    }
}

// ---------------------------------------------------------------------------
// Row kernels.
// ---------------------------------------------------------------------------

// Pass 1 over a row: both normalisers of x / T.
template <class S, class T>
static __device__ void row_norms(const typename S::raw* s, const typename T::raw* t, int v, float inv_t,
                                 float* scratch, LogNorm& nq, LogNorm& np) {
    Lse q = {NEG_INF, 0.0f};
    Lse p = {NEG_INF, 0.0f};
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        lse_push(q, S::load(s[j]) * inv_t);
        lse_push(p, T::load(t[j]) * inv_t);
    }
    nq = finish(block_lse(q, scratch));
    np = finish(block_lse(p, scratch));
}

// The divergence of one row (halved for TVD): a sum over the block, returned to every
// thread. Also used on the k + 1 categories of a top-k row (in shared memory).
template <class S, class T>
static __device__ float row_divergence(const typename S::raw* s, const typename T::raw* t, int v,
                                       const Params& k, float* scratch) {
    LogNorm nq, np;
    row_norms<S, T>(s, t, v, k.inv_t, scratch, nq, np);
    float acc = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float lq = nq.log_prob(S::load(s[j]) * k.inv_t);
        const float lp = np.log_prob(T::load(t[j]) * k.inv_t);
        acc += loss_term(k, lq, lp);
    }
    const float total = block_sum(acc, scratch);
    return k.kind == DIV_TVD ? 0.5f * total : total;
}

// o[j] = g * d divergence(row) / d s_j, stored as O (the student's type, or f32 for the
// categories of a top-k row). Every thread of the block must call it.
template <class S, class T, class O>
static __device__ void row_divergence_grad(const typename S::raw* s, const typename T::raw* t, int v,
                                           const Params& k, float g, typename O::raw* o, float* scratch) {
    LogNorm nq, np;
    row_norms<S, T>(s, t, v, k.inv_t, scratch, nq, np);
    const float scale = g * k.inv_t; // chain rule through s = student / T
    float c1 = 0.0f;
    float c2 = 0.0f;
    if (k.kind != DIV_FORWARD_KL) {
        float a1 = 0.0f;
        float a2 = 0.0f;
        const bool two = k.kind == DIV_SKEW_REVERSE_KL;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float lq = nq.log_prob(S::load(s[j]) * k.inv_t);
            const float lp = np.log_prob(T::load(t[j]) * k.inv_t);
            a1 += grad_const1(k, lq, lp);
            if (two) {
                a2 += grad_const2(k, lq, lp);
            }
        }
        c1 = block_sum(a1, scratch);
        if (two) {
            c2 = block_sum(a2, scratch);
        }
    }
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float lq = nq.log_prob(S::load(s[j]) * k.inv_t);
        const float lp = np.log_prob(T::load(t[j]) * k.inv_t);
        o[j] = O::store(scale * grad_term(k, lq, lp, c1, c2));
    }
}

// student (rows, v), teacher (rows, v) -> out (rows,) f32: the divergence of each row.
template <class S, class T>
static __device__ void div_fwd(const typename S::raw* student, const typename T::raw* teacher, float* out,
                               int rows, int v, Params k) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return; // the whole block leaves together: no __syncthreads is left waiting
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    const typename T::raw* t = teacher + (size_t)row * (size_t)v;
    const float total = row_divergence<S, T>(s, t, v, k, scratch);
    if (threadIdx.x == 0) {
        out[row] = total;
    }
}

// student (rows, v), teacher (rows, v), grad_rows (rows,) f32 -> out (rows, v) in the
// student's type: grad_rows[row] * d divergence(row) / d student.
template <class S, class T>
static __device__ void div_bwd(const typename S::raw* student, const typename T::raw* teacher,
                               const float* grad_rows, typename S::raw* out, int rows, int v, Params k) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    const typename T::raw* t = teacher + (size_t)row * (size_t)v;
    typename S::raw* o = out + (size_t)row * (size_t)v;
    const float g = grad_rows[row];
    if (g == 0.0f) {
        // A row whose loss is unused (mask 0) gets zeros without reading its logits, so
        // that garbage in padded rows cannot become NaN gradients (as on the CPU).
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            o[j] = S::store(0.0f);
        }
        return;
    }
    row_divergence_grad<S, T, S>(s, t, v, k, g, o, scratch);
}

// Pass 1 for one side only, at temperature 1 (cross-entropy).
template <class S>
static __device__ LogNorm row_norm(const typename S::raw* s, int v, float* scratch) {
    Lse q = {NEG_INF, 0.0f};
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        lse_push(q, S::load(s[j]));
    }
    return finish(block_lse(q, scratch));
}

// student (rows, v), targets (rows,) -> out (rows,) f32: lse(s) - s_y. A target outside
// [0, v) makes that row NaN and is reported through `bad`: atomicMax of (UINT_MAX - row)
// keeps the smallest bad row, and 0 (the caller's initial value) means none.
template <class S>
static __device__ void ce_fwd(const typename S::raw* student, const unsigned int* targets, float* out,
                              unsigned int* bad, int rows, int v) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    const unsigned int y = targets[row];
    const LogNorm n = row_norm<S>(s, v, scratch);
    if (threadIdx.x == 0) {
        if (y < (unsigned int)v) {
            out[row] = -n.log_prob(S::load(s[y]));
        } else {
            out[row] = __uint_as_float(0x7fc00000u); // NaN
            atomicMax(bad, 0xffffffffu - (unsigned int)row);
        }
    }
}

// student (rows, v), targets (rows,), grad_rows (rows,) f32 -> out (rows, v):
// grad_rows[row] * (softmax(s) - onehot(y)); a target outside the row gets no -1.
template <class S>
static __device__ void ce_bwd(const typename S::raw* student, const unsigned int* targets, const float* grad_rows,
                              typename S::raw* out, int rows, int v) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    typename S::raw* o = out + (size_t)row * (size_t)v;
    const float g = grad_rows[row];
    if (g == 0.0f) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            o[j] = S::store(0.0f);
        }
        return;
    }
    const LogNorm n = row_norm<S>(s, v, scratch);
    const unsigned int y = targets[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float q = expf(n.log_prob(S::load(s[j])));
        o[j] = S::store(g * ((unsigned int)j == y ? q - 1.0f : q));
    }
}

// ---------------------------------------------------------------------------
// Top-k teachers (loss/topk.rs, whose header gives the math): a row's teacher is k token
// ids and their tempered log-probabilities. Both sides are coarsened to k + 1 categories,
// the listed tokens and then the tail of everything else, and the divergence is taken
// between the two coarsened distributions with the row functions above at T = 1.
//
// One block per row, as above. The row's categories live in dynamic shared memory,
// 4 (5k + 3) bytes (loss/cuda.rs sizes it; `TopKSmem` lays it out): the k ids as given
// (read k times each by the sort), the k ids sorted (for the membership test of the tail
// pass), then the student's and the teacher's k + 1 category log-probabilities, then
// (backward) their k + 1 gradients.
// ---------------------------------------------------------------------------

#ifndef DISTILL_DYNAMIC_SHARED
#define DISTILL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// The dynamic shared memory of a top-k row, 5k + 3 words.
struct TopKSmem {
    unsigned int* ids;    // k, as given
    unsigned int* sorted; // k, increasing
    float* lq;            // k + 1, the student's category log-probabilities, tail last
    float* lp;            // k + 1, the teacher's
    float* d;             // k + 1, the categories' gradients (backward)
    __device__ TopKSmem(float* smem, int kk)
        : ids(reinterpret_cast<unsigned int*>(smem)), sorted(reinterpret_cast<unsigned int*>(smem) + kk),
          lq(smem + 2 * kk), lp(smem + 3 * kk + 1), d(smem + 4 * kk + 2) {}
};

// Is token j among the k sorted ids? A binary search.
static __device__ __forceinline__ bool listed(const unsigned int* sorted, int kk, unsigned int j) {
    int lo = 0;
    int hi = kk;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (sorted[mid] < j) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < kk && sorted[lo] == j;
}

// Fills the shared categories of one row and returns the student's normaliser of the
// whole row at 1/T through `norm`. Checks the teacher side as topk.rs's `coarsen` does:
// ids inside the vocabulary and distinct, log-probabilities <= 1e-4 and not NaN, their
// probabilities summing to at most 1 + 1e-3. Returns false, in every thread, for a bad
// row; the caller flags it and the host re-checks that row to name the fault.
template <class S>
static __device__ bool topk_coarsen(const typename S::raw* s, const unsigned int* idx, const float* lp_in, int v,
                                    int kk, float inv_t, float* smem, float* scratch, LogNorm& norm) {
    __shared__ unsigned int bad;
    __shared__ double mass;
    const TopKSmem sm(smem, kk);
    unsigned int* sorted = sm.sorted;
    float* lq = sm.lq;
    float* lp = sm.lp;
    if (threadIdx.x == 0) {
        bad = 0u;
    }
    for (int c = threadIdx.x; c < kk; c += blockDim.x) {
        sm.ids[c] = idx[c];
    }
    __syncthreads();
    // Sorting by rank: id c goes to the number of ids below it. A repeated id is a
    // fault, so ranks never collide in a row that passes.
    for (int c = threadIdx.x; c < kk; c += blockDim.x) {
        const unsigned int x = sm.ids[c];
        int rank = 0;
        bool repeated = false;
        for (int i = 0; i < kk; ++i) {
            const unsigned int y = sm.ids[i];
            rank += y < x ? 1 : 0;
            repeated = repeated || (y == x && i != c);
        }
        const float l = lp_in[c];
        if (x >= (unsigned int)v || repeated || !(l <= 1e-4f)) { // !(l <= ..) is also true for NaN
            atomicMax(&bad, 1u);
        } else {
            sorted[rank] = x;
        }
    }
    if (threadIdx.x == 0) {
        // The teacher's mass, in f64 and in the listed order, as on the CPU.
        double m = 0.0;
        for (int c = 0; c < kk; ++c) {
            m += exp((double)lp_in[c]);
        }
        if (m > 1.0 + 1e-3) {
            atomicMax(&bad, 1u);
        }
        mass = m;
    }
    __syncthreads();
    if (bad != 0u) {
        return false;
    }
    // The whole row's normaliser and the tail's (unlisted tokens only: a log-sum-exp of
    // its own, not 1 - the listed mass, which cancels when the top k hold nearly all).
    Lse all = {NEG_INF, 0.0f};
    Lse tail = {NEG_INF, 0.0f};
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = S::load(s[j]) * inv_t;
        lse_push(all, x);
        if (!listed(sorted, kk, (unsigned int)j)) {
            lse_push(tail, x);
        }
    }
    norm = finish(block_lse(all, scratch));
    const Lse t = block_lse(tail, scratch);
    for (int c = threadIdx.x; c < kk; c += blockDim.x) {
        lq[c] = norm.log_prob(S::load(s[idx[c]]) * inv_t);
        lp[c] = lp_in[c];
    }
    if (threadIdx.x == 0) {
        // No unlisted token (k = V), or all of them at -inf: an empty tail.
        lq[kk] = t.max == NEG_INF ? NEG_INF : (t.max - norm.max) + logf(t.sum) - norm.log_sum;
        // With every token listed the tail is empty by definition: 1 - mass is rounding
        // noise there, and a noise mass against the student's empty tail is infinite.
        const double rest = kk == v ? 0.0 : 1.0 - mass;
        lp[kk] = rest > 0.0 ? (float)log(rest) : NEG_INF;
    }
    __syncthreads();
    return true;
}

// The categories' kernel constants: the same divergence at T = 1.
static __device__ __forceinline__ Params category_params(Params k) {
    k.inv_t = 1.0f;
    return k;
}

// student (rows, v), indices (rows, kk) u32, log_probs (rows, kk) f32 -> out (rows,) f32.
// A bad teacher row makes its loss NaN and is reported through `bad` as in ce_fwd.
template <class S>
static __device__ void topk_fwd(const typename S::raw* student, const unsigned int* indices, const float* log_probs,
                                float* out, unsigned int* bad, int rows, int v, int kk, Params k) {
    __shared__ float scratch[32];
    DISTILL_DYNAMIC_SHARED(float, smem);
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    const size_t at = (size_t)row * (size_t)kk;
    LogNorm norm;
    if (!topk_coarsen<S>(s, indices + at, log_probs + at, v, kk, k.inv_t, smem, scratch, norm)) {
        if (threadIdx.x == 0) {
            out[row] = __uint_as_float(0x7fc00000u); // NaN
            atomicMax(bad, 0xffffffffu - (unsigned int)row);
        }
        return;
    }
    const TopKSmem sm(smem, kk);
    const float total = row_divergence<F32, F32>(sm.lq, sm.lp, kk + 1, category_params(k), scratch);
    if (threadIdx.x == 0) {
        out[row] = total;
    }
}

// Same inputs and grad_rows (rows,) f32 -> out (rows, v) in the student's type. A listed
// token gets its category's gradient; a tail token gets (q_j / q_tail) times the tail's,
// since the tail's log-probability is the log-sum-exp of its members. Both times 1/T.
template <class S>
static __device__ void topk_bwd(const typename S::raw* student, const unsigned int* indices, const float* log_probs,
                                const float* grad_rows, typename S::raw* out, unsigned int* bad, int rows, int v,
                                int kk, Params k) {
    __shared__ float scratch[32];
    DISTILL_DYNAMIC_SHARED(float, smem);
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const typename S::raw* s = student + (size_t)row * (size_t)v;
    typename S::raw* o = out + (size_t)row * (size_t)v;
    const float g = grad_rows[row];
    const size_t at = (size_t)row * (size_t)kk;
    LogNorm norm;
    // A masked row (g = 0) gets zeros without being read or checked, as on the CPU.
    if (g == 0.0f || !topk_coarsen<S>(s, indices + at, log_probs + at, v, kk, k.inv_t, smem, scratch, norm)) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            o[j] = S::store(0.0f);
        }
        if (g != 0.0f && threadIdx.x == 0) {
            atomicMax(bad, 0xffffffffu - (unsigned int)row);
        }
        return;
    }
    const TopKSmem sm(smem, kk);
    const unsigned int* sorted = sm.sorted;
    const float* lq = sm.lq;
    const float* lp = sm.lp;
    float* d = sm.d; // k + 1 category gradients, g included
    row_divergence_grad<F32, F32, F32>(lq, lp, kk + 1, category_params(k), g, d, scratch);
    __syncthreads();
    const float lq_tail = lq[kk];
    const float d_tail = d[kk];
    const bool spread = lq_tail > NEG_INF && d_tail != 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        if (listed(sorted, kk, (unsigned int)j)) {
            continue; // written below
        }
        // +0 where nothing spreads, as on the CPU (0 * d_tail would be -0, or NaN for an
        // infinite d_tail).
        const float grad = spread ? k.inv_t * expf(norm.log_prob(S::load(s[j]) * k.inv_t) - lq_tail) * d_tail : 0.0f;
        o[j] = S::store(grad); // (1/T) (q_j / q_tail) d_tail
    }
    const unsigned int* idx = indices + at;
    for (int c = threadIdx.x; c < kk; c += blockDim.x) {
        o[idx[c]] = S::store(k.inv_t * d[c]);
    }
}

// ---------------------------------------------------------------------------
// extern "C" entry points, one per element type (pair), so that the Rust side can
// look them up by name.
// ---------------------------------------------------------------------------

#define DIV_KERNELS(SN, S, TN, T)                                                                              \
    extern "C" __global__ void distill_div_fwd_##SN##_##TN(const S::raw* student, const T::raw* teacher,       \
                                                           float* out, int rows, int v, int kind, float inv_t, \
                                                           float w, float ln_w, float ln_1mw) {                \
        const Params k = {kind, inv_t, w, ln_w, ln_1mw};                                                       \
        div_fwd<S, T>(student, teacher, out, rows, v, k);                                                      \
    }                                                                                                          \
    extern "C" __global__ void distill_div_bwd_##SN##_##TN(const S::raw* student, const T::raw* teacher,       \
                                                           const float* grad_rows, S::raw* out, int rows,      \
                                                           int v, int kind, float inv_t, float w, float ln_w,  \
                                                           float ln_1mw) {                                     \
        const Params k = {kind, inv_t, w, ln_w, ln_1mw};                                                       \
        div_bwd<S, T>(student, teacher, grad_rows, out, rows, v, k);                                           \
    }

#define DIV_KERNELS_FOR_STUDENT(SN, S) \
    DIV_KERNELS(SN, S, f32, F32)       \
    DIV_KERNELS(SN, S, f16, F16)       \
    DIV_KERNELS(SN, S, bf16, BF16)     \
    DIV_KERNELS(SN, S, f64, F64)

#define CE_KERNELS(SN, S)                                                                                      \
    extern "C" __global__ void distill_ce_fwd_##SN(const S::raw* student, const unsigned int* targets,         \
                                                   float* out, unsigned int* bad, int rows, int v) {           \
        ce_fwd<S>(student, targets, out, bad, rows, v);                                                        \
    }                                                                                                          \
    extern "C" __global__ void distill_ce_bwd_##SN(const S::raw* student, const unsigned int* targets,         \
                                                   const float* grad_rows, S::raw* out, int rows, int v) {     \
        ce_bwd<S>(student, targets, grad_rows, out, rows, v);                                                  \
    }

#define TOPK_KERNELS(SN, S)                                                                                    \
    extern "C" __global__ void distill_topk_fwd_##SN(const S::raw* student, const unsigned int* indices,       \
                                                     const float* log_probs, float* out, unsigned int* bad,    \
                                                     int rows, int v, int kk, int kind, float inv_t, float w,  \
                                                     float ln_w, float ln_1mw) {                               \
        const Params k = {kind, inv_t, w, ln_w, ln_1mw};                                                       \
        topk_fwd<S>(student, indices, log_probs, out, bad, rows, v, kk, k);                                    \
    }                                                                                                          \
    extern "C" __global__ void distill_topk_bwd_##SN(const S::raw* student, const unsigned int* indices,       \
                                                     const float* log_probs, const float* grad_rows,           \
                                                     S::raw* out, unsigned int* bad, int rows, int v, int kk,  \
                                                     int kind, float inv_t, float w, float ln_w,               \
                                                     float ln_1mw) {                                           \
        const Params k = {kind, inv_t, w, ln_w, ln_1mw};                                                       \
        topk_bwd<S>(student, indices, log_probs, grad_rows, out, bad, rows, v, kk, k);                         \
    }

// Which students' kernels to emit: every student type by default, or one when the file
// is compiled with -DDISTILL_STUDENT=<code> (1 f32, 2 f16, 3 bf16, 4 f64). loss/cuda.rs
// compiles one such module per student type it meets: a quarter of the PTX for NVRTC
// and then the driver to compile at run time. The check script compiles each variant too:
// nvrtc-variants: -DDISTILL_STUDENT=1 | -DDISTILL_STUDENT=2 | -DDISTILL_STUDENT=3 | -DDISTILL_STUDENT=4
#ifndef DISTILL_STUDENT
#define DISTILL_STUDENT 0
#endif
#define EMIT_STUDENT(code) (DISTILL_STUDENT == 0 || DISTILL_STUDENT == (code))

#if EMIT_STUDENT(1)
DIV_KERNELS_FOR_STUDENT(f32, F32)
CE_KERNELS(f32, F32)
TOPK_KERNELS(f32, F32)
#endif

#if EMIT_STUDENT(2)
DIV_KERNELS_FOR_STUDENT(f16, F16)
CE_KERNELS(f16, F16)
TOPK_KERNELS(f16, F16)
#endif

#if EMIT_STUDENT(3)
DIV_KERNELS_FOR_STUDENT(bf16, BF16)
CE_KERNELS(bf16, BF16)
TOPK_KERNELS(bf16, BF16)
#endif

#if EMIT_STUDENT(4)
DIV_KERNELS_FOR_STUDENT(f64, F64)
CE_KERNELS(f64, F64)
TOPK_KERNELS(f64, F64)
#endif
