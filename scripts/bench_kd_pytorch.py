#!/usr/bin/env python3
"""PyTorch eager baseline for the fused distillation loss benchmark (crates/distill/benches/kd_loss.rs).

Measures forward + backward of

    F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T**2

on the CPU, f32, with torch.set_num_threads(THREADS), for random (N, V) logits, under two
allocator settings, each in processes of its own because glibc reads GLIBC_TUNABLES at start-up:

- glibc-default: glibc as configured. Buffers this large are mmap'd and unmapped on free, so
  every call faults its pages in again.
- glibc-tuned: GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736,
  which keeps freed memory in the heap for reuse: PyTorch at its best (docs/design.md).

Per setting:
- cold: COLD_RUNS fresh processes, each timing the very first call (lazy initialisation and
  first page faults included);
- warm: one process, WARMUP untimed calls, then REPS timed ones (median and min).

Peak extra memory is the resident-set high-water mark of a cold call: in the fresh process,
after the inputs exist, VmHWM is reset to the current RSS by writing 5 to /proc/self/clear_refs;
after the call, VmHWM minus the RSS before it is the figure (`rss_peak_extra_bytes`, reported
as the median over the cold processes). Where the reset is refused, VmHWM before the call
serves as the base, which is exact as long as making the inputs did not overshoot (they are
created in place). A warm call under glibc-tuned reuses memory the process already holds, so
its delta would say little; the cold call is what a process pays to run the loss at all.

Setup (a virtual environment outside the repository):

    python3 -m venv ~/venvs/kd-bench && ~/venvs/kd-bench/bin/pip install torch numpy
    PYTHON=~/venvs/kd-bench/bin/python scripts/bench_kd.sh          # the whole comparison
    ~/venvs/kd-bench/bin/python scripts/bench_kd_pytorch.py --n 64 --v 1024 --reps 3

On a GPU (`--device cuda`, what scripts/gpu-check.sh runs against the Rust bench's
`--device cuda`): the same loss on the GPU, each call ended by torch.cuda.synchronize(), and
the peak extra memory from torch.cuda.max_memory_allocated() (device memory, not RSS); the
allocator settings then do not matter, so pass one (`--allocs glibc-default`).

Prints a human-readable summary, then one JSON line per allocator setting, in the format of
the Rust bench.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
MIB = 1024.0 * 1024.0


def status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args):
    """Runs in a process of its own; prints one JSON object."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    # Created in place, so that no temporary pushes the high-water mark above the base.
    s = torch.randn(args.n, args.v, generator=gen).mul_(2.0).to(dev).requires_grad_()
    t = torch.randn(args.n, args.v, generator=gen).mul_(2.0).to(dev)
    temp = args.t

    def step():
        loss = F.kl_div(
            F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="batchmean"
        ) * (temp * temp)
        loss.backward()
        assert s.grad is not None
        if gpu:
            torch.cuda.synchronize(dev)  # the gradient too, not only the loss
        return loss.item()

    def measured():
        s.grad = None  # outside the timing: the next call allocates its gradient afresh
        if gpu:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            reset, base = True, torch.cuda.memory_allocated(dev)
        else:
            reset = reset_rss_peak()
            base = status_bytes("VmRSS") if reset else status_bytes("VmHWM")
        t0 = time.perf_counter()
        value = step()
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated(dev) if gpu else status_bytes("VmHWM")
        return ms, peak - base, reset, value

    if args.worker == "cold":
        ms, rss, reset, value = measured()
        out = {"ms": ms, "rss_peak_extra_bytes": rss, "hwm_reset": reset, "loss_value": value}
    else:
        for _ in range(args.warmup):
            measured()
        runs = [measured() for _ in range(args.reps)]
        out = {
            "times_ms": [r[0] for r in runs],
            "rss_warm_peak_extra_bytes": max(r[1] for r in runs),
            "loss_value": runs[0][3],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    print(json.dumps(out), flush=True)


def spawn(args, mode, tuned):
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    cmd += ["--n", str(args.n), "--v", str(args.v), "--t", str(args.t), "--reps", str(args.reps)]
    cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device]
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    def env_int(key, default):
        return int(os.environ.get(key, default))

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=env_int("KD_N", 2048))
    p.add_argument("--v", type=int, default=env_int("KD_V", 32768))
    p.add_argument("--t", type=float, default=float(os.environ.get("KD_T", 2.0)))
    p.add_argument("--reps", type=int, default=env_int("KD_REPS", 10))
    p.add_argument("--warmup", type=int, default=env_int("KD_WARMUP", 2))
    p.add_argument("--cold-runs", type=int, default=env_int("KD_COLD_RUNS", 3))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocs", default="glibc-default,glibc-tuned", help="comma-separated subset")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--worker", choices=["cold", "warm"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    nv = args.n * args.v * 4
    print(
        f"pytorch eager: N {args.n}, V {args.v}, T {args.t}, f32, device {args.device}, {args.threads} threads, "
        f"{args.warmup} warm-up + {args.reps} timed, {args.cold_runs} cold processes; "
        f"one (N, V) f32 tensor = {nv / MIB:.1f} MiB",
        flush=True,
    )
    lines = []
    for alloc in [a for a in args.allocs.split(",") if a]:
        if alloc not in ("glibc-default", "glibc-tuned"):
            sys.exit(f"unknown allocator setting {alloc!r}")
        tuned = alloc == "glibc-tuned"
        colds = [spawn(args, "cold", tuned) for _ in range(max(args.cold_runs, 1))]
        warm = spawn(args, "warm", tuned)
        times = warm["times_ms"]
        rss = int(statistics.median(c["rss_peak_extra_bytes"] for c in colds))
        line = {
            "impl": "pytorch-eager",
            "loss": "forward_kl",
            "alloc": alloc,
            "n": args.n,
            "v": args.v,
            "t": args.t,
            "threads": warm["threads"],
            "reps": len(times),
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "cold_ms": statistics.median(c["ms"] for c in colds),
            "cold_ms_runs": [c["ms"] for c in colds],
            "peak_extra_bytes": rss,
            "peak_method": "cuda-max-memory-allocated" if args.device.startswith("cuda") else "rss-hwm-cold-call",
            "device": args.device,
            "rss_peak_extra_bytes": rss,
            "rss_warm_peak_extra_bytes": warm["rss_warm_peak_extra_bytes"],
            "hwm_reset": all(c["hwm_reset"] for c in colds),
            "loss_value": warm["loss_value"],
            "torch": warm["torch"],
        }
        print(
            f"{alloc:<14} warm median {line['median_ms']:.1f} ms, min {line['min_ms']:.1f} ms; "
            f"cold {line['cold_ms']:.1f} ms (runs {', '.join(f'{x:.0f}' for x in line['cold_ms_runs'])}); "
            f"peak extra RSS {rss / MIB:.1f} MiB = {rss / nv:.2f} x (N, V)",
            flush=True,
        )
        lines.append(line)
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
