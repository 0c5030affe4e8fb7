#!/usr/bin/env bash
# Everything that needs a GPU, in one unattended command for a fresh GPU box (one
# H200-class GPU, 16 cores; the NVIDIA driver installed, network to crates.io and PyPI):
#
#   scripts/gpu-check.sh            # on the GPU box; ~8 minutes at most, build included
#   scripts/gpu-check.sh --no-gpu   # a dry run anywhere: every part up to its first GPU call
#
# Parts, each in a process of its own under `timeout`; one that fails or runs out of time
# is recorded and the next one still runs. They run in the order 0 1 2 3 5 4: the small run
# is the one part whose time is a guess, and cut short it still reports the stages it
# finished, while a benchmark cut short reports nothing.
#   0 setup   Rust (rustup, if cargo is missing), the CUDA 13.0 wheels with cuBLAS, cuRAND and
#             NCCL (scripts/cuda-toolchain.sh --runtime), `cargo fetch`; `pip install torch`
#             starts in the background for part 5.
#   1 build   the cuda binary and only the test and bench targets run below, release profile,
#             one job per core; prints the build time.
#   2 tests   the tests with "cuda" in their names: every CUDA kernel against the CPU op
#             (divergences, top-k), the device inventory, `--device cuda` opening the GPU, the
#             bf16 training path through the binary. A GPU test that skips itself for want of
#             a device fails this part on a GPU box.
#   3 tiny    configs/tiny.toml on --device cuda in bf16 and in f32; prints the ledger (GPU
#             name, count, device-hours, MFU).
#   4 small   configs/small.toml on --device cuda; prints its report and each stage's wall time.
#   5 bench   where torch installed: the train step of model M1 and the KD loss at N 2048,
#             V 32768, distill (crates/distill/benches) against PyTorch eager
#             (scripts/bench_*_pytorch.py) on the same GPU; prints the ratios.
#   6 summary one line per part (status, seconds, limit) and each part's key lines.
#
# Everything goes to one folder (default runs/gpu-check-<time>/, --out DIR): summary.txt,
# and a log per part. The whole script stops at GPU_CHECK_BUDGET_S (default 480 s): a part
# gets the smaller of its own limit and what is left, and a part with under 10 s left is
# recorded as not run. Limits and the estimates behind them: docs/gpu.md.
#
# --no-gpu: for a machine without a GPU (CI's, a laptop). The driver is faked with the link
# stand-in of scripts/cuda-stubs.py (cuBLAS, cuRAND, NCCL are the real wheels), the tests run
# and skip their GPU halves, each `--device cuda` run must stop at opening the device with
# "no NVIDIA driver", the benches likewise, and torch is resolved (`pip install --dry-run`),
# not installed. It proves the script and the build, not the GPU.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF="$ROOT/scripts/gpu-check.sh"
cd "$ROOT"

# Limits per part, in seconds (the estimates are in docs/gpu.md).
LIMIT_SETUP=${GPU_CHECK_LIMIT_SETUP:-100}
LIMIT_BUILD=${GPU_CHECK_LIMIT_BUILD:-300}
LIMIT_TESTS=${GPU_CHECK_LIMIT_TESTS:-60}
LIMIT_TINY=${GPU_CHECK_LIMIT_TINY:-60}
LIMIT_SMALL=${GPU_CHECK_LIMIT_SMALL:-150}
LIMIT_BENCH=${GPU_CHECK_LIMIT_BENCH:-100}
RESERVE=5 # seconds kept for the summary

# The cargo invocation of part 1: release (the profile a user runs; line tables only, so it
# also links faster than the dev profile's full debug info), one feature resolution for all
# the targets so that `distill` is compiled once.
CARGO_FEATURES=distill/cuda,distill-cli/cuda
CARGO_TARGETS=(-p distill -p distill-cli --lib --test e2e --bench kd_loss --bench train_step)

die() {
    echo "gpu-check: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------
# The parts. Each runs as `gpu-check.sh --part NAME` in a process of its own (so that
# `timeout` can stop it whole), with the state of the run in exported variables and files
# under $OUT. `note` adds a line to the part's entry in the summary.
note() { echo "$*" >>"$OUT/notes/$PART"; }

# The environment part 0 wrote: the CUDA toolchain, the libraries, cargo.
load_env() {
    [ -f "$OUT/env.sh" ] || {
        echo "no $OUT/env.sh: part 0 (setup) did not finish"
        exit 1
    }
    # shellcheck disable=SC1091
    source "$OUT/env.sh"
}

# An executable part 1 built: `exe KIND NAME` (KIND: lib, test, bench, bin).
exe() {
    local path
    path=$(awk -v k="$1" -v n="$2" '$1 == k && $2 == n { print $3; exit }' "$OUT/executables.txt" 2>/dev/null || true)
    [ -n "$path" ] && [ -x "$path" ] || {
        echo "part 1 (build) did not produce the $1 target $2" >&2
        exit 1
    }
    echo "$path"
}

# A run that must stop at opening the GPU under --no-gpu: exit 0 when it failed naming the
# missing driver, 1 otherwise. $1: its log.
stopped_at_gpu() {
    if grep -q "no NVIDIA driver" "$1"; then
        note "$(basename "$1" .log): stopped at the first GPU call, as it must without a GPU: $(grep -m1 -o 'cuda:[0-9]*: no NVIDIA driver' "$1")"
        return 0
    fi
    echo "expected the run to stop at opening the GPU with \"no NVIDIA driver\"; see $1"
    return 1
}

part_setup() {
    echo "host: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(df -h --output=avail . | tail -1 | tr -d ' ') free here"
    note "host: $(nproc) cores"
    if [ "$NO_GPU" = 0 ]; then
        command -v nvidia-smi >/dev/null || {
            echo "no nvidia-smi: the NVIDIA driver is not installed. On a machine without a GPU run --no-gpu"
            exit 1
        }
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv
        local gpu driver_cuda
        gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | head -1)
        driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
        note "GPU: $gpu; the driver supports CUDA ${driver_cuda:-?}"
        # The wheels are CUDA 13.0, whose PTX and libraries need a driver for 13.0 or newer.
        if [ -n "$driver_cuda" ] && [ "${driver_cuda%%.*}" -lt 13 ]; then
            echo "the driver supports CUDA $driver_cuda; this build uses CUDA 13.0, which needs driver 580 or newer"
            note "FAIL: driver too old for CUDA 13.0 (supports $driver_cuda)"
            exit 1
        fi
        # candle's kernels are compiled for this GPU's compute capability (9.0 -> 90).
        local cap
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
        [ -z "$cap" ] || export DISTILL_CUDA_COMPUTE_CAP="$cap"
    else
        note "--no-gpu: no GPU is used; libcuda is the link-only stand-in of scripts/cuda-stubs.py"
    fi
    # The release pinned in rust-toolchain.toml (rustup installs it where Rust is missing).
    scripts/rust-toolchain.sh
    command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
    # nvcc compiles candle's kernels with the host C++ compiler, and several dependencies'
    # build scripts (ring, mimalloc, libffi) need cc.
    if ! command -v g++ >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || {
            echo "no g++, and not root to install it: apt-get install g++"
            exit 1
        }
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++
    fi
    cargo --version
    local cuda_env
    cuda_env=$(scripts/cuda-toolchain.sh --runtime)
    {
        echo "export PATH=\"$(dirname "$(command -v cargo)"):\$PATH\""
        echo "$cuda_env"
        echo "export CARGO_TARGET_DIR=\"$TARGET\""
    } >"$OUT/env.sh"
    if [ "$NO_GPU" = 1 ]; then
        # Only the driver is faked: the wheels' cuBLAS, cuRAND and NCCL are linked and loaded.
        eval "$cuda_env"
        local stubs
        stubs=$(python3 scripts/cuda-stubs.py --libs driver "$TARGET/cuda-stubs-driver")
        echo "export LIBRARY_PATH=\"$stubs:\$LIBRARY_PATH\"; export LD_LIBRARY_PATH=\"$stubs:\$LD_LIBRARY_PATH\"" >>"$OUT/env.sh"
    fi
    load_env
    cargo fetch --locked
    note "Rust $(cargo --version | cut -d' ' -f2), CUDA wheels in $CUDA_ROOT"
}

part_build() {
    load_env
    local t0 t1
    # candle-kernels' build script runs nvcc on half the cores unless told otherwise.
    export CUDAFORGE_THREADS=$JOBS
    t0=$(date +%s)
    # Diagnostics to the terminal, the artifacts' JSON to a file to find the executables.
    # --timings keeps each unit's time (cargo-timing.html) for the next estimate of this part.
    cargo test --release --locked --features "$CARGO_FEATURES" "${CARGO_TARGETS[@]}" --no-run \
        -j "$JOBS" --timings --message-format=json-render-diagnostics >"$OUT/build-artifacts.json"
    t1=$(date +%s)
    cp "$CARGO_TARGET_DIR/cargo-timings/cargo-timing.html" "$OUT/" 2>/dev/null || true
    python3 - "$OUT/build-artifacts.json" >"$OUT/executables.txt" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"][0]
        # "lib" is the library's unit-test binary; a bin's own unit tests would be "bintest".
        kind = "bintest" if kind == "bin" and m["profile"]["test"] else kind
        print(kind, m["target"]["name"], m["executable"])
EOF
    cat "$OUT/executables.txt"
    echo "build: $((t1 - t0)) s with $JOBS jobs"
    note "build: $((t1 - t0)) s with $JOBS jobs ($(wc -l <"$OUT/executables.txt") executables)"
    ldd "$(exe bin distill)" | grep -E 'libcuda|libcublas|libcurand|libnccl|libnvrtc|libcudart'
}

part_tests() {
    load_env
    local lib e2e rc=0
    lib=$(exe lib distill)
    e2e=$(exe test e2e)
    # "cuda" selects the GPU tests (kernels, top-k, inventory, open, bf16 training) and the
    # refusal test, which skips itself where a GPU opens.
    "$lib" cuda --nocapture 2>&1 | tee "$OUT/tests-lib.txt" || rc=1
    "$e2e" cuda --nocapture 2>&1 | tee "$OUT/tests-e2e.txt" || rc=1
    local passed skipped
    passed=$(cat "$OUT"/tests-*.txt | grep -c ' \.\.\. ok$' || true)
    skipped=$(cat "$OUT"/tests-*.txt | grep -c '^skipped .*no CUDA device' || true)
    note "$passed tests passed, $skipped skipped for want of a CUDA device"
    cat "$OUT"/tests-*.txt | grep -E '^skipped |^cuda inventory' | sed 's/^/  /' >>"$OUT/notes/$PART" || true
    if [ "$NO_GPU" = 0 ] && [ "$skipped" -gt 0 ]; then
        echo "GPU tests skipped themselves on a GPU box: the device did not open"
        rc=1
    fi
    return "$rc"
}

# One `distill --device cuda` run; prints the device line and the cost block of its report.
# It gets what is left of the part's limit less 10 s, so that a run cut short still prints
# the stages it finished (from ledger.jsonl) before the part itself is stopped.
run_on_gpu() {
    local name=$1 log="$OUT/run-$1.log"
    shift
    local t0 rc=0 left bin
    bin=$(exe bin distill)
    t0=$(date +%s)
    left=$((PART_DEADLINE - 10 - t0))
    [ "$left" -gt 5 ] || left=5
    timeout "$left" "$bin" --device cuda --out-dir "$OUT/runs" --name "$name" --force "$@" >"$log" 2>&1 || rc=$?
    if [ "$NO_GPU" = 1 ]; then
        tail -3 "$log"
        [ "$rc" != 0 ] || {
            echo "$name ran without a GPU"
            return 1
        }
        stopped_at_gpu "$log"
        return
    fi
    if [ "$rc" != 0 ]; then
        tail -30 "$log"
        if [ "$rc" = 124 ]; then
            note "$name: stopped after $left s (the part's limit); the stages it finished:"
        else
            note "$name: FAILED (exit $rc), see $log; the stages it finished:"
        fi
        # One line per finished stage: name, wall seconds, device-hours, MFU.
        python3 - "$OUT/runs/$name/ledger.jsonl" <<'EOF' | tee -a "$OUT/notes/$PART"
import json, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    lines = []
for l in lines:
    c = json.loads(l)
    mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "-"
    print(f"  {c['stage']:<14} {c['wall_seconds']:8.1f} s  {c['device_hours']:.5f} device-h  MFU {mfu}  {c['device_name']}")
print(f"  ({len(lines)} stage(s) finished)")
EOF
        return "$rc"
    fi
    local report="$OUT/runs/$name/report.md"
    echo "== $name: $(($(date +%s) - t0)) s"
    grep -m1 '^Device:' "$report"
    sed -n '/^| model /,/^$/p' "$report"
    sed -n '/^## Cost/,/^## Training/p' "$report" | grep -v '^## Training'
    note "$name: $(($(date +%s) - t0)) s; $(grep -m1 '^Device:' "$report")"
    sed -n '/^stage /,/^device:/p' "$report" | sed 's/^/  /' >>"$OUT/notes/$PART"
}

part_tiny() {
    load_env
    local rc=0
    run_on_gpu tiny-bf16 --config configs/tiny.toml --dtype bf16 || rc=1
    run_on_gpu tiny-f32 --config configs/tiny.toml --dtype f32 || rc=1
    return "$rc"
}

part_small() {
    load_env
    run_on_gpu small --config configs/small.toml
}

part_bench() {
    load_env
    local rc=0 train kd
    train=$(exe bench train_step)
    kd=$(exe bench kd_loss)
    # distill first: it needs no torch. Each run stops at opening the GPU under --no-gpu.
    DEVICE=cuda STEPS=10 WARMUP=3 "$train" >"$OUT/bench-train-distill.log" 2>&1 || rc=$?
    tail -4 "$OUT/bench-train-distill.log"
    "$kd" --device cuda --n 2048 --v 32768 --losses forward_kl --reps 10 --warmup 2 --ref-reps 1 \
        >"$OUT/bench-kd-distill.log" 2>&1 || rc=$?
    tail -8 "$OUT/bench-kd-distill.log"
    if [ "$NO_GPU" = 1 ]; then
        [ "$rc" != 0 ] || {
            echo "the benches ran without a GPU"
            return 1
        }
        stopped_at_gpu "$OUT/bench-train-distill.log" && stopped_at_gpu "$OUT/bench-kd-distill.log" || return 1
    elif [ "$rc" != 0 ]; then
        note "distill benches FAILED (exit $rc): see bench-*-distill.log"
        return 1
    else
        # distill's own figures go to the summary now, whatever happens to PyTorch's.
        note "distill: $(grep '^RESULT' "$OUT/bench-train-distill.log" | cut -d' ' -f2-5,10-11)"
        note "distill: $(grep -m1 '^distill-fused ' "$OUT/bench-kd-distill.log" | tr -s ' ')"
    fi
    # PyTorch, installed in the background since part 0; its four runs need ~40 s.
    while [ ! -f "$OUT/torch-install.done" ] && [ "$(date +%s)" -lt $((PART_DEADLINE - 45)) ]; do
        sleep 2
    done
    if [ ! -f "$OUT/torch-install.done" ]; then
        note "pip install torch had not finished: no PyTorch comparison (torch-install.log)"
        return 3 # ok without the optional part: see run_part
    fi
    if [ "$(cat "$OUT/torch-install.done")" != 0 ]; then
        note "pip install torch failed here: distill's benches ran, no PyTorch comparison (torch-install.log)"
        tail -5 "$OUT/torch-install.log"
        return 3 # ok without the optional part: see run_part
    fi
    if [ "$NO_GPU" = 1 ]; then
        note "pip install torch resolves: $(grep -m1 -o 'Would install.*torch-[^ ]*' "$OUT/torch-install.log" | grep -o 'torch-[^ ]*')"
        return 0
    fi
    local py="$ROOT/.venv-torch/bin/python"
    for attn in matmul sdpa; do
        "$py" scripts/bench_train_pytorch.py --device cuda --steps 10 --warmup 3 --attn "$attn" \
            >"$OUT/bench-train-torch-$attn.log" 2>&1 || rc=1
        tail -3 "$OUT/bench-train-torch-$attn.log"
    done
    "$py" scripts/bench_kd_pytorch.py --device cuda --n 2048 --v 32768 --reps 10 --warmup 2 \
        --cold-runs 1 --allocs glibc-default >"$OUT/bench-kd-torch.log" 2>&1 || rc=1
    tail -2 "$OUT/bench-kd-torch.log"
    # Ratios: tokens/s for the step (higher is better), median milliseconds for the loss.
    python3 - "$OUT" <<'EOF' | tee -a "$OUT/notes/$PART"
import json, sys
out = sys.argv[1]
def lines(name):
    try:
        return open(f"{out}/{name}").read().splitlines()
    except OSError:
        return []
def result(name, key):
    for l in lines(name):
        if l.startswith("RESULT "):
            kv = dict(w.split("=", 1) for w in l.split()[2:] if "=" in w)
            return float(kv[key]) if key in kv else None
    return None
def kd_ms(name, impl):
    for l in lines(name):
        if l.startswith("{"):
            c = json.loads(l)
            if c.get("impl") == impl and c.get("loss") == "forward_kl":
                return c.get("median_ms")
    return None
ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"
d = result("bench-train-distill.log", "tokens_per_s")
m = result("bench-train-torch-matmul.log", "tokens_per_s")
s = result("bench-train-torch-sdpa.log", "tokens_per_s")
print(f"M1 train step, tokens/s: distill {d}, PyTorch {m} (matmul attention), {s} (SDPA); "
      f"distill / PyTorch = {ratio(d, m)}, {ratio(d, s)}")
dk = kd_ms("bench-kd-distill.log", "distill-fused")
dp = kd_ms("bench-kd-distill.log", "candle-plain-ops")
tk = kd_ms("bench-kd-torch.log", "pytorch-eager")
print(f"KD loss (forward KL, N 2048, V 32768, fwd+bwd), median ms: distill fused {dk}, candle plain ops {dp}, "
      f"PyTorch {tk}; PyTorch time / distill time = {ratio(tk, dk)}")
EOF
    return "$rc"
}

# ---------------------------------------------------------------------------------------
# The driver: runs each part under its limit and the overall deadline, records the outcome.
run_part() {
    local num=$1 name=$2 limit=$3 left log rc t0 secs status
    left=$((DEADLINE - RESERVE - $(date +%s)))
    log="$OUT/$num-$name.log"
    if [ "$left" -lt 10 ]; then
        printf '%s %-7s %-34s %5s s (limit %s s)\n' "$num" "$name" "NOT RUN: the ${BUDGET} s were used up" 0 "$limit" >>"$SUMMARY"
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== part $num: $name (limit $limit s)"
    t0=$(date +%s)
    set +e
    PART="$num-$name" PART_DEADLINE=$((t0 + limit)) timeout --kill-after=10 "$limit" "$SELF" --part "$name" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    secs=$(($(date +%s) - t0))
    case "$rc" in
    0) status="ok" ;;
    3) status="ok, optional half skipped" ;; # see the part's notes
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s %-7s %-34s %5s s (limit %s s)\n' "$num" "$name" "$status" "$secs" "$limit" >>"$SUMMARY"
    if [ -f "$OUT/notes/$num-$name" ]; then
        sed 's/^/      /' "$OUT/notes/$num-$name" >>"$SUMMARY"
    fi
    echo "=== part $num: $name: $status in $secs s"
}

# `pip install torch` for part 5, in the background from the start: it downloads while the
# build compiles. Under --no-gpu only resolved (`--dry-run`), not installed. In a session of
# its own (setsid), so that the end of the check can stop pip too, not just its shell.
start_torch_install() {
    # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
    setsid bash -c '
        root=$1 no_gpu=$2 out=$3 rc=0
        {
            python3 -m venv "$root/.venv-torch" &&
                if [ "$no_gpu" = 1 ]; then
                    "$root/.venv-torch/bin/pip" install --disable-pip-version-check --dry-run torch numpy
                else
                    nice -n 10 "$root/.venv-torch/bin/pip" install --disable-pip-version-check torch numpy
                fi
        } >"$out/torch-install.log" 2>&1 || rc=$?
        echo "$rc" >"$out/torch-install.done"' torch-install "$ROOT" "$NO_GPU" "$OUT" &
    TORCH_PID=$!
}

main() {
    NO_GPU=0
    OUT=""
    while [ $# -gt 0 ]; do
        case "$1" in
        --no-gpu) NO_GPU=1 ;;
        --out)
            [ $# -ge 2 ] || die "--out needs a folder"
            OUT=$2
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$SELF" | sed '$d'
            exit 0
            ;;
        *) die "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    BUDGET=${GPU_CHECK_BUDGET_S:-480}
    START=$(date +%s)
    DEADLINE=$((START + BUDGET))
    OUT=${OUT:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
    mkdir -p "$OUT/notes"
    OUT=$(cd "$OUT" && pwd)
    SUMMARY="$OUT/summary.txt"
    JOBS=${GPU_CHECK_JOBS:-$(nproc)}
    TARGET=${CUDA_TARGET_DIR:-$ROOT/target/cuda}
    export NO_GPU OUT JOBS TARGET
    {
        echo "distill gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$NO_GPU" = 1 ] && echo ', --no-gpu (dry run: no GPU is used)')"
        echo "budget ${BUDGET} s; part, status, seconds, limit:"
    } >"$SUMMARY"

    TORCH_PID=""
    run_part 0 setup "$LIMIT_SETUP"
    start_torch_install
    run_part 1 build "$LIMIT_BUILD"
    run_part 2 tests "$LIMIT_TESTS"
    run_part 3 tiny "$LIMIT_TINY"
    run_part 5 bench "$LIMIT_BENCH"
    run_part 4 small "$LIMIT_SMALL"
    # The torch install is the one thing left running in the background: stop it with the rest.
    if [ -n "$TORCH_PID" ] && kill -0 "$TORCH_PID" 2>/dev/null; then
        kill -- "-$TORCH_PID" 2>/dev/null || true
        echo "pip install torch was still running at the end: stopped" >>"$SUMMARY"
    fi
    echo "total $(($(date +%s) - START)) s of ${BUDGET} s; logs in $OUT" >>"$SUMMARY"
    echo "=== part 6: summary ($SUMMARY)"
    # Parts in their numbered order (each with its note lines), whatever order they ran in.
    python3 - "$SUMMARY" <<'EOF'
import re, sys
head, parts, tail, cur = [], {}, [], None
for line in open(sys.argv[1]).read().splitlines():
    m = re.match(r"^(\d) ", line)
    if m:
        cur = m.group(1)
        parts[cur] = [line]
    elif line.startswith("      ") and cur is not None:
        parts[cur].append(line)
    elif cur is None:
        head.append(line)
    else:
        tail.append(line)
out = head + [l for k in sorted(parts) for l in parts[k]] + tail
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
    # Exit status: 0 only when every part passed.
    ! grep -qE '^[0-9] [a-z]+ +(FAILED|TIMED OUT|NOT RUN)' "$SUMMARY"
}

if [ "${1:-}" = "--part" ]; then
    [ $# -eq 2 ] || die "--part NAME"
    "part_$2"
else
    main "$@"
fi
