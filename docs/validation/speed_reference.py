"""Does a speed probe timed around each run explain this machine's run-to-run drift?

    python docs/validation/speed_reference.py [docs/validation/batched-speedref]

For each batched report written with ``--speed-reference`` (the default), prints the simulator's
raw errors, the machine's speed from the probes (median measured / model time of fixed batch-1
target forwards, before and after the run), the speed the run's own steps had (median real /
model time of its decode-only steps), and the errors of the speed-referenced replay (every step
``speed_run / speed_calib`` times as long, speed_calib = the probe at the overhead-fit run). Then
compares the drift the probe saw (held-out over fit) with the drift the runs' steps showed
(held-out over fit), per method: if the probe tracked the machine, the two ratios would agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(d: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(d.glob("*/validation.json")):
        out[p.parent.name] = json.loads(p.read_text())
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "batched-speedref")
    runs = load(root)
    if not runs:
        raise SystemExit(f"{root}: no */validation.json")
    fit_step = {}  # method -> the fit run's decode real/model median
    for name, doc in runs.items():
        if name.startswith("calib-"):
            fit_step[doc["meta"]["method"].split(":")[0]] = doc["heldout"]["steps"]["decode_real_over_model_median"]
    head = ("run", "MAPE", "mean", "p99", "probe before/after", "probe run/fit", "steps run/fit",
            "ref MAPE", "ref mean", "ref p99")
    print(" | ".join(head))
    print("|".join(["---"] * len(head)))
    for name, doc in runs.items():
        e = doc["errors"]
        sr = doc["heldout"].get("speed_reference") or {}
        st = doc["heldout"]["steps"]
        method = doc["meta"]["method"].split(":")[0]
        row = [name, f"{e['latency_mape_pct']:.1f}%", f"{e['latency']['mean']['err_pct']:+.1f}%",
               f"{e['latency']['p99']['err_pct']:+.1f}%"]
        if sr:
            row.append(f"{sr['probe_before']['speed']:.3f} / {sr['probe_after']['speed']:.3f}")
        else:
            row.append("-")
        if "factor" in sr and method in fit_step:
            row += [f"{sr['factor']:.3f}", f"{st['decode_real_over_model_median'] / fit_step[method]:.3f}"]
            r = sr["errors"]
            row += [f"{r['latency_mape_pct']:.1f}%", f"{r['latency_mean_err_pct']:+.1f}%",
                    f"{r['latency_p99_err_pct']:+.1f}%"]
        else:
            row += ["-", "-", "-", "-", "-"]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
