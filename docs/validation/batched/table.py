"""Print the README table rows of the batched validation reports in this directory (or the given
run directories): latency MAPE, mean / p50 / p99 error, TTFT, makespan, steps and mean batch real vs
simulated, tokens per decode step, real/model step time, load.

Usage: python docs/validation/batched/table.py [RUN_DIR ...]"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pct(v):
    return "-" if v is None else f"{v:+.1f}%"


def row(d: Path) -> str:
    doc = json.loads((d / "validation.json").read_text())
    e, m, h = doc["errors"], doc["meta"], doc["heldout"]
    lat, st, acc = e["latency"], h["steps"], h.get("acceptance_model", {})
    fa = h.get("forced_acceptance")
    during = m["machine_load_during"]
    return " | ".join([
        f"[{d.name}]({d.name}/)", Path(m["trace"]).stem, m["method"], f"{m['policy']} / {m['batch']['batching']}",
        "forced" if m["batch"]["forced"] else "real",
        f"**{e['latency_mape_pct']:.1f}%**", pct(lat["mean"]["err_pct"]), pct(lat["p50"]["err_pct"]),
        pct(lat["p99"]["err_pct"]), f"{e['ttft_mape_pct']:.1f}%", pct(e["ttft"]["mean"]["err_pct"]),
        f"{pct(e['makespan']['err_pct'])} ({e['makespan']['real_s']:.0f} s)",
        f"{st['n_real']}/{st['n_sim']}", f"{st['mean_batch_real']:.2f}/{st['mean_batch_sim']:.2f}",
        (f"{acc['real_tokens_per_step']:.3f}/{acc['model_tokens_per_step']:.3f}"
         if acc.get("real_tokens_per_step") else "-"),
        f"{st['decode_real_over_model_median']:.3f} / {st['prefill_real_over_model_median']:.3f} / "
        f"{st.get('decode_cpu_over_model_median') or float('nan'):.3f}",
        (f"{fa['identical']}/{fa['requests']}" if fa else "-"),
        f"{m['machine_load_before']['loadavg_1m']}→{during['max_1m']}→{m['machine_load_after']['loadavg_1m']}",
        f"{during['other_processes_cores_mean']}",
        "yes" if m["valid"] else "**no**",
    ])


HEAD = ("| run | trace | method | policy / batching | acceptance | latency MAPE | mean | p50 | p99 | TTFT MAPE | "
        "TTFT mean | makespan (real) | steps real/sim | mean batch real/sim | tokens/decode step real/sim | "
        "real/model step time, median: decode / with prefills / decode CPU time | requests accepted identically | "
        "load 1m before→max→after | other procs' cores | valid |")


if __name__ == "__main__":
    dirs = [Path(a) for a in sys.argv[1:]] or sorted(p.parent for p in HERE.glob("*/validation.json"))
    print(HEAD)
    print("|" + "---|" * HEAD.count(" | ") + "---|")
    for d in dirs:
        print("| " + row(d) + " |")
