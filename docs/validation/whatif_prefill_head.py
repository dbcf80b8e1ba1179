"""What-if: re-simulate a committed validation run with the prefill LM head charged for the last prompt
token only (as the runners do), and print the error before and after.

Usage: python docs/validation/whatif_prefill_head.py RUN_DIR METHOD POLICY [PROFILE] [TRACE]"""
import sys, pandas as pd
from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.run import simulate
from simspec.traces.formats import load_trace
from simspec.validation_report import compare
d, method, policy = sys.argv[1], sys.argv[2], sys.argv[3]
orig = CostModel.target_ms
def patched(self, b, bt, kv, speculating=False):
    ms = orig(self, b, bt, kv, speculating)
    if kv == 0 and bt > b and self.has("lm_head"):
        ms += self.stage_ms("lm_head", b, b, kv) - self.stage_ms("lm_head", b, bt, kv)
    return ms
prof = load_profile(sys.argv[4] if len(sys.argv) > 4 else "docs/validation/smollm2-135m-cpu-fp32-dev.json")
tr = load_trace(sys.argv[5] if len(sys.argv) > 5 else "traces/data/validation_small.csv")
cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(method, "m"), max_batch_size=1, kv_budget_tokens=4096, allow_extrapolation=True)
real = pd.read_csv(f"{d}/real_requests.csv")
for label in ("as is", "prefill head last token"):
    if label != "as is":
        CostModel.target_ms = patched
    e = compare(real, simulate(cfg, tr, prof).requests)
    print(label, "MAPE %.1f mean %+.1f p99 %+.1f makespan %+.1f ttft-mean %+.1f" % (e["latency_mape_pct"], e["latency"]["mean"]["err_pct"], e["latency"]["p99"]["err_pct"], e["makespan"]["err_pct"], e["ttft"]["mean"]["err_pct"]))
