"""Named latency-calibration grids beyond ``tiny``/``quick``/``full`` (no torch: the CLI checks
``--grid`` names before importing anything heavy).

Axes are per request: ``batch_sizes`` B, ``tokens_per_request`` T (1 = decode, 2..9 = verify of
k = 1..8 drafts, larger = prefill chunks), ``context_tokens`` C already cached. Serving grids are
measured with ``--max-batched-tokens`` (B*T above it is not a serving shape and is skipped) and cut
to the model's window; the skipped nodes are filled from the linear fit and listed in the profile.
"""

from __future__ import annotations

from typing import Any

#: GPU serving shapes: batch up to 256, tokens per step up to 8192, context up to 8192.
SERVING = dict(
    batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256],
    tokens_per_request=[1, 2, 3, 4, 5, 7, 9, 16, 64, 256, 1024, 4096, 8192],
    context_tokens=[0, 512, 1024, 2048, 4000, 8000],
    heldout=[[1, 6, 3000], [3, 2, 1500], [6, 1, 700], [12, 3, 1536], [24, 1, 6000], [48, 5, 2500],
             [96, 1, 1200], [200, 2, 600], [160, 1, 3000], [5, 32, 1024], [10, 128, 512],
             [2, 512, 2048], [1, 2048, 0], [40, 8, 5000]],
    warmup=3, min_repeats=5, max_repeats=20, target_s=0.1,
    lm_head_batch_sizes=[1, 4, 16, 64, 256],
    composition_check=[[1, 1, 1024], [1, 5, 1024], [32, 1, 2048], [32, 5, 2048], [128, 1, 1024],
                       [1, 1024, 0]])

#: The prepared H200 run (benchmarks/gpu/calibrate_and_validate.sh): two 7-8B models in bf16 in
#: about two minutes each, same range as ``serving`` on a coarser lattice.
H200_8MIN = dict(
    batch_sizes=[1, 4, 16, 64, 256],
    tokens_per_request=[1, 3, 5, 9, 64, 512, 2048, 8192],
    context_tokens=[0, 512, 2048, 4000, 8000],
    heldout=[[2, 2, 1000], [8, 1, 3000], [32, 4, 1500], [128, 1, 700], [2, 256, 1024],
             [1, 1024, 0], [12, 7, 6000], [200, 2, 300]],
    warmup=2, min_repeats=5, max_repeats=10, target_s=0.05,
    lm_head_batch_sizes=[1, 4, 16, 64, 256],
    composition_check=[[1, 1, 1024], [16, 5, 2048], [64, 1, 1024], [1, 512, 0]])

#: A CPU stand-in for the prepared run's grid (its ``--dry-run``): tiny shapes, seconds.
DRY_RUN = dict(
    batch_sizes=[1, 4], tokens_per_request=[1, 5, 64], context_tokens=[0, 256],
    heldout=[[2, 3, 128], [3, 1, 200]], warmup=1, min_repeats=3, max_repeats=5, target_s=0.02,
    composition_check=[[1, 1, 128]])

EXTRA_GRIDS: dict[str, dict[str, Any]] = {"serving": SERVING, "h200-8min": H200_8MIN, "dry-run": DRY_RUN}
GRID_NAMES: tuple[str, ...] = ("tiny", "quick", "full", *EXTRA_GRIDS)
