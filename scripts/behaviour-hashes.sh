#!/usr/bin/env bash
# Prints the sha256 of every checkpoint's weights and of the traces that the given
# configs produce, for a change that claims to leave behaviour unchanged: run it before
# and after, and compare. Usage: scripts/behaviour-hashes.sh [CONFIG...]
# (default: configs/tiny.toml, a tiny R1-recipe run, and configs/small.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p distill-cli
bin=target/release/distill
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The tiny config with the R1 recipe switched on, so that traces.jsonl is covered quickly.
tiny_traces="$out/tiny-traces.toml"
sed 's/^name = "tiny"/name = "tiny-traces"/' configs/tiny.toml > "$tiny_traces"
printf '\n[traces]\nenabled = true\nsamples = 2\nmax_new_tokens = 48\n' >> "$tiny_traces"

configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/tiny.toml "$tiny_traces" configs/small.toml)
for cfg in "${configs[@]}"; do
    name=$(basename "$cfg" .toml)
    "$bin" --config "$cfg" --out-dir "$out/runs" --force >"$out/$name.log" 2>&1 \
        || { echo "error: $cfg failed; its log:" >&2; cat "$out/$name.log" >&2; exit 1; }
done
(cd "$out/runs" && find . \( -name model.safetensors -o -name traces.jsonl \) -print0 | sort -z | xargs -0 sha256sum)
