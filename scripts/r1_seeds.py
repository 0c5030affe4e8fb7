#!/usr/bin/env python3
"""Runs a distill config with several seeds and prints held-out accuracy per
model as mean +- sample standard deviation, plus the mean cost per stage.

    cargo build --release
    python3 scripts/r1_seeds.py --config configs/small.toml --seeds 1234 1 2

Each seed runs as `runs/<name>-seed<S>/`; a run whose report.json already
exists is read, not run again, so an interrupted sweep continues where it
stopped. Only the Python standard library is used.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--bin", default="target/release/distill")
    ap.add_argument("--out-dir", default="runs")
    ap.add_argument("--name", default=None, help="run name prefix (default: the config file's stem)")
    args = ap.parse_args()

    name = args.name or Path(args.config).stem
    reports = []
    for seed in args.seeds:
        run = f"{name}-seed{seed}"
        report = Path(args.out_dir) / run / "report.json"
        if not report.is_file():
            cmd = [args.bin, "--config", args.config, "--seed", str(seed), "--name", run,
                   "--out-dir", args.out_dir, "--force"]
            print("+", " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        reports.append(json.loads(report.read_text()))

    def fmt(xs):
        if len(xs) < 2:
            return f"{100 * xs[0]:.1f}%"
        return f"{100 * statistics.mean(xs):.1f}% +- {100 * statistics.stdev(xs):.1f}"

    names = [m["name"] for m in reports[0]["models"]]
    print(f"\n{args.config}, seeds {' '.join(map(str, args.seeds))}\n")
    print("| model | params | held-out accuracy (mean +- std) | per seed |")
    print("|---|---:|---:|---|")
    for n in names:
        ms = [next(m for m in r["models"] if m["name"] == n) for r in reports]
        accs = [m["accuracy"] for m in ms if m["accuracy"] is not None]
        if not accs:
            continue
        per = ", ".join(f"{100 * a:.1f}" for a in accs)
        print(f"| {n} | {ms[0]['params']} | {fmt(accs)} | {per} |")
    arms_table(reports, fmt)
    acc = [r["traces"]["acceptance"]["acceptance_rate"] for r in reports if r.get("traces")]
    if acc:
        print(f"\ntrace acceptance rate: {fmt(acc)}")
    print("\n| stage | wall s (mean) | device-hours (mean) | dollars (mean) |")
    print("|---|---:|---:|---:|")
    stages = [s["stage"] for s in reports[0]["cost"]["stages"]]
    for st in stages:
        rows = [next(s for s in r["cost"]["stages"] if s["stage"] == st) for r in reports]
        mean = lambda k: statistics.mean(x[k] for x in rows)  # noqa: E731
        print(f"| {st} | {mean('wall_seconds'):.1f} | {mean('device_hours'):.4f} | ${mean('dollars'):.4f} |")
    tot = statistics.mean(r["cost"]["total_dollars"] for r in reports)
    print(f"| total | {statistics.mean(r['cost']['total_wall_seconds'] for r in reports):.1f} | "
          f"{statistics.mean(r['cost']['total_device_hours'] for r in reports):.4f} | ${tot:.4f} |")
    return 0


def arms_table(reports, fmt):
    """Every arm's accuracy as a share of the teacher's (per seed, then mean +- std), its
    student FLOPs and dollars (means), and accuracy points per dollar."""
    if not reports[0].get("arms"):
        return
    print("\n| arm | stages paid for | accuracy / teacher's | student FLOPs | dollars | points per dollar |")
    print("|---|---|---:|---:|---:|---:|")
    for a0 in reports[0]["arms"]:
        n = a0["name"]
        arms = [next(a for a in r["arms"] if a["name"] == n) for r in reports]
        teachers = [next(m for m in r["models"] if m["name"] == "teacher")["accuracy"] for r in reports]
        share = [a["accuracy"] / t for a, t in zip(arms, teachers) if a["accuracy"] is not None and t]
        ppd = [100 * a["accuracy"] / a["dollars"] for a in arms if a["accuracy"] is not None and a["dollars"] > 0]
        ppd_s = f"{statistics.mean(ppd):.0f}" if ppd else "-"
        print(f"| {n} | {' + '.join(a0['stages'])} | {fmt(share) if share else '-'} | "
              f"{statistics.mean(a['student_flops'] for a in arms):.3e} | "
              f"${statistics.mean(a['dollars'] for a in arms):.4f} | {ppd_s} |")


if __name__ == "__main__":
    sys.exit(main())
