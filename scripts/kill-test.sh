#!/usr/bin/env bash
# The full kill test: SIGKILL the pipeline at DISTILL_KILL_POINTS pseudo-random
# moments (default 25) across every stage of the tiny R1-recipe run, resume after
# each, and check that the final weights and traces are bitwise identical to an
# uninterrupted run and that every checkpoint on disk stays loadable.
# CI runs the same test with 5 kill points (`cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
export DISTILL_KILL_POINTS="${DISTILL_KILL_POINTS:-25}"
cargo test --release -p distill-cli --test e2e kill_anywhere -- --nocapture
