"""Trace loading: wall time and peak memory of ``load_trace`` on generated N-row files.

    python benchmarks/bench_trace_load.py [--rows 1000000] [--formats canonical,mooncake,azure]
        [--before-pythonpath DIR] [--workdir DIR]

Writes one deterministic file per format (seed 0; canonical via ``simspec trace synth``'s
generator, Mooncake JSONL and Azure 2023 CSV with the same lengths), then loads each in a fresh
process and prints wall time and peak RSS (``ru_maxrss``) of that process, with the RSS after
imports for reference. ``--before-pythonpath DIR`` also measures another checkout (a directory that
holds a ``simspec`` package, put first on ``PYTHONPATH``), alternating the two so that both see the
same machine load. Prints the load average beside every figure (no timed tests: a script only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# peak RSS from VmHWM (this process's high-water mark; ru_maxrss would include the parent's, which
# survives fork and exec)
_CHILD = r"""
import json, sys, time
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import numpy, pandas, pyarrow
from simspec.traces.formats import load_trace
import simspec.traces.formats as f
t1 = time.perf_counter()
base = hwm_mib()
tr = load_trace(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"rows": len(tr), "load_s": t2 - t1, "rss_after_imports_mib": base,
                  "peak_rss_mib": hwm_mib(), "module": f.__file__}))
"""


def write_files(rows: int, workdir: Path, formats: list[str]) -> dict[str, Path]:
    import numpy as np

    from simspec.traces.formats import write_canonical
    from simspec.traces.synthetic import LognormalLengths, PoissonArrivals, parse_classes, synthesize

    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    canon = workdir / f"canonical_{rows}.csv"
    tr = None
    if not canon.exists() or any(not (workdir / f"{f}_{rows}.{'jsonl' if f == 'mooncake' else 'csv'}").exists()
                                 for f in formats):
        # as `simspec trace synth --arrivals poisson --rate 80 --lengths lognormal:600,1.0,200,1.0
        #      --classes code:0.3,chat:0.7 --seed 0 --n ROWS`
        tr = synthesize(PoissonArrivals(80.0), LognormalLengths.from_moments(600, 1.0, 200, 1.0), n=rows,
                        classes=parse_classes("code:0.3,chat:0.7"), seed=0)
    if "canonical" in formats:
        if not canon.exists():
            write_canonical(tr, canon)
        out["canonical"] = canon
    if "mooncake" in formats:
        p = workdir / f"mooncake_{rows}.jsonl"
        if not p.exists():
            with open(p, "w") as fh:
                for a, pt, ot in zip(tr.arrival_s.tolist(), tr.prompt_tokens.tolist(), tr.output_tokens.tolist()):
                    fh.write(json.dumps({"timestamp": int(a * 1000), "input_length": pt, "output_length": ot,
                                         "hash_ids": [1, 2, 3]}) + "\n")
        out["mooncake"] = p
    if "azure" in formats:
        p = workdir / f"azure_{rows}.csv"
        if not p.exists():
            t0 = np.datetime64("2023-11-16T18:00:00.0000000")
            ts = (t0 + (tr.arrival_s * 1e7).astype("int64").astype("timedelta64[100ns]")).astype(str)
            with open(p, "w") as fh:
                fh.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
                for t, pt, ot in zip(ts.tolist(), tr.prompt_tokens.tolist(), tr.output_tokens.tolist()):
                    fh.write(f"{t.replace('T', ' ')},{pt},{ot}\n")
        out["azure"] = p
    return out


def measure(path: Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # run from the file's folder: the child must not import a simspec/ folder from the current directory
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path.resolve())], env=env, capture_output=True, text=True,
                       cwd=path.resolve().parent)
    if r.returncode != 0:
        raise SystemExit(f"load of {path} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default="canonical,mooncake,azure")
    ap.add_argument("--before-pythonpath", default=None)
    ap.add_argument("--workdir", default="bench_traces")
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    files = write_files(args.rows, Path(args.workdir), formats)
    print(f"{'format':10} {'file MB':>8} {'code':7} {'load s':>7} {'peak RSS MiB':>13} {'after imports':>14}  load avg")
    for fmt, path in files.items():
        size = path.stat().st_size / 1e6
        runs = [("before", args.before_pythonpath), ("after", None)] if args.before_pythonpath else [("this", None)]
        for label, pp in runs:
            m = measure(path, pp)
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"{fmt:10} {size:8.1f} {label:7} {m['load_s']:7.2f} {m['peak_rss_mib']:13.0f} "
                  f"{m['rss_after_imports_mib']:14.0f}  {load}  ({m['module']})", flush=True)


if __name__ == "__main__":
    main()
