#!/usr/bin/env python3
"""Proves that our CUDA kernels compile, on a machine with no GPU.

For every .cu file under crates/distill/src/kernels/ and every target architecture
(sm_80: A100, sm_90: H100/H200), this compiles the source to PTX with NVRTC, the same
compiler loss/cuda.rs calls at run time and with the same options (`--std=c++17` and
one `--gpu-architecture=compute_XY`, no include path), then assembles the PTX with
`ptxas -arch=sm_XY --warning-as-error`. Any NVRTC error or warning, or any ptxas
error or warning, fails the check with the compiler's log; otherwise it prints one
line per file, architecture and variant.

Variants: a file may list the extra option sets it is compiled with at run time in a
comment line `nvrtc-variants: -DA=1 | -DA=2`; each is checked besides the plain file
(divergence.cu uses this to compile one student dtype's kernels at a time).

Needs the CUDA 13.0 wheels of scripts/cuda-toolchain.sh:
    eval "$(scripts/cuda-toolchain.sh)" && python3 scripts/check_cuda_kernels.py
libnvrtc is looked up in $CUDA_ROOT/lib (or --cuda-root), ptxas in $CUDA_ROOT/bin,
then on PATH. Exit status: 0 all good, 1 a kernel failed, 2 the toolchain is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "crates" / "distill" / "src" / "kernels"
ARCHS = ("80", "90")
# Keep in step with NVRTC_OPTIONS in crates/distill/src/loss/cuda.rs.
NVRTC_OPTIONS = ("--std=c++17",)


class ToolchainError(Exception):
    pass


class Nvrtc:
    """The few NVRTC entry points we need, through ctypes."""

    def __init__(self, cuda_root: Path):
        libs = sorted(glob.glob(str(cuda_root / "lib" / "libnvrtc.so*")))
        # libnvrtc.so.13, not libnvrtc-builtins (loaded by libnvrtc itself from the
        # same folder, which is why LD_LIBRARY_PATH must hold it) nor the .alt build.
        libs = [p for p in libs if re.fullmatch(r"libnvrtc\.so(\.\d+)*", os.path.basename(p))]
        if not libs:
            raise ToolchainError(
                f"no libnvrtc.so* in {cuda_root / 'lib'}; run: eval \"$(scripts/cuda-toolchain.sh)\""
            )
        self.path = libs[0]
        try:
            self.lib = ctypes.CDLL(self.path)
        except OSError as e:
            raise ToolchainError(f"cannot load {self.path}: {e}") from e
        lib = self.lib
        prog_p = ctypes.POINTER(ctypes.c_void_p)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        lib.nvrtcCreateProgram.argtypes = [
            prog_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcGetPTXSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [prog_p]

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.lib.nvrtcGetErrorString(status).decode()
            hint = ""
            if status == 7:  # NVRTC_ERROR_BUILTIN_OPERATION_FAILURE
                hint = " (libnvrtc-builtins not found: LD_LIBRARY_PATH must include $CUDA_ROOT/lib)"
            raise ToolchainError(f"{what} failed: {msg} (error {status}){hint}")

    def compile(self, source: str, name: str, options: list[str]) -> tuple[bool, str, str]:
        """(compiled, log, ptx) of one compilation."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace").strip()
            if status != 0:
                # A compile error is the kernel's fault, not the toolchain's, unless NVRTC
                # itself could not run (error 7: its builtins library is missing).
                if status == 7:
                    self._check(status, "nvrtcCompileProgram")
                msg = self.lib.nvrtcGetErrorString(status).decode()
                return False, f"{msg}\n{log}".strip(), ""
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return True, log, ptx.value.decode()
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def variants(source: str) -> list[list[str]]:
    """[] (the plain file) and every option set of the file's `nvrtc-variants:` lines."""
    found: list[list[str]] = [[]]
    for m in re.finditer(r"nvrtc-variants:(.*)$", source, flags=re.M):
        found += [v.split() for v in m.group(1).split("|") if v.strip()]
    return found


def find_ptxas(cuda_root: Path) -> str:
    cand = cuda_root / "bin" / "ptxas"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("ptxas")
    if found:
        return found
    raise ToolchainError(f"no ptxas in {cuda_root / 'bin'} or on PATH; run: eval \"$(scripts/cuda-toolchain.sh)\"")


def assemble(ptxas: str, ptx: str, arch: str, tmp: Path) -> tuple[bool, str]:
    """(assembled, ptxas output) of one PTX module; -v gives per-kernel resource use."""
    src = tmp / f"kernel_sm{arch}.ptx"
    src.write_text(ptx)
    cmd = [ptxas, f"-arch=sm_{arch}", "--warning-as-error", "-v", "-o", str(tmp / f"kernel_sm{arch}.cubin"), str(src)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    return run.returncode == 0, (run.stdout + run.stderr).strip()


def head(log: str, lines: int = 60) -> str:
    """The first `lines` lines of a compiler log: one mistake can repeat in every kernel."""
    all_lines = log.splitlines()
    more = len(all_lines) - lines
    return "\n".join(all_lines[:lines] + ([f"... ({more} more lines)"] if more > 0 else []))


def resources(ptxas_log: str) -> str:
    """A short summary of ptxas -v: the most registers of any kernel, and any spills."""
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", ptxas_log)]
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log)]
    text = f"max {max(regs)} registers" if regs else "registers unknown"
    return text + (f", SPILLS {max(spills)} bytes" if any(spills) else ", no spills")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda-root", type=Path, default=os.environ.get("CUDA_ROOT"), help="default: $CUDA_ROOT")
    ap.add_argument("files", nargs="*", type=Path, help=f"default: every .cu under {KERNELS.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.cuda_root is None:
        print("check_cuda_kernels: CUDA_ROOT is not set; run: eval \"$(scripts/cuda-toolchain.sh)\"", file=sys.stderr)
        return 2
    files = args.files or sorted(KERNELS.rglob("*.cu"))
    if not files:
        print(f"check_cuda_kernels: no .cu files under {KERNELS}", file=sys.stderr)
        return 1
    try:
        nvrtc = Nvrtc(args.cuda_root)
        ptxas = find_ptxas(args.cuda_root)
        print(f"NVRTC {nvrtc.version()} ({nvrtc.path}), ptxas {ptxas}")
    except ToolchainError as e:
        print(f"check_cuda_kernels: {e}", file=sys.stderr)
        return 2

    failed = 0
    with tempfile.TemporaryDirectory(prefix="check_cuda_kernels.") as tmpdir:
        tmp = Path(tmpdir)
        for path in files:
            rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
            source = path.read_text()
            for arch in ARCHS:
                for extra in variants(source):
                    options = [*NVRTC_OPTIONS, f"--gpu-architecture=compute_{arch}", *extra]
                    what = f"{rel} [{' '.join(extra) or 'all'}]"
                    try:
                        ok, log, ptx = nvrtc.compile(source, path.name, options)
                    except ToolchainError as e:
                        print(f"check_cuda_kernels: {e}", file=sys.stderr)
                        return 2
                    if not ok or log:
                        # NVRTC has no -Werror: a log after a successful compile holds
                        # warnings, and those fail the check too.
                        kind = "error" if not ok else "warnings"
                        print(f"FAIL {what} compute_{arch}: NVRTC {kind} ({' '.join(options)}):\n{head(log)}\n")
                        failed += 1
                        continue
                    kernels = len(re.findall(r"^\.visible \.entry ", ptx, flags=re.M))
                    ok, out = assemble(ptxas, ptx, arch, tmp)
                    if not ok:
                        print(f"FAIL {what} sm_{arch}: ptxas -arch=sm_{arch} --warning-as-error:\n{head(out)}\n")
                        failed += 1
                        continue
                    print(
                        f"ok   {what}: NVRTC compute_{arch} -> ptxas sm_{arch}, {kernels} kernels, "
                        f"PTX {len(ptx) // 1024} KiB, {resources(out)}"
                    )
    sys.stdout.flush()  # the summary after the per-file lines, also when both go to one terminal
    if failed:
        print(f"check_cuda_kernels: {failed} compilation(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
