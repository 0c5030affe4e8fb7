#!/usr/bin/env bash
# The CUDA part of CI, without a GPU:
#  1. the CUDA 13.0 compiler pieces from PyPI wheels (.venv-cuda/, reused when present);
#  2. our kernels compiled with NVRTC and assembled with ptxas for sm_80 and sm_90;
#  3. the whole workspace linted with the CUDA backend (and NCCL) by clippy;
#  4. the `cuda` build linked and every CPU test run with it: CUDA binaries are linked
#     against libcuda, cuBLAS, cuRAND and NCCL, which this machine lacks, so the link
#     and the tests use stand-ins made by scripts/cuda-stubs.py from cudarc's own
#     declarations (every call fails; docs/gpu.md). Tests that need a GPU skip
#     themselves with a message; `distill --device cuda` must fail naming the driver.
# A separate target dir keeps the CPU build cache valid. On 2 cores, cold: ~12 minutes for
# step 3 (candle-kernels compiles its PTX with nvcc) and ~25 more for step 4 (nvcc runs
# again for the build's own candle-kernels unit, then the tests); see README, GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
# (Assigned first: `eval "$(...)"` alone would hide the script's failure from set -e.)
cuda_env=$(scripts/cuda-toolchain.sh)
eval "$cuda_env"
python3 scripts/check_cuda_kernels.py

target=${CUDA_TARGET_DIR:-target/cuda}
# Clippy, not just check: lints that only fire in the CUDA code (NCCL's communicator is
# not Send, say) fail here as they would in the CPU build. With MPI installed (.ci/run
# installs it first), the NCCL id exchange over MPI is checked too.
features=cuda
if dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    features=cuda,mpi
fi
CARGO_TARGET_DIR="$target" cargo clippy --workspace --all-targets --features "$features" -- -D warnings

# Link-only stand-ins for libcuda.so.1, libcublas(Lt).so.13, libcurand.so.10 and
# libnccl.so.2, first on the link and load paths of this script only. NVRTC and cudart
# are the real ones from the wheels. Never install these where a GPU is.
stubs=$(python3 scripts/cuda-stubs.py "$target/cuda-stubs")
export LIBRARY_PATH="$stubs:$LIBRARY_PATH"
export LD_LIBRARY_PATH="$stubs:$LD_LIBRARY_PATH"

# Every test of the workspace, in the cuda build: the same features as clippy above, so
# the dependencies are resolved alike (the build still compiles its own copies: clippy
# only type-checks).
start=$(date +%s)
CARGO_TARGET_DIR="$target" cargo test --workspace --features "$features" --no-run
built=$(date +%s)
CARGO_TARGET_DIR="$target" cargo test --workspace --features "$features"
tested=$(date +%s)

# The binary itself, for the log: what it loads, and its refusal of --device cuda here.
bin="$target/debug/distill"
echo "ci-cuda: $bin needs:"
ldd "$bin" | grep -E 'libcuda|libcublas|libcurand|libnccl|libnvrtc|libcudart' | sed 's/^/    /'
out=$(mktemp -d)
if "$bin" --config configs/tiny.toml --device cuda --out-dir "$out" 2>"$out/stderr"; then
    echo "ci-cuda: distill --device cuda succeeded without a GPU; it must refuse" >&2
    exit 1
fi
echo "ci-cuda: distill --device cuda, as expected without a GPU: $(cat "$out/stderr")"
if [ -e "$out/tiny" ]; then
    echo "ci-cuda: the refused run still wrote $out/tiny" >&2
    exit 1
fi
rm -rf "$out"
echo "ci-cuda: cuda build $((built - start)) s, its tests $((tested - built)) s"
