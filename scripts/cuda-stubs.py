#!/usr/bin/env python3
"""Link-only stand-ins for the CUDA libraries, so that a `cuda` build links and its CPU
tests run on a machine with no GPU and no NVIDIA driver (CI). Never for a GPU box.

candle-core 0.11.1 builds cudarc with `dynamic-linking`: the binary is linked with
-lcuda -lnvrtc -lcublas -lcublasLt -lcurand -lnccl and the dynamic loader must find
every one of them before main() runs, even for `--device cpu`. The PyPI wheels of
scripts/cuda-toolchain.sh bring the real libnvrtc; libcuda is part of the NVIDIA
driver (neither PyPI nor Debian main has it), and cuBLAS, cuRAND and NCCL would be
~1 GB of wheels that the CPU tests never call. So this writes, into OUT_DIR:

    libcuda.so.1      + libcuda.so       every driver function cudarc declares
    libcublas.so.13   + libcublas.so     every cuBLAS function
    libcublasLt.so.13 + libcublasLt.so   every cuBLASLt function
    libcurand.so.10   + libcurand.so     every cuRAND function
    libnccl.so.2      + libnccl.so       every NCCL function

each generated from the `extern "C"` declarations in cudarc's `*/sys/mod.rs` (the crate
version Cargo.lock picks, found with `cargo metadata`) and compiled with `cc`. The
sonames are the real libraries' (CUDA 13, NCCL 2). Every function returns an error:
the driver CUDA_ERROR_STUB_LIBRARY (34, what NVIDIA's own link stub libcuda returns),
cuBLAS CUBLAS_STATUS_NOT_INITIALIZED, cuRAND CURAND_STATUS_INITIALIZATION_FAILED,
NCCL ncclUnhandledCudaError; the few that return a string say they are this stub.
cuGetErrorString/cuGetErrorName work, so that the error reaches the user as text:
`distill --device cuda` with these loaded fails with "no NVIDIA driver" (device.rs)
and nothing can run on the GPU. What is faked is only what the loader needs.

Usage: cuda-stubs.py OUT_DIR [--cudarc DIR] [--libs driver,cublas,...]   (then
LIBRARY_PATH=OUT_DIR to link, LD_LIBRARY_PATH=OUT_DIR to run; scripts/ci-cuda.sh does
both). `--libs driver` makes libcuda alone: `scripts/gpu-check.sh --no-gpu` links the real
cuBLAS, cuRAND and NCCL wheels and needs only the driver faked. Prints OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Lib:
    def __init__(self, module: str, soname: str, status: str, code: int, code_name: str):
        self.module = module  # cudarc's src/<module>/sys/mod.rs
        self.soname = soname
        self.link_name = soname.split(".so")[0] + ".so"
        self.status = status  # the C status type's name in cudarc's bindings
        self.code = code
        self.code_name = code_name


LIBS = [
    Lib("driver", "libcuda.so.1", "CUresult", 34, "CUDA_ERROR_STUB_LIBRARY"),
    Lib("cublas", "libcublas.so.13", "cublasStatus_t", 1, "CUBLAS_STATUS_NOT_INITIALIZED"),
    Lib("cublaslt", "libcublasLt.so.13", "cublasStatus_t", 1, "CUBLAS_STATUS_NOT_INITIALIZED"),
    Lib("curand", "libcurand.so.10", "curandStatus_t", 203, "CURAND_STATUS_INITIALIZATION_FAILED"),
    Lib("nccl", "libnccl.so.2", "ncclResult_t", 1, "ncclUnhandledCudaError"),
]

STUB_TEXT = "distill's link-only CI stub, not an NVIDIA library: no NVIDIA driver is installed"

# The driver's two error-text functions, written by hand: cudarc formats every
# DriverError through them, and a failing cuGetErrorString would hide the cause.
DRIVER_EXTRA = r"""
static const char *stub_error_text(int code) {
    switch (code) {
    case 0: return "no error";
    case 34: return "CUDA driver is a stub library (" STUB_TEXT ")";
    case 100: return "no CUDA-capable device is detected";
    default: return "error from " STUB_TEXT;
    }
}
static const char *stub_error_name(int code) {
    switch (code) {
    case 0: return "CUDA_SUCCESS";
    case 34: return "CUDA_ERROR_STUB_LIBRARY";
    case 100: return "CUDA_ERROR_NO_DEVICE";
    default: return "CUDA_ERROR_UNKNOWN";
    }
}
int cuGetErrorString(int code, const char **text) {
    if (text == 0) return 1; /* CUDA_ERROR_INVALID_VALUE */
    *text = stub_error_text(code);
    return 0;
}
int cuGetErrorName(int code, const char **name) {
    if (name == 0) return 1;
    *name = stub_error_name(code);
    return 0;
}
"""
HAND_WRITTEN = {"driver": ({"cuGetErrorString", "cuGetErrorName"}, DRIVER_EXTRA)}

DECL = re.compile(r"^\s*fn\s+([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*(?:->\s*(.+?))?\s*;\s*$")


def cudarc_dir() -> Path:
    """cudarc's source folder, for the version Cargo.lock resolves with the cuda feature."""
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--features", "distill-cli/cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = [p for p in json.loads(meta.stdout)["packages"] if p["name"] == "cudarc"]
    if len(found) != 1:
        raise SystemExit(f"cuda-stubs: expected one cudarc package in `cargo metadata`, got {len(found)}")
    return Path(found[0]["manifest_path"]).parent


def declarations(sys_rs: Path) -> dict[str, str | None]:
    """name -> return type (None: void) of every function in an `extern "C"` block."""
    found: dict[str, str | None] = {}
    inside = False
    for number, line in enumerate(sys_rs.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped == 'extern "C" {':
            inside = True
            continue
        if not inside:
            continue
        if stripped == "}":
            inside = False
            continue
        m = DECL.match(line)
        if not m:
            # A declaration over several lines, or anything else: fail rather than
            # silently leave a symbol out (the link would then fail far from here).
            raise SystemExit(f"cuda-stubs: cannot read {sys_rs}:{number}: {stripped}")
        name, ret = m.group(1), m.group(3)
        found.setdefault(name, ret)  # versions of one function differ only in arguments
    return found


def c_source(lib: Lib, decls: dict[str, str | None]) -> str:
    """One C function per declaration. Arguments are left out: under the x86-64 and
    aarch64 C calling conventions the caller owns them, so a stub may ignore them."""
    skip, extra = HAND_WRITTEN.get(lib.module, (set(), ""))
    out = [
        f"/* Generated by scripts/cuda-stubs.py from cudarc's src/{lib.module}/sys/mod.rs. */",
        f"/* {lib.soname}: {STUB_TEXT}. Every function fails with {lib.code_name}. */",
        f'#define STUB_TEXT "{STUB_TEXT}"',
        extra,
    ]
    for name, ret in sorted(decls.items()):
        if name in skip:
            continue
        if ret == lib.status:
            out.append(f"int {name}(void) {{ return {lib.code}; }}")
        elif ret is None:
            out.append(f"void {name}(void) {{}}")
        elif ret == "*const ::core::ffi::c_char":
            out.append(f'const char *{name}(void) {{ return "{lib.code_name} (" STUB_TEXT ")"; }}')
        elif ret in ("usize", "::core::ffi::c_int", "::core::ffi::c_uint"):
            out.append(f"unsigned long {name}(void) {{ return 0; }}")  # version queries
        else:
            raise SystemExit(f"cuda-stubs: {name} in {lib.module} returns {ret}, which this script cannot stub")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cudarc", type=Path, help="cudarc's source folder (default: from cargo metadata)")
    ap.add_argument("--libs", default=",".join(lib.module for lib in LIBS), help="which (default: all)")
    args = ap.parse_args()
    wanted = [m for m in args.libs.split(",") if m]
    unknown = set(wanted) - {lib.module for lib in LIBS}
    if unknown:
        print(f"cuda-stubs: unknown --libs {sorted(unknown)}; choose from {[lib.module for lib in LIBS]}", file=sys.stderr)
        return 2
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        print(f"cuda-stubs: no C compiler `{cc}` (Debian: apt-get install gcc)", file=sys.stderr)
        return 2
    src_root = (args.cudarc or cudarc_dir()) / "src"
    out = args.out_dir.resolve()
    (out / "src").mkdir(parents=True, exist_ok=True)
    for lib in [lib for lib in LIBS if lib.module in wanted]:
        decls = declarations(src_root / lib.module / "sys" / "mod.rs")
        c_file = out / "src" / f"{lib.module}.c"
        c_file.write_text(c_source(lib, decls))
        so = out / lib.soname
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O1", "-w", f"-Wl,-soname,{lib.soname}", "-o", str(so), str(c_file)],
            check=True,
        )
        link = out / lib.link_name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(lib.soname)
        print(f"cuda-stubs: {lib.soname}: {len(decls)} functions from cudarc {lib.module}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
