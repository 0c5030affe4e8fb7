#!/usr/bin/env bash
# The CUDA 13.0 compiler pieces that `cargo check --features cuda` and
# scripts/check_cuda_kernels.py need, on a machine with no GPU and no CUDA install:
# nvcc, ptxas, NVVM, the CUDA headers and NVRTC, all from NVIDIA's PyPI wheels,
# installed into a virtualenv that git ignores (.venv-cuda/ at the repo root).
#
# Usage:  eval "$(scripts/cuda-toolchain.sh)"             # compile, type-check, check kernels
#         eval "$(scripts/cuda-toolchain.sh --runtime)"   # + what a GPU box needs to link and run
#
# Progress goes to stderr; stdout is only the `export` lines (PATH, CUDA_ROOT,
# CUDA_PATH, CUDA_COMPUTE_CAP, LD_LIBRARY_PATH, LIBRARY_PATH). A folder that already holds exactly
# these pins is reused without touching the network. DISTILL_CUDA_VENV picks another
# folder; DISTILL_CUDA_COMPUTE_CAP another compute capability (default 90, H100/H200).
#
# Why these pins (docs/design.md, "CUDA without a GPU"): nvvm and crt must match
# nvcc's 13.0; unpinned they come as 13.5, whose PTX (.version 9.5) the 13.0 ptxas
# rejects. NVRTC 13.0 compiles our own kernels (src/kernels/*.cu) to PTX.
# Linking a CUDA binary also needs -lnvrtc and -lcudart (the wheels ship only the
# versioned .so.13 files: $VENV/link/ holds the unversioned names a -dev package would
# add, on LIBRARY_PATH), and libcuda, cuBLAS, cuRAND and NCCL. --runtime installs the
# CUDA 13.0 cuBLAS and cuRAND wheels and NCCL 2.30 (the version cudarc's bindings
# declare; ~700 MB), links their names too, and links libcuda.so to the driver's
# libcuda.so.1 where one is installed (the driver ships no unversioned name either).
# CI, with no driver, links against stand-ins instead (scripts/cuda-stubs.py).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${DISTILL_CUDA_VENV:-$ROOT/.venv-cuda}
CAP=${DISTILL_CUDA_COMPUTE_CAP:-90}
PYTHON=${PYTHON:-python3}
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-nvrtc==13.0.88
)
STAMP=$VENV/.distill-cuda-pins
RUNTIME_PINS=(
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
    nvidia-nccl-cu13==2.30.7
)
RUNTIME_STAMP=$VENV/.distill-cuda-runtime-pins
RUNTIME=0
for arg in "$@"; do
    case "$arg" in
    --runtime) RUNTIME=1 ;;
    *)
        echo "cuda-toolchain: unknown argument $arg (only --runtime)" >&2
        exit 2
        ;;
    esac
done

log() { echo "cuda-toolchain: $*" >&2; }

# The wheels' common prefix: <venv>/lib/python3.X/site-packages/nvidia/cu13.
cu13_dir() {
    local d
    for d in "$VENV"/lib/python3*/site-packages/nvidia/cu13; do
        if [ -d "$d" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# Complete when the stamp lists exactly these pins and the tools are in place.
installed() {
    local cu13
    [ -f "$STAMP" ] || return 1
    [ "$(cat "$STAMP")" = "${PINS[*]}" ] || return 1
    cu13=$(cu13_dir) || return 1
    [ -x "$cu13/bin/nvcc" ] && [ -x "$cu13/bin/ptxas" ] || return 1
    compgen -G "$cu13/lib/libnvrtc.so*" >/dev/null
}

if installed; then
    log "reusing $VENV"
else
    command -v "$PYTHON" >/dev/null 2>&1 || {
        log "needs $PYTHON (3.9 or newer) with pip and venv"
        exit 1
    }
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        if ! "$PYTHON" -m venv "$VENV" >&2; then
            # Debian and Ubuntu ship venv's ensurepip separately.
            if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
                log "python3 -m venv failed; installing python3-venv with apt-get"
                rm -rf "$VENV"
                apt-get update >&2 && apt-get install -y python3-venv >&2
                "$PYTHON" -m venv "$VENV" >&2
            else
                log "python3 -m venv failed; install python3-venv (Debian/Ubuntu) and run again"
                exit 1
            fi
        fi
    fi
    log "installing ${PINS[*]}"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir --quiet "${PINS[@]}" >&2
    echo "${PINS[*]}" >"$STAMP"
    installed || {
        log "the wheels installed but nvcc, ptxas or libnvrtc is missing under $VENV"
        exit 1
    }
fi

CU13=$(cu13_dir)
# The linker's -lnvrtc (cudarc) and -lcudart (candle-kernels) look for libX.so.
mkdir -p "$VENV/link"
for lib in nvrtc cudart; do
    ln -sfn "$CU13/lib/lib$lib.so.13" "$VENV/link/lib$lib.so"
done
NCCL_LIB=""
# Without --runtime the folder names nothing else, whatever an earlier --runtime left.
[ "$RUNTIME" = 1 ] || rm -f "$VENV"/link/lib{cublas,cublasLt,curand,nccl,cuda}.so
if [ "$RUNTIME" = 1 ]; then
    if [ -f "$RUNTIME_STAMP" ] && [ "$(cat "$RUNTIME_STAMP")" = "${RUNTIME_PINS[*]}" ]; then
        log "reusing the runtime libraries in $VENV"
    else
        log "installing ${RUNTIME_PINS[*]}"
        rm -f "$RUNTIME_STAMP"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir --quiet "${RUNTIME_PINS[@]}" >&2
        echo "${RUNTIME_PINS[*]}" >"$RUNTIME_STAMP"
    fi
    NCCL_LIB=$(dirname "$CU13")/nccl/lib
    for f in "$CU13/lib/libcublas.so.13" "$CU13/lib/libcublasLt.so.13" "$CU13/lib/libcurand.so.10" "$NCCL_LIB/libnccl.so.2"; do
        [ -f "$f" ] || {
            log "the runtime wheels installed but $f is missing"
            exit 1
        }
        name=$(basename "$f")
        ln -sfn "$f" "$VENV/link/${name%.so.*}.so"
    done
    # The driver's own libcuda, found the way the dynamic loader will find it.
    driver=$(/sbin/ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so.1" { print $NF; exit }')
    if [ -n "$driver" ]; then
        ln -sfn "$driver" "$VENV/link/libcuda.so"
        log "linking against the NVIDIA driver's $driver"
    else
        rm -f "$VENV/link/libcuda.so"
        log "no NVIDIA driver (no libcuda.so.1 known to ldconfig): a cuda build will not link unless"
        log "  LIBRARY_PATH holds a libcuda.so (scripts/cuda-stubs.py makes a link-only stand-in)"
    fi
fi
log "CUDA 13.0 pieces in $CU13 (compute capability $CAP)"
cat <<EOF
export PATH="$CU13/bin:\$PATH"
export CUDA_ROOT="$CU13"
export CUDA_PATH="$CU13"
export CUDA_COMPUTE_CAP="$CAP"
export LD_LIBRARY_PATH="$CU13/lib${NCCL_LIB:+:$NCCL_LIB}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LIBRARY_PATH="$VENV/link\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
