#!/usr/bin/env bash
# The CUDA part of CI, without a GPU: the CUDA 13.0 compiler pieces from PyPI wheels
# (.venv-cuda/, reused when present), our kernels compiled with NVRTC and assembled with
# ptxas for sm_80 and sm_90, and the whole workspace type-checked with the CUDA backend
# (and NCCL) by clippy. Linking needs libcuda, which this machine lacks, so this checks
# and does not build. A separate target dir keeps the CPU build cache valid; the first run takes
# ~12 minutes on 2 cores (candle-kernels compiles its PTX with nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
# (Assigned first: `eval "$(...)"` alone would hide the script's failure from set -e.)
cuda_env=$(scripts/cuda-toolchain.sh)
eval "$cuda_env"
python3 scripts/check_cuda_kernels.py
# Clippy, not just check: lints that only fire in the CUDA code (NCCL's communicator is
# not Send, say) fail here as they would in the CPU build. With MPI installed (.ci/run
# installs it first), the NCCL id exchange over MPI is checked too.
features=cuda
if dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    features=cuda,mpi
fi
CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-target/cuda}" cargo clippy --workspace --all-targets --features "$features" -- -D warnings
