"""Whole-process replay time of two simspec installs side by side (before/after tables).

Runs ``simspec replay`` of each case with each given install, alternating (A, B, A, B, …) so both
see the same machine load, and prints wall seconds, peak RSS and the load average. Example (the
docs/performance.md table):

    python benchmarks/bench_speed_table.py --simspec before=/path/old/.venv/bin/simspec \\
        --simspec after=.venv/bin/simspec --repeat 2
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time

CASES = {
    "azure-code fcfs draft:k=4 x4": ["--policy", "fcfs", "--spec", "draft:k=4", "--replicas", "4"],
    "azure-code fcfs none x4": ["--policy", "fcfs", "--spec", "none", "--replicas", "4"],
    "azure-code laps-sd draft:k=4 x4": ["--policy", "laps-sd", "--spec", "draft:k=4", "--replicas", "4"],
    "azure-code fcfs draft smartspec x4": ["--policy", "fcfs", "--spec", "draft:k=4", "--spec-len", "smartspec",
                                           "--replicas", "4"],
}


def run_once(simspec: str, trace: list[str], args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one whole process."""
    with tempfile.TemporaryDirectory() as d:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run([simspec, "replay", *trace, *args, "--out", os.path.join(d, "run"), "-q"], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(rss, before) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simspec", action="append", required=True, metavar="LABEL=PATH",
                    help="an install's simspec executable (give two or more)")
    ap.add_argument("--trace", default=None, help="trace file [default: the bundled Azure code trace]")
    ap.add_argument("--case", action="append", default=None, choices=sorted(CASES))
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    installs = [s.split("=", 1) for s in a.simspec]
    trace = [a.trace] if a.trace else []
    cases = a.case or list(CASES)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print(f"{'case':40s} " + " ".join(f"{lab + ' s':>12s}" for lab, _ in installs) + "   ratio")
    for case in cases:
        best = {lab: float("inf") for lab, _ in installs}
        for _ in range(a.repeat):
            for lab, path in installs:
                wall, _ = run_once(path, trace, CASES[case])
                best[lab] = min(best[lab], wall)
        vals = [best[lab] for lab, _ in installs]
        print(f"{case:40s} " + " ".join(f"{v:12.2f}" for v in vals) + f"   {vals[0] / vals[-1]:5.1f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
