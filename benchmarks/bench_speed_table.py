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
    "fcfs draft:k=4 x4": ["--policy", "fcfs", "--spec", "draft:k=4", "--replicas", "4"],
    "fcfs none x4": ["--policy", "fcfs", "--spec", "none", "--replicas", "4"],
    "laps-sd draft:k=4 x4": ["--policy", "laps-sd", "--spec", "draft:k=4", "--replicas", "4"],
    "fcfs draft smartspec x4": ["--policy", "fcfs", "--spec", "draft:k=4", "--spec-len", "smartspec",
                                "--replicas", "4"],
    # paper-style batching: the scheduler picks the batch every step
    "laps-sd draft:k=4 preemptive x4": ["--policy", "laps-sd", "--spec", "draft:k=4", "--batching", "preemptive",
                                        "--replicas", "4"],
    "srpt draft:k=4 preemptive x4": ["--policy", "srpt", "--spec", "draft:k=4", "--batching", "preemptive",
                                     "--replicas", "4"],
    # methods that need a layer-level profile: the analytic Vicuna-7B one (prompts past its grid
    # are extrapolated, the same for every install)
    "analytic fcfs draft:k=4 x4": ["--profile", "vicuna7b-a100-analytic", "--allow-extrapolation", "--policy", "fcfs",
                                   "--spec", "draft:k=4", "--replicas", "4"],
    "analytic fcfs kangaroo x4": ["--profile", "vicuna7b-a100-analytic", "--allow-extrapolation", "--policy", "fcfs",
                                  "--spec", "kangaroo", "--replicas", "4"],
    "analytic fcfs hispec x4": ["--profile", "vicuna7b-a100-analytic", "--allow-extrapolation", "--policy", "fcfs",
                                "--spec", "hispec", "--replicas", "4"],
    # the same on a trace with prompts past the analytic profile's KV capacity (the Mooncake
    # conversation trace: 120k-token prompts): a 256k-token KV budget per replica, a what-if
    **{f"analytic kv256k fcfs {m} x4": ["--profile", "vicuna7b-a100-analytic", "--allow-extrapolation",
                                         "--kv-budget-tokens", "262144", "--policy", "fcfs", "--spec", m,
                                         "--replicas", "4"] for m in ("draft:k=4", "kangaroo", "hispec")},
    **{f"analytic kv256k laps-sd {m} x4": ["--profile", "vicuna7b-a100-analytic", "--allow-extrapolation",
                                            "--kv-budget-tokens", "262144", "--policy", "laps-sd", "--spec", m,
                                            "--replicas", "4"] for m in ("kangaroo", "hispec")},
}


def run_once(simspec: str, trace: list[str], args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole process; (nan, nan) if that install refuses the case."""
    with tempfile.TemporaryDirectory() as d:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([simspec, "replay", *trace, *args, "--out", os.path.join(d, "run"), "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return float("nan"), float("nan")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu


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
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); "
          f"best of {a.repeat}, wall s / CPU s per install; ratio = first / last install (wall)")
    print(f"{'case':34s} " + " ".join(f"{lab:>16s}" for lab, _ in installs) + "   ratio  load")
    for case in cases:
        best = {lab: (float("inf"), float("inf")) for lab, _ in installs}
        for _ in range(a.repeat):
            for lab, path in installs:
                wall, cpu = run_once(path, trace, CASES[case])
                if not wall >= best[lab][0]:  # nan (refused) stays nan
                    best[lab] = (wall, cpu)
        vals = [best[lab] for lab, _ in installs]
        cells = " ".join(f"{w:7.2f} /{c:7.2f}" if w == w and w != float("inf") else f"{'n/a':>16s}" for w, c in vals)
        ratio = vals[0][0] / vals[-1][0]
        print(f"{case:34s} {cells}   {ratio:5.1f}x  {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
