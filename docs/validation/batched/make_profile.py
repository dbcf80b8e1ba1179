"""Build the profile of the batched speculative validation (issue 16, item 4).

SmolLM2-135M, CPU, fp32, 1 torch thread:

- ``embed``, ``layer``, ``lm_head``: the transformers-cb validation's b8 profile
  (``../transformers-cb/b8/smollm2-135m-cpu-fp32-1thread-b8.json``: every batch size 1..8 a grid node);
- ``adapter``: measured here by ``simspec.calibrate.latency.calibrate_latency`` on
  ``grid-adapter-1thread-b8.yaml`` (same batch and context axes);
- ``acceptance``: the bundled ``smollm2-135m-cpu-fp32`` profile's draft / kangaroo / hispec sections
  (real runs of the same model, fp32, 1 thread; acceptance does not depend on threads).

Usage: python docs/validation/batched/make_profile.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(out: str) -> None:
    from simspec.calibrate.latency import calibrate_latency, load_grid
    from simspec.calibrate.models import load_model
    from simspec.calibrate.profile_io import update_profile
    from simspec.profile import load_profile

    base = json.loads((HERE.parent / "transformers-cb/b8/smollm2-135m-cpu-fp32-1thread-b8.json").read_text())
    bundled = load_profile("smollm2-135m-cpu-fp32")
    target = load_model("smollm2-135m", "fp32", "cpu")
    res = calibrate_latency(target, load_grid(str(HERE / "grid-adapter-1thread-b8.yaml")), threads=1,
                            progress=False, stages=["adapter"])
    lat = copy.deepcopy(base["latency"])
    lat["stages"]["adapter"] = res.latency["stages"]["adapter"]
    meta = copy.deepcopy(base["meta"])
    meta["name"] = Path(out).stem
    meta["description"] = ("SmolLM2-135M CPU fp32 1 thread: b8 embed/layer/lm_head + adapter measured for the "
                           "batched speculative validation; acceptance from the bundled smollm2-135m-cpu-fp32")
    meta["adapter_calibration"] = res.meta.get("latency_calibration")
    meta["provenance"] = "docs/validation/batched/make_profile.py"
    dst = Path(out)
    if dst.exists():
        dst.unlink()
    update_profile(dst, latency=lat, models=base["models"], capacity=base["capacity"], meta_updates=meta,
                   acceptance=copy.deepcopy(bundled.doc["acceptance"]))
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_profile.py OUT.json")
    main(sys.argv[1])
