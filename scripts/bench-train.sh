#!/usr/bin/env bash
# One full training step of model M1 (Llama-style, V 8192, d 256, 4 layers, 8 heads, FFN 688,
# B 8 x T 256, f32, AdamW), distill against PyTorch eager, side by side (issue 9, item 1).
#
# Builds crates/distill/benches/train_step.rs in release, then runs, R times and alternately,
#   distill (the bench binary), PyTorch eager with matmul+softmax attention (what distill
#   does), and PyTorch eager with F.scaled_dot_product_attention (scripts/bench_train_pytorch.py),
# each a fresh process with the same thread count, and prints the median tokens/s of each
# over the rounds, their ranges, the ratio distill / PyTorch, MFU and peak RSS, and the
# load average before each run (the machine may be shared: read the ratios with it).
#
# Usage:
#   PYTHON=/work/venv-hf/bin/python scripts/bench-train.sh
#   PYTHON=~/venvs/bench/bin/python R=5 THREADS=2 STEPS=10 scripts/bench-train.sh
# PYTHON: an interpreter that can `import torch` (default python3), e.g. a venv made with
#   python3 -m venv ~/venvs/bench && ~/venvs/bench/bin/pip install torch
# PLAIN=1 also runs distill with KERNELS=plain (plain candle ops, the path before the fused
#   kernels) in each round, as a fourth row.
# R: rounds (default 3). THREADS: RAYON_NUM_THREADS for distill and torch.set_num_threads
#   for PyTorch (default 2). STEPS / WARMUP: timed / untimed steps per run (default 10 / 2).
# ALLOC: "tuned" (default) runs every process with
#   GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736, which
#   keeps freed memory for reuse: PyTorch at its best (docs/design.md), and for distill the
#   stand-in for the mimalloc allocator the `distill` binary installs (the bench, in the
#   library crate, cannot). "default" leaves glibc as configured.
# CARGO_TARGET_DIR is honoured as usual.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
R=${R:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
ALLOC=${ALLOC:-tuned}
TUNED=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
cd "$ROOT"

case "$ALLOC" in
    tuned) RUN_ENV=(env "GLIBC_TUNABLES=$TUNED") ;;
    default) RUN_ENV=(env -u GLIBC_TUNABLES) ;;
    *) echo "ALLOC must be tuned or default, not $ALLOC" >&2; exit 2 ;;
esac
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "$PYTHON cannot import torch; set PYTHON to an interpreter with torch (see the header of $0)" >&2
    exit 2
fi

EXE=$(scripts/bench-exe.sh train_step)

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS STEPS WARMUP

# Shows a run's output on stderr as it comes and keeps its RESULT line, tagged with the
# round and the load average read just before the run started.
run() {
    local round=$1 name=$2 load line
    shift 2
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "== round $round: $name (load average before: $load)" >&2
    "${RUN_ENV[@]}" "$@" | while IFS= read -r line; do
        printf '%s\n' "$line" >&2
        case $line in RESULT*) printf '%s round=%s load1=%s load5=%s load15=%s\n' "$line" "$round" $load >>"$RESULTS" ;; esac
    done
}

echo "threads $THREADS, $STEPS timed steps after $WARMUP warm-up, $R rounds, allocator: glibc $ALLOC" >&2
PLAIN=${PLAIN:-0}
for round in $(seq 1 "$R"); do
    run "$round" distill env KERNELS=fused "$EXE"
    if [ "$PLAIN" = 1 ]; then run "$round" distill-plain env KERNELS=plain "$EXE"; fi
    run "$round" pytorch-matmul "$PYTHON" scripts/bench_train_pytorch.py --threads "$THREADS" --attn matmul
    run "$round" pytorch-sdpa "$PYTHON" scripts/bench_train_pytorch.py --threads "$THREADS" --attn sdpa
done

"$PYTHON" - "$RESULTS" "$ALLOC" <<'EOF'
import statistics, sys

rows = []
for line in open(sys.argv[1]):
    parts = line.split()
    r = {"impl": parts[1]}
    for kv in parts[2:]:
        k, v = kv.split("=", 1)
        try:
            r[k] = float(v)
        except ValueError:  # device=cpu
            r[k] = v
    rows.append(r)
impls = ["distill", "distill-plain", "pytorch-matmul", "pytorch-sdpa"]
by = {i: [r for r in rows if r["impl"] == i] for i in impls}
if not by["distill-plain"]:
    impls.remove("distill-plain")
    del by["distill-plain"]
if any(not v for v in by.values()):
    sys.exit("missing RESULT lines: " + ", ".join(i for i, v in by.items() if not v))
med = lambda i, k: statistics.median(r[k] for r in by[i])
rounds = len(by["distill"])
threads = {int(r["threads"]) for r in rows}

print()
print(f"train step, model M1 (B 8 x T 256 = 2048 tokens, f32, AdamW), {rounds} rounds alternated, "
      f"threads {sorted(threads)}, glibc {sys.argv[2]}")
print("load average (1/5/15 min) before each run:")
for rnd in sorted({int(r["round"]) for r in rows}):
    cells = [f"{r['impl']} {r['load1']:.2f}/{r['load5']:.2f}/{r['load15']:.2f}"
             for r in rows if int(r["round"]) == rnd]
    print(f"  round {rnd}: " + ", ".join(cells))
head = (f"{'impl':<16} {'tokens/s median':>15} {'range (per run)':>17} {'step ms':>8} {'fwd ms':>7} {'bwd ms':>7} "
        f"{'opt ms':>7} {'MFU':>6} {'probe GF/s':>10} {'peak RSS MiB':>12}")
print(head)
print("-" * len(head))
for i in impls:
    tps = [r["tokens_per_s"] for r in by[i]]
    print(f"{i:<16} {statistics.median(tps):>15.0f} {min(tps):>8.0f}-{max(tps):<8.0f} {med(i, 'step_ms'):>8.1f} "
          f"{med(i, 'fwd_ms'):>7.1f} {med(i, 'bwd_ms'):>7.1f} {med(i, 'opt_ms'):>7.1f} {med(i, 'mfu') * 100:>5.1f}% "
          f"{med(i, 'peak_gflops'):>10.1f} {med(i, 'peak_rss_mb'):>12.0f}")
print("MFU: 3 x forward FLOPs (attention included) / step time / the best 2048^3 matmul of the run's own probe.")
# Against one common peak: the best probe any run reached on this machine.
peak = max(r["peak_gflops"] for r in rows)
print(f"MFU against the best probe of all runs ({peak:.1f} GFLOP/s): " + ", ".join(
    f"{i} {med(i, 'mfu') * med(i, 'peak_gflops') / peak * 100:.1f}%" for i in impls))
d = med("distill", "tokens_per_s")
print()
for i in ("pytorch-matmul", "pytorch-sdpa"):
    p = med(i, "tokens_per_s")
    per_round = [a["tokens_per_s"] / b["tokens_per_s"]
                 for a in by["distill"] for b in by[i] if a["round"] == b["round"]]
    print(f"distill / {i:<15} tokens/s: {d / p:.3f} (medians); per round: "
          + ", ".join(f"{x:.3f}" for x in per_round)
          + f"; median step time distill / {i}: {med('distill', 'step_ms') / med(i, 'step_ms'):.2f}")
EOF
