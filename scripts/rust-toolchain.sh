#!/usr/bin/env bash
# Makes sure the Rust toolchain pinned in rust-toolchain.toml, with clippy and rustfmt,
# is installed: through rustup's installer on a machine without Rust (into ~/.cargo), or
# through rustup where it is present but lacks that release. Callers then put
# ~/.cargo/bin on their PATH. Used by .ci/run and scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
[ -n "$channel" ] || { echo "error: rust-toolchain.toml names no channel" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null 2>&1; then
    if command -v cargo >/dev/null 2>&1; then
        # Rust without rustup (a distribution's package): it cannot switch releases.
        echo "warning: no rustup; using $(cargo --version), not the pinned $channel" >&2
        exit 0
    fi
    echo "installing Rust $channel with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --default-toolchain "$channel" -c clippy,rustfmt
elif ! rustup run "$channel" cargo clippy --version >/dev/null 2>&1 ||
    ! rustup run "$channel" cargo fmt --version >/dev/null 2>&1; then
    rustup toolchain install "$channel" --profile minimal -c clippy,rustfmt
fi
