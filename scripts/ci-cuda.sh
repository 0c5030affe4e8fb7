#!/usr/bin/env bash
# The CUDA part of CI, without a GPU:
#  1. the CUDA 13.0 compiler pieces from PyPI wheels (.venv-cuda/, reused when present);
#  2. our kernels compiled with NVRTC and assembled with ptxas for sm_80 and sm_90;
#  3. the whole workspace built with the CUDA backend (and NCCL) and linted by clippy as
#     it compiles, then every test of the workspace run with that build. CUDA binaries
#     are linked against libcuda, cuBLAS, cuRAND and NCCL, which this machine lacks, so
#     the link and the tests use stand-ins made by scripts/cuda-stubs.py from cudarc's
#     own declarations (every call fails; docs/gpu.md). Tests that need a GPU skip
#     themselves with a message; `distill --device cuda` must fail naming the driver.
# A separate target dir keeps the CPU build cache valid. Measured times: docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# (Assigned first: `eval "$(...)"` alone would hide the script's failure from set -e.)
cuda_env=$(scripts/cuda-toolchain.sh)
eval "$cuda_env"
python3 scripts/check_cuda_kernels.py

export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
# With MPI installed (.ci/run installs it first), the NCCL id exchange over MPI is built,
# linted and tested too.
features=cuda
if dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    features=cuda,mpi
fi

# Link-only stand-ins for libcuda.so.1, libcublas(Lt).so.13, libcurand.so.10 and
# libnccl.so.2, first on the link and load paths of this script only. NVRTC and cudart
# are the real ones from the wheels. Never install these where a GPU is.
stubs=$(python3 scripts/cuda-stubs.py "$CARGO_TARGET_DIR/cuda-stubs")
export LIBRARY_PATH="$stubs:$LIBRARY_PATH"
export LD_LIBRARY_PATH="$stubs:$LD_LIBRARY_PATH"

# Clippy's lints, with -D warnings, in the build itself: clippy-driver compiles our crates
# (`cargo clippy` is this wrapper over `cargo check`). Not a separate `cargo clippy`: a check
# build compiles the build scripts' dependencies apart from a real build's, so candle-kernels'
# nvcc step (3.5 minutes on 2 cores) would run twice, and every dependency would be compiled
# twice.
# Lints that only fire in the CUDA code (NCCL's communicator is not Send, say) fail here as
# they would in the CPU build. Line tables, not full debug info: backtraces keep file:line
# and the ~12 test binaries link in a fraction of the time.
export RUSTC_WORKSPACE_WRAPPER=${CLIPPY_DRIVER:-clippy-driver}
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" # cargo-clippy's encoding of `-- -D warnings`
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
# candle-kernels' build script (cudaforge) runs nvcc on half the cores unless told otherwise;
# on 2 cores that is one file at a time: 287 s for its 26 compilations, 210 s on both.
CUDAFORGE_THREADS=$(nproc)
export CUDAFORGE_THREADS
command -v "$RUSTC_WORKSPACE_WRAPPER" >/dev/null || {
    echo "ci-cuda: no $RUSTC_WORKSPACE_WRAPPER (rustup component add clippy)" >&2
    exit 1
}
start=$(date +%s)
cargo build --workspace --all-targets --features "$features"
built=$(date +%s)
# Every test of the workspace with that build (the same settings: nothing is rebuilt).
cargo test --workspace --features "$features"
tested=$(date +%s)

# The binary itself, for the log: what it loads, and its refusal of --device cuda here.
bin="$CARGO_TARGET_DIR/debug/distill"
echo "ci-cuda: $bin needs:"
ldd "$bin" | grep -E 'libcuda|libcublas|libcurand|libnccl|libnvrtc|libcudart' | sed 's/^/    /'
out=$(mktemp -d)
rc=0
"$bin" --config configs/tiny.toml --device cuda --out-dir "$out" 2>"$out/stderr" || rc=$?
if [ "$rc" -ne 5 ]; then
    echo "ci-cuda: distill --device cuda exited $rc without a GPU; it must refuse with 5 (a device error)" >&2
    cat "$out/stderr" >&2
    exit 1
fi
echo "ci-cuda: distill --device cuda, as expected without a GPU: $(cat "$out/stderr")"
if [ -e "$out/tiny" ]; then
    echo "ci-cuda: the refused run still wrote $out/tiny" >&2
    exit 1
fi
rm -rf "$out"
echo "ci-cuda: cuda build and lints $((built - start)) s, the workspace's tests with it $((tested - built)) s"
