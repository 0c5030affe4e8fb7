// Host entry points of the CUDA emulator: the kernels of divergence.cu, compiled here as
// host C++ with the built-ins of cuda_emu.h, launched the way loss/cuda.rs launches them
// (one block per row, `block` threads). src/lib.rs calls these through `extern "C"`.
//
// Every entry point takes host pointers, the element-type codes of the DISTILL_STUDENT
// variants (1 f32, 2 f16, 3 bf16, 4 f64), rows, v, the kernel's own arguments and the
// block size. It returns 0 on success; otherwise 1 for an error of the launch (the
// emulator's message is copied into `err`) or 2 for an unknown element type.

#include "cuda_emu.h"

// The file under test, unchanged: the very source that NVRTC compiles. Or, to try an
// edit before making it, another copy of it: build.rs then defines DISTILL_EMU_KERNELS.
#ifdef DISTILL_EMU_KERNELS
#include DISTILL_EMU_KERNELS
#else
#include "../../distill/src/kernels/divergence.cu"
#endif

#include <cstdio>

namespace {

int report(const std::string& error, char* err, std::size_t err_len) {
    if (error.empty()) {
        return 0;
    }
    if (err != nullptr && err_len > 0) {
        std::snprintf(err, err_len, "%s", error.c_str());
    }
    return 1;
}

int unknown_type(char* err, std::size_t err_len, int s_code, int t_code) {
    if (err != nullptr && err_len > 0) {
        std::snprintf(err, err_len, "no kernel for element types %d, %d (1 f32, 2 f16, 3 bf16, 4 f64)", s_code,
                      t_code);
    }
    return 2;
}

// Runs `launch` and turns any C++ exception into an error: none may cross extern "C".
template <class F>
int guarded(char* err, std::size_t err_len, F&& launch) {
    try {
        return launch();
    } catch (const std::exception& e) {
        return report(std::string("emulator: ") + e.what(), err, err_len);
    } catch (...) {
        return report("emulator: unknown exception", err, err_len);
    }
}

} // namespace

// One `case` per (student, teacher) pair: X(student name, type, code, teacher name, type, code).
#define EMU_TEACHERS(X, SN, S, SC) \
    X(SN, S, SC, f32, F32, 1)      \
    X(SN, S, SC, f16, F16, 2)      \
    X(SN, S, SC, bf16, BF16, 3)    \
    X(SN, S, SC, f64, F64, 4)
#define EMU_PAIRS(X)                \
    EMU_TEACHERS(X, f32, F32, 1)    \
    EMU_TEACHERS(X, f16, F16, 2)    \
    EMU_TEACHERS(X, bf16, BF16, 3)  \
    EMU_TEACHERS(X, f64, F64, 4)
#define EMU_STUDENTS(X) \
    X(f32, F32, 1)      \
    X(f16, F16, 2)      \
    X(bf16, BF16, 3)    \
    X(f64, F64, 4)

extern "C" {

// distill_div_fwd_<s>_<t>: student (rows, v), teacher (rows, v) -> out (rows,) f32.
int distill_emu_div_fwd(int s_code, int t_code, const void* student, const void* teacher, float* out, int rows, int v,
                        int kind, float inv_t, float w, float ln_w, float ln_1mw, unsigned int block, char* err,
                        std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code * 10 + t_code) {
#define EMU_DIV_FWD(SN, S, SC, TN, T, TC)                                                                      \
    case SC * 10 + TC:                                                                                         \
        return report(emu_launch((unsigned int)rows, block, 0,                                                 \
                                 [&] {                                                                         \
                                     distill_div_fwd_##SN##_##TN(static_cast<const S::raw*>(student),          \
                                                                 static_cast<const T::raw*>(teacher), out,     \
                                                                 rows, v, kind, inv_t, w, ln_w, ln_1mw);       \
                                 }),                                                                           \
                      err, err_len);
            EMU_PAIRS(EMU_DIV_FWD)
#undef EMU_DIV_FWD
        default:
            return unknown_type(err, err_len, s_code, t_code);
        }
    });
}

// distill_div_bwd_<s>_<t>: student (rows, v), teacher (rows, v), grad_rows (rows,) f32
// -> out (rows, v) in the student's type.
int distill_emu_div_bwd(int s_code, int t_code, const void* student, const void* teacher, const float* grad_rows,
                        void* out, int rows, int v, int kind, float inv_t, float w, float ln_w, float ln_1mw,
                        unsigned int block, char* err, std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code * 10 + t_code) {
#define EMU_DIV_BWD(SN, S, SC, TN, T, TC)                                                                      \
    case SC * 10 + TC:                                                                                         \
        return report(emu_launch((unsigned int)rows, block, 0,                                                 \
                                 [&] {                                                                         \
                                     distill_div_bwd_##SN##_##TN(                                              \
                                         static_cast<const S::raw*>(student),                                  \
                                         static_cast<const T::raw*>(teacher), grad_rows,                       \
                                         static_cast<S::raw*>(out), rows, v, kind, inv_t, w, ln_w, ln_1mw);    \
                                 }),                                                                           \
                      err, err_len);
            EMU_PAIRS(EMU_DIV_BWD)
#undef EMU_DIV_BWD
        default:
            return unknown_type(err, err_len, s_code, t_code);
        }
    });
}

// distill_ce_fwd_<s>: student (rows, v), targets (rows,) -> out (rows,) f32, and *bad
// (which the caller sets to 0) = UINT_MAX - the first row whose target is outside [0, v).
int distill_emu_ce_fwd(int s_code, const void* student, const unsigned int* targets, float* out, unsigned int* bad,
                       int rows, int v, unsigned int block, char* err, std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code) {
#define EMU_CE_FWD(SN, S, SC)                                                                                  \
    case SC:                                                                                                   \
        return report(emu_launch((unsigned int)rows, block, 0,                                                 \
                                 [&] {                                                                         \
                                     distill_ce_fwd_##SN(static_cast<const S::raw*>(student), targets, out,    \
                                                         bad, rows, v);                                        \
                                 }),                                                                           \
                      err, err_len);
            EMU_STUDENTS(EMU_CE_FWD)
#undef EMU_CE_FWD
        default:
            return unknown_type(err, err_len, s_code, 0);
        }
    });
}

// distill_ce_bwd_<s>: student (rows, v), targets (rows,), grad_rows (rows,) f32 ->
// out (rows, v) in the student's type.
int distill_emu_ce_bwd(int s_code, const void* student, const unsigned int* targets, const float* grad_rows,
                       void* out, int rows, int v, unsigned int block, char* err, std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code) {
#define EMU_CE_BWD(SN, S, SC)                                                                                  \
    case SC:                                                                                                   \
        return report(emu_launch((unsigned int)rows, block, 0,                                                 \
                                 [&] {                                                                         \
                                     distill_ce_bwd_##SN(static_cast<const S::raw*>(student), targets,         \
                                                         grad_rows, static_cast<S::raw*>(out), rows, v);       \
                                 }),                                                                           \
                      err, err_len);
            EMU_STUDENTS(EMU_CE_BWD)
#undef EMU_CE_BWD
        default:
            return unknown_type(err, err_len, s_code, 0);
        }
    });
}

// distill_topk_fwd_<s>: student (rows, v), indices (rows, kk) u32, log_probs (rows, kk)
// f32 -> out (rows,) f32, and *bad (set to 0 by the caller) = UINT_MAX - a bad teacher
// row. Dynamic shared memory: `shared` bytes, which the caller takes from distill's
// cuda_top_k_shared_bytes, as loss/cuda.rs does.
int distill_emu_topk_fwd(int s_code, const void* student, const unsigned int* indices, const float* log_probs,
                         float* out, unsigned int* bad, int rows, int v, int kk, int kind, float inv_t, float w,
                         float ln_w, float ln_1mw, unsigned int block, std::size_t shared, char* err,
                         std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code) {
#define EMU_TOPK_FWD(SN, S, SC)                                                                                \
    case SC:                                                                                                   \
        return report(emu_launch((unsigned int)rows, block, shared,                                            \
                                 [&] {                                                                         \
                                     distill_topk_fwd_##SN(static_cast<const S::raw*>(student), indices,       \
                                                           log_probs, out, bad, rows, v, kk, kind, inv_t, w,   \
                                                           ln_w, ln_1mw);                                      \
                                 }),                                                                           \
                      err, err_len);
            EMU_STUDENTS(EMU_TOPK_FWD)
#undef EMU_TOPK_FWD
        default:
            return unknown_type(err, err_len, s_code, 0);
        }
    });
}

// distill_topk_bwd_<s>: the same inputs and grad_rows (rows,) f32 -> out (rows, v) in the
// student's type, and *bad as for the forward (masked rows are not checked).
int distill_emu_topk_bwd(int s_code, const void* student, const unsigned int* indices, const float* log_probs,
                         const float* grad_rows, void* out, unsigned int* bad, int rows, int v, int kk, int kind,
                         float inv_t, float w, float ln_w, float ln_1mw, unsigned int block, std::size_t shared,
                         char* err, std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (s_code) {
#define EMU_TOPK_BWD(SN, S, SC)                                                                                \
    case SC:                                                                                                   \
        return report(emu_launch((unsigned int)rows, block, shared,                                            \
                                 [&] {                                                                         \
                                     distill_topk_bwd_##SN(static_cast<const S::raw*>(student), indices,       \
                                                           log_probs, grad_rows, static_cast<S::raw*>(out),    \
                                                           bad, rows, v, kk, kind, inv_t, w, ln_w, ln_1mw);    \
                                 }),                                                                           \
                      err, err_len);
            EMU_STUDENTS(EMU_TOPK_BWD)
#undef EMU_TOPK_BWD
        default:
            return unknown_type(err, err_len, s_code, 0);
        }
    });
}

// The header's f16 conversions, for tests against the `half` crate.
unsigned short distill_emu_f32_to_f16_bits(float f) {
    return distill_emu_f32_to_f16(f);
}

float distill_emu_f16_bits_to_f32(unsigned short h) {
    return distill_emu_f16_to_f32(h);
}

} // extern "C"

// ---------------------------------------------------------------------------
// Kernels that test the emulator itself: that it gives the CUDA results of shuffles and
// dynamic shared memory, and that it reports misuse instead of hanging.
// ---------------------------------------------------------------------------

namespace {

// Per thread, 4 floats of `out` (grid * block * 4): the warp sum of (global id + 1) by an
// xor butterfly, the next lane's value by __shfl_down_sync (own value for lane 31), lane
// 0's value by __shfl_sync, and 1 if __ballot_sync of "lane is odd" is 0xaaaaaaaa.
__global__ void selftest_shuffles(float* out) {
    const unsigned int id = blockIdx.x * blockDim.x + threadIdx.x;
    const float mine = (float)(id + 1);
    float sum = mine;
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    out[4 * id + 0] = sum;
    out[4 * id + 1] = __shfl_down_sync(0xffffffffu, mine, 1);
    out[4 * id + 2] = __shfl_sync(0xffffffffu, mine, 0);
    out[4 * id + 3] = __ballot_sync(0xffffffffu, (int)(threadIdx.x & 1u)) == 0xaaaaaaaau ? 1.0f : 0.0f;
}

// Warp 0 returns; the other warps meet at a barrier that can never complete on a GPU.
__global__ void selftest_divergent_barrier(float* out) {
    if (threadIdx.x < 32) {
        return;
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Half of warp 0 shuffles while the other half waits at __syncthreads: a deadlock.
__global__ void selftest_split_warp(float* out) {
    if ((threadIdx.x & 31u) < 16) {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    } else {
        __syncthreads();
    }
}

// Per thread, 2 floats of `out` (block * 2): dynamic shared memory as found (NaN: the
// emulator fills it with 0xff bytes), then the value the mirror thread stored.
__global__ void selftest_dynamic_shared(float* out) {
    DISTILL_DYNAMIC_SHARED(float, smem);
    const unsigned int t = threadIdx.x;
    out[2 * t] = smem[t];
    __syncthreads();
    smem[t] = (float)t;
    __syncthreads();
    out[2 * t + 1] = smem[blockDim.x - 1 - t];
}

} // namespace

extern "C" int distill_emu_selftest(int which, unsigned int grid, unsigned int block, float* out, char* err,
                                    std::size_t err_len) {
    return guarded(err, err_len, [&]() -> int {
        switch (which) {
        case 0:
            return report(emu_launch(grid, block, 0, [&] { selftest_shuffles(out); }), err, err_len);
        case 1:
            return report(emu_launch(grid, block, 0, [&] { selftest_divergent_barrier(out); }), err, err_len);
        case 2:
            return report(emu_launch(grid, block, 0, [&] { selftest_split_warp(out); }), err, err_len);
        case 3:
            return report(emu_launch(grid, block, block * sizeof(float), [&] { selftest_dynamic_shared(out); }), err,
                          err_len);
        default:
            return report("no self-test " + std::to_string(which), err, err_len);
        }
    });
}
