#!/usr/bin/env bash
# The full kill test, two parts, on the tiny R1-recipe run (every stage kind):
# 1. SIGKILL the pipeline at DISTILL_KILL_POINTS pseudo-random moments (default 25),
#    resume after each;
# 2. crash it half-way through checkpoint and data file writes (DISTILL_CRASH_IN_WRITE,
#    one process per point, resumed each time), after a full disk (a file-size limit).
# Both check that the final weights are bitwise identical to an uninterrupted run's
# and that every checkpoint on disk stays loadable. CI runs both with fewer points.
set -euo pipefail
cd "$(dirname "$0")/.."
export DISTILL_KILL_POINTS="${DISTILL_KILL_POINTS:-25}"
# Each point is one process, resumed from where the previous one crashed, that dies in
# the 1st or 2nd write of the named file: small N keeps every process short, so the
# points spread over all the stages instead of finishing the run early. traces.jsonl is
# written once per run, so it comes first (the teacher stage runs to its end, then the
# write crashes); the checkpoint files follow, 35 points.
specs="traces.jsonl:1,"
for round in 1 2 3 4 5; do
    for f in model.safetensors optimizer.safetensors trainer_state.json config.json \
             tokenizer_config.json generation_config.json distill.toml; do
        specs="$specs$f:$((1 + round % 2)),"
    done
done
export DISTILL_CRASH_SPECS="${DISTILL_CRASH_SPECS:-$specs}"
cargo test --release -p distill-cli --test e2e -- kill_anywhere crashes_inside --nocapture --test-threads 1
