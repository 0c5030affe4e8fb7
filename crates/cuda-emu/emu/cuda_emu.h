// A CPU stand-in for the CUDA built-ins that crates/distill/src/kernels/divergence.cu
// uses, so that the very same file compiles as host C++20 (g++ 12) and its kernels run
// with real CUDA thread semantics: one std::thread per CUDA thread, real barriers for
// __syncthreads, per-warp exchanges for the shuffles.
//
// How a launch runs (emu_launch, at the end):
//   - blocks run one after another, in blockIdx order; the blockDim.x threads of a block
//     run at once, each on an OS thread of its own (std::thread workers, started once and
//     reused by every block), and all have finished before the next block starts;
//   - so a function-local `static` array is the block's shared memory (__shared__ is
//     `static`), and a global mutex lets only one launch run in the process at a time;
//   - threadIdx, blockIdx, blockDim and gridDim are thread_local, set as each thread starts.
//
// Mistakes a GPU would hide or turn into hangs become errors of the launch, returned as
// text: a __syncthreads() reached after some thread of the block returned, a thread that
// returns while others wait at a barrier, a shuffle in a warp with a returned lane, a
// shuffle with a partial mask, and any state where every live thread waits (deadlock).
// The waiting threads are then unwound with an exception, so nothing hangs.
//
// Not emulated: the GPU's memory model (the host's is stronger: build with
// ThreadSanitizer, see build.rs, to find accesses that no barrier orders), concurrent
// blocks (they run in order, so races between blocks through global memory go
// unseen), timing, lock-step warps (a warp agrees only at explicit shuffles and
// __syncwarp), partial shuffle masks and widths below 32, and out-of-bounds accesses
// (plain host pointers).

#pragma once

#include <math.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Declaration specifiers. __shared__ is `static`: blocks run one at a time, so a
// function-local static is what the block's threads share.
// ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// Dynamic shared memory: on CUDA `extern __shared__ type name[]`; here the launch's
// buffer of `shared_bytes` (8-byte aligned, filled with 0xff bytes at the start of each
// block, so that a float read before any write is NaN).
#define DISTILL_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(distill_emu_dynamic_shared())

namespace distill_emu {

struct Index3 {
    unsigned int x = 0, y = 0, z = 0;
};

// Thrown inside kernel threads to unwind them once their block has failed.
struct Abort {};

// The barriers of one block. Each barrier, the block's and each warp's, has a mutex of
// its own for its arrivals and an atomic generation counter (a futex) to wait on, so a
// completed barrier wakes its threads without their queueing for a mutex again (a
// block's threads are many more than the cores, and every barrier has to schedule each
// of them once).
//
// Separate barriers also keep the emulator from ordering more than CUDA does: a
// barrier makes its own threads' earlier accesses visible to each other, and nothing
// else, so ThreadSanitizer (build.rs) sees any other pair of conflicting accesses to
// shared memory as the race it is on a GPU. For the same reason the counts that find
// deadlocks (threads alive, threads waiting) are relaxed atomics, which order nothing.
class Block {
  public:
    explicit Block(unsigned int threads)
        : threads_(threads), warps_(threads / 32), warp_(new Warp[warps_]), exchange_(2 * threads, 0) {
        counts_.store(pack(threads, 0), std::memory_order_relaxed);
    }

    // __syncthreads(): every thread of the block, none of them returned.
    void sync_block() {
        check_failed();
        const unsigned int live = live_of(counts_.load(std::memory_order_relaxed));
        if (live != threads_) {
            fail("__syncthreads() reached after " + std::to_string(threads_ - live) + " of the block's " +
                 std::to_string(threads_) + " threads returned: a barrier in code that not every thread runs");
        }
        arrive_and_wait(block_, threads_, "__syncthreads()");
    }

    // A barrier over the 32 lanes of one warp (shuffles, __syncwarp).
    void sync_warp(unsigned int warp, const char* what) {
        check_failed();
        const unsigned int live = warp_[warp].live.load(std::memory_order_relaxed);
        if (live != 32) {
            fail(std::string(what) + " in warp " + std::to_string(warp) + " after " + std::to_string(32 - live) +
                 " of its lanes returned");
        }
        arrive_and_wait(warp_[warp].barrier, 32, what);
    }

    // Exchanges one 8-byte value per lane: lane `lane` of warp `warp` offers `mine`;
    // returns the warp's 32 offers, to be read before the lane's next exchange. Two
    // buffers alternate, so one barrier per exchange is enough: a lane can write the
    // other buffer while its warp still reads this one, and can come back to this one
    // only after the next barrier, which every lane passes after reading.
    const std::uint64_t* exchange(unsigned int warp, unsigned int lane, std::uint64_t mine, const char* what) {
        unsigned int& parity = tl_parity();
        std::uint64_t* buf = &exchange_[(2 * warp + parity) * 32];
        parity ^= 1u;
        buf[lane] = mine;
        sync_warp(warp, what);
        return buf;
    }

    // Called once by each thread when its kernel body has returned (or unwound). A
    // barrier some thread waits at can then no longer complete; the deadlock check
    // finds that once every other live thread waits too.
    void exit_thread(unsigned int tid) {
        warp_[tid / 32].live.fetch_sub(1, std::memory_order_relaxed);
        const std::uint64_t c = counts_.fetch_sub(pack(1, 0), std::memory_order_relaxed) - pack(1, 0);
        if (live_of(c) > 0 && waiting_of(c) == live_of(c)) {
            fail_quiet("thread " + std::to_string(tid) + " returned while every other live thread (" +
                       std::to_string(live_of(c)) +
                       ") waits at a barrier, which can then never complete: a __syncthreads() or shuffle "
                       "in code that not every thread runs");
        }
    }

    // Records an error and unwinds the calling thread.
    [[noreturn]] void fail(const std::string& why) {
        fail_quiet(why);
        throw Abort{};
    }

    // Records the block's first error and wakes every waiting thread, which unwinds.
    void fail_quiet(const std::string& why) {
        {
            std::lock_guard<std::mutex> lk(error_mutex_);
            if (!failed_.load(std::memory_order_relaxed)) {
                error_ = why;
                failed_.store(true, std::memory_order_release);
            }
        }
        wake_all(block_);
        for (unsigned int w = 0; w < warps_; ++w) {
            wake_all(warp_[w].barrier);
        }
    }

    bool failed() const {
        return failed_.load(std::memory_order_acquire);
    }

    std::string error() {
        std::lock_guard<std::mutex> lk(error_mutex_);
        return error_;
    }

    // Which of the two exchange buffers this thread uses next.
    static unsigned int& tl_parity() {
        thread_local unsigned int parity = 0;
        return parity;
    }

  private:
    struct Barrier {
        std::mutex m;
        unsigned int arrived = 0; // guarded by m
        std::atomic<std::uint32_t> gen{0};
    };

    struct Warp {
        Barrier barrier;
        std::atomic<unsigned int> live{32};
    };

    // (live, waiting) in one atomic, so that one read sees both as they were together.
    static std::uint64_t pack(unsigned int live, unsigned int waiting) {
        return ((std::uint64_t)live << 32) | waiting;
    }
    static unsigned int live_of(std::uint64_t c) {
        return (unsigned int)(c >> 32);
    }
    static unsigned int waiting_of(std::uint64_t c) {
        return (unsigned int)(c & 0xffffffffu);
    }

    void check_failed() {
        if (failed_.load(std::memory_order_acquire)) {
            throw Abort{};
        }
    }

    // The barrier's `count`-th arrival releases the others; the earlier ones wait.
    // Waiting threads are counted: a thread that is about to wait when every other live
    // thread already waits would wait forever, and so would they.
    void arrive_and_wait(Barrier& b, unsigned int count, const char* what) {
        std::uint32_t gen;
        {
            std::lock_guard<std::mutex> lk(b.m);
            check_failed(); // again: the block may have failed while this thread took the mutex
            gen = b.gen.load(std::memory_order_relaxed);
            if (++b.arrived == count) {
                b.arrived = 0;
                counts_.fetch_sub(pack(0, count - 1), std::memory_order_relaxed); // the waiters, released
                b.gen.store(gen + 1, std::memory_order_release);
                b.gen.notify_all();
                return;
            }
            const std::uint64_t c = counts_.fetch_add(pack(0, 1), std::memory_order_relaxed) + pack(0, 1);
            if (waiting_of(c) == live_of(c)) {
                b.arrived -= 1;
                fail(std::string("deadlock at ") + what + ": every live thread of the block (" +
                     std::to_string(live_of(c)) +
                     ") waits, at barriers that cannot complete: e.g. a shuffle that only part of a warp runs, "
                     "or a __syncthreads() inside a branch");
            }
        }
        // A few yields first: on a busy CPU the barrier often completes within them,
        // which is cheaper than sleeping on the futex.
        for (int i = 0; i < 64 && b.gen.load(std::memory_order_acquire) == gen; ++i) {
            std::this_thread::yield();
        }
        while (b.gen.load(std::memory_order_acquire) == gen) {
            b.gen.wait(gen, std::memory_order_acquire);
        }
        check_failed();
    }

    static void wake_all(Barrier& b) {
        b.gen.fetch_add(1, std::memory_order_relaxed);
        b.gen.notify_all();
    }

    const unsigned int threads_;
    const unsigned int warps_;
    std::atomic<std::uint64_t> counts_{0}; // (live, waiting): see pack
    Barrier block_;
    std::unique_ptr<Warp[]> warp_;
    std::vector<std::uint64_t> exchange_; // (warps, 2, 32)
    std::atomic<bool> failed_{false};
    std::mutex error_mutex_;
    std::string error_; // guarded by error_mutex_
};

// The running thread's block, and the launch's dynamic shared memory.
inline thread_local Block* tl_block = nullptr;
inline unsigned char* g_dynamic_shared = nullptr;

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

// The OS threads that run CUDA threads: worker t runs thread t of every block, so a
// block of B threads runs on B distinct, concurrently live OS threads, as if each block
// had started its own. Starting a thread costs about 60 us on the development machine,
// two thirds of what a block of the divergence kernels costs otherwise, so workers are
// started once, when a launch first needs them, and kept (detached, never destroyed)
// for the life of the process. Used under launch_mutex() only.
class Pool {
  public:
    // Runs job(ctx, t) on workers t = 0 .. n - 1 at once and waits for all of them.
    // Throws (std::system_error) if a worker cannot be started; nothing runs then.
    void run(unsigned int n, void (*job)(void*, unsigned int), void* ctx) {
        while (workers_.size() < n) {
            auto w = std::make_unique<Worker>();
            Worker* wp = w.get();
            const unsigned int t = (unsigned int)workers_.size();
            std::thread(&Pool::loop, this, wp, t).detach();
            workers_.push_back(std::move(w));
        }
        job_ = job;
        ctx_ = ctx;
        remaining_.store(n, std::memory_order_release);
        for (unsigned int t = 0; t < n; ++t) {
            workers_[t]->go.fetch_add(1, std::memory_order_release);
            workers_[t]->go.notify_one();
        }
        for (unsigned int r = remaining_.load(std::memory_order_acquire); r != 0;
             r = remaining_.load(std::memory_order_acquire)) {
            remaining_.wait(r, std::memory_order_acquire);
        }
    }

    static Pool& get() {
        static Pool* pool = new Pool(); // never destroyed: its threads outlive main
        return *pool;
    }

  private:
    struct Worker {
        std::atomic<std::uint32_t> go{0}; // bumped once per job
    };

    void loop(Worker* w, unsigned int t) {
        std::uint32_t seen = 0;
        for (;;) {
            while (w->go.load(std::memory_order_acquire) == seen) {
                w->go.wait(seen, std::memory_order_acquire);
            }
            seen = w->go.load(std::memory_order_acquire);
            job_(ctx_, t);
            // Release only: the launcher waits for every worker, but one worker's end
            // orders nothing in another's (which would hide races from TSan).
            if (remaining_.fetch_sub(1, std::memory_order_release) == 1) {
                remaining_.notify_all();
            }
        }
    }

    std::vector<std::unique_ptr<Worker>> workers_;
    void (*job_)(void*, unsigned int) = nullptr;
    void* ctx_ = nullptr;
    std::atomic<unsigned int> remaining_{0};
};

} // namespace distill_emu

// ---------------------------------------------------------------------------
// Built-in variables (per thread).
// ---------------------------------------------------------------------------

inline thread_local distill_emu::Index3 threadIdx;
inline thread_local distill_emu::Index3 blockIdx;
inline thread_local distill_emu::Index3 blockDim;
inline thread_local distill_emu::Index3 gridDim;

inline void* distill_emu_dynamic_shared() {
    return distill_emu::g_dynamic_shared;
}

// ---------------------------------------------------------------------------
// Synchronisation and warp exchange. Full warps only: mask 0xffffffff, width 32.
// ---------------------------------------------------------------------------

inline void __syncthreads() {
    distill_emu::tl_block->sync_block();
}

namespace distill_emu {

inline void check_mask(unsigned int mask, const char* what) {
    if (mask != 0xffffffffu) {
        tl_block->fail(std::string(what) + ": only the full-warp mask 0xffffffff is emulated");
    }
}

// Lane `src`'s value of `v`, for every lane of the warp (src outside [0, 32): own value).
template <class T>
inline T shuffle_from(T v, int src, const char* what) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    std::uint64_t mine = 0;
    std::memcpy(&mine, &v, sizeof(T));
    const unsigned int from = (src >= 0 && src < 32) ? (unsigned int)src : lane;
    const std::uint64_t got = tl_block->exchange(warp, lane, mine, what)[from];
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

} // namespace distill_emu

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    distill_emu::check_mask(mask, "__syncwarp");
    distill_emu::tl_block->sync_warp(threadIdx.x >> 5, "__syncwarp");
}

template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    distill_emu::check_mask(mask, "__shfl_xor_sync");
    if (width != 32 || lane_mask < 0 || lane_mask > 31) {
        distill_emu::tl_block->fail("__shfl_xor_sync: only width 32 and lane masks in [0, 32) are emulated");
    }
    return distill_emu::shuffle_from(v, (int)(threadIdx.x & 31u) ^ lane_mask, "__shfl_xor_sync");
}

template <class T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32) {
    distill_emu::check_mask(mask, "__shfl_sync");
    if (width != 32) {
        distill_emu::tl_block->fail("__shfl_sync: only width 32 is emulated");
    }
    return distill_emu::shuffle_from(v, src_lane & 31, "__shfl_sync");
}

template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    distill_emu::check_mask(mask, "__shfl_down_sync");
    if (width != 32) {
        distill_emu::tl_block->fail("__shfl_down_sync: only width 32 is emulated");
    }
    return distill_emu::shuffle_from(v, (int)((threadIdx.x & 31u) + delta), "__shfl_down_sync");
}

template <class T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    distill_emu::check_mask(mask, "__shfl_up_sync");
    if (width != 32) {
        distill_emu::tl_block->fail("__shfl_up_sync: only width 32 is emulated");
    }
    return distill_emu::shuffle_from(v, (int)(threadIdx.x & 31u) - (int)delta, "__shfl_up_sync");
}

// One bit per lane whose predicate is nonzero, for every lane of the warp.
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    distill_emu::check_mask(mask, "__ballot_sync");
    const std::uint64_t* all =
        distill_emu::tl_block->exchange(threadIdx.x >> 5, threadIdx.x & 31u, predicate != 0 ? 1 : 0, "__ballot_sync");
    unsigned int bits = 0;
    for (unsigned int lane = 0; lane < 32; ++lane) {
        bits |= (unsigned int)all[lane] << lane;
    }
    return bits;
}

inline int __any_sync(unsigned int mask, int predicate) {
    return __ballot_sync(mask, predicate) != 0;
}

inline int __all_sync(unsigned int mask, int predicate) {
    return __ballot_sync(mask, predicate) == 0xffffffffu;
}

// ---------------------------------------------------------------------------
// Bit casts and atomics.
// ---------------------------------------------------------------------------

inline float __uint_as_float(unsigned int u) {
    return std::bit_cast<float>(u);
}
inline unsigned int __float_as_uint(float f) {
    return std::bit_cast<unsigned int>(f);
}
inline float __int_as_float(int i) {
    return std::bit_cast<float>(i);
}
inline int __float_as_int(float f) {
    return std::bit_cast<int>(f);
}

template <class T>
inline T atomicMax(T* address, T value) {
    static_assert(std::is_integral_v<T>, "atomicMax is emulated for integers");
    std::atomic_ref<T> a(*address);
    T old = a.load();
    while (old < value && !a.compare_exchange_weak(old, value)) {
    }
    return old;
}

template <class T>
inline T atomicMin(T* address, T value) {
    static_assert(std::is_integral_v<T>, "atomicMin is emulated for integers");
    std::atomic_ref<T> a(*address);
    T old = a.load();
    while (value < old && !a.compare_exchange_weak(old, value)) {
    }
    return old;
}

template <class T>
inline T atomicAdd(T* address, T value) {
    std::atomic_ref<T> a(*address);
    T old = a.load();
    while (!a.compare_exchange_weak(old, old + value)) {
    }
    return old;
}

template <class T>
inline T atomicExch(T* address, T value) {
    return std::atomic_ref<T>(*address).exchange(value);
}

template <class T>
inline T atomicCAS(T* address, T compare, T value) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare; // the old value, whether or not it was replaced
}

// CUDA's integer min and max (device functions with no std:: prefix).
inline int min(int a, int b) {
    return a < b ? a : b;
}
inline int max(int a, int b) {
    return a > b ? a : b;
}
inline unsigned int min(unsigned int a, unsigned int b) {
    return a < b ? a : b;
}
inline unsigned int max(unsigned int a, unsigned int b) {
    return a > b ? a : b;
}

// ---------------------------------------------------------------------------
// f16 <-> f32, the two conversions divergence.cu calls under DISTILL_CUDA_EMU in place
// of its PTX cvt instructions. Same results as the `half` crate: round to nearest even,
// subnormals, overflow to inf, NaN stays NaN (quiet, top payload bits kept).
// ---------------------------------------------------------------------------

inline unsigned short distill_emu_f32_to_f16(float f) {
    const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t exp = (x >> 23) & 0xffu;
    const std::uint32_t man = x & 0x7fffffu;
    if (exp == 0xffu) {
        // inf stays inf; NaN gets the quiet bit and keeps its top 10 payload bits.
        return (unsigned short)(sign | 0x7c00u | (man != 0 ? 0x0200u | (man >> 13) : 0u));
    }
    const int e = (int)exp - 127 + 15; // the biased f16 exponent
    if (e >= 31) {
        return (unsigned short)(sign | 0x7c00u);
    }
    // The result as an integer count of f16 units, before rounding: `kept`, plus the
    // dropped bits `rest` out of `1 << drop`.
    std::uint32_t kept;
    std::uint32_t rest;
    int drop;
    if (e >= 1) {
        drop = 13;
        kept = ((std::uint32_t)e << 10) | (man >> 13); // exponent and mantissa together
        rest = man & 0x1fffu;
    } else {
        // Subnormal f16: units of 2^-24. The f32 value is (man | 1 << 23) * 2^(exp - 150),
        // i.e. (man | 1 << 23) >> (14 - e) units.
        drop = 14 - e;
        if (drop > 24) {
            return (unsigned short)sign; // below half the smallest subnormal: +-0
        }
        const std::uint32_t full = man | 0x800000u;
        kept = full >> drop;
        rest = full & ((1u << drop) - 1u);
    }
    const std::uint32_t half_unit = 1u << (drop - 1);
    if (rest > half_unit || (rest == half_unit && (kept & 1u) != 0)) {
        kept += 1; // a carry moves into the exponent, up to inf, which is right
    }
    return (unsigned short)(sign | kept);
}

inline float distill_emu_f16_to_f32(unsigned short h) {
    const std::uint32_t sign = ((std::uint32_t)h & 0x8000u) << 16;
    const std::uint32_t exp = ((std::uint32_t)h >> 10) & 0x1fu;
    const std::uint32_t man = (std::uint32_t)h & 0x3ffu;
    if (exp == 0x1fu) {
        return std::bit_cast<float>(sign | 0x7f800000u | (man != 0 ? 0x400000u | (man << 13) : 0u));
    }
    if (exp == 0) {
        // Zero or subnormal: man * 2^-24, exact in f32 (a power-of-two scale of a small integer).
        const float mag = (float)man * 0x1p-24f;
        return sign != 0 ? -mag : mag;
    }
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
}

// ---------------------------------------------------------------------------
// Launch.
// ---------------------------------------------------------------------------

// Runs `kernel` (a callable with no arguments that calls the __global__ function) on a
// grid of grid_x blocks of block_x threads with `shared_bytes` of dynamic shared memory.
// Blocks run one after another; each block's threads run at once, one OS thread each.
// Returns "" on success, else what went wrong (the launch configuration, or the first
// error of the first failing block; later blocks do not run).
template <class Kernel>
std::string emu_launch(unsigned int grid_x, unsigned int block_x, std::size_t shared_bytes, Kernel&& kernel) {
    using namespace distill_emu;
    std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex());
    if (block_x == 0 || block_x % 32 != 0 || block_x > 1024) {
        return "block of " + std::to_string(block_x) +
               " threads: the kernels need a multiple of 32 (whole warps), at most 1024";
    }
    if (grid_x == 0) {
        return "grid of 0 blocks: CUDA rejects an empty launch";
    }
    std::vector<std::uint64_t> dynamic((shared_bytes + 7) / 8); // 8-byte aligned
    g_dynamic_shared = shared_bytes > 0 ? reinterpret_cast<unsigned char*>(dynamic.data()) : nullptr;
    // What each worker needs to run thread t of the current block.
    struct Current {
        std::remove_reference_t<Kernel>* kernel;
        Block* block;
        unsigned int b, grid_x, block_x;
    };
    const auto thread_body = [](void* ctx, unsigned int t) {
        const Current& c = *static_cast<const Current*>(ctx);
        tl_block = c.block;
        Block::tl_parity() = 0;
        threadIdx = {t, 0, 0};
        blockIdx = {c.b, 0, 0};
        blockDim = {c.block_x, 1, 1};
        gridDim = {c.grid_x, 1, 1};
        try {
            (*c.kernel)();
        } catch (const Abort&) {
            // The block failed; its error is recorded.
        } catch (const std::exception& e) {
            c.block->fail_quiet(std::string("exception in kernel code: ") + e.what());
        } catch (...) {
            c.block->fail_quiet("unknown exception in kernel code");
        }
        c.block->exit_thread(t);
        tl_block = nullptr;
    };
    std::string error;
    for (unsigned int b = 0; b < grid_x && error.empty(); ++b) {
        if (shared_bytes > 0) {
            std::memset(dynamic.data(), 0xff, dynamic.size() * 8);
        }
        Block block(block_x);
        Current current{&kernel, &block, b, grid_x, block_x};
        try {
            Pool::get().run(block_x, thread_body, &current);
        } catch (const std::exception& e) {
            error = std::string("could not start the block's threads: ") + e.what();
            break;
        }
        if (block.failed()) {
            error = "block " + std::to_string(b) + " of " + std::to_string(grid_x) + " (" + std::to_string(block_x) +
                    " threads): " + block.error();
        }
    }
    g_dynamic_shared = nullptr;
    return error;
}
