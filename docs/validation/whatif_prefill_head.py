"""Re-simulate a committed batch-1 validation run with today's simulator (which charges a prefill's
LM head for its last prompt position only, as the runners do; the committed reports predate that
fix) and print its error against the run's real tables. No torch, no real run.

Usage: python docs/validation/whatif_prefill_head.py RUN_DIR METHOD POLICY [PROFILE] [TRACE]"""
import sys

import pandas as pd

from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.traces.formats import load_trace
from simspec.validation_report import compare

d, method, policy = sys.argv[1], sys.argv[2], sys.argv[3]
prof = load_profile(sys.argv[4] if len(sys.argv) > 4 else "docs/validation/smollm2-135m-cpu-fp32-dev.json")
tr = load_trace(sys.argv[5] if len(sys.argv) > 5 else "traces/data/validation_small.csv")
cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(method, "m"), max_batch_size=1,
                kv_budget_tokens=10**6, allow_extrapolation=True, batching="preemptive")
real = pd.read_csv(f"{d}/real_requests.csv")
committed = pd.read_csv(f"{d}/sim_requests.csv")
for label, sim in (("committed simulation", committed), ("today's simulator", simulate(cfg, tr, prof).requests)):
    e = compare(real, sim)
    print(label, "MAPE %.1f mean %+.1f p99 %+.1f makespan %+.1f ttft-mean %+.1f" % (
        e["latency_mape_pct"], e["latency"]["mean"]["err_pct"], e["latency"]["p99"]["err_pct"],
        e["makespan"]["err_pct"], e["ttft"]["mean"]["err_pct"]))
