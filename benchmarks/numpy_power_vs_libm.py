"""How often numpy's float64 power differs from the C library's ``pow`` on this machine.

    python benchmarks/numpy_power_vs_libm.py [--n 200000] [--k 8]

SmartSpec's expected tokens use ``α ** arange(k+1)`` (numpy); the fast lane computes ``α ** j``
with the C library (numba). numpy dispatches its power to SIMD kernels where the CPU has them
(AVX-512 here), which can differ in the last bit. Prints the share of random α in [0, 1) whose
cumulative sums ``Σ_{j≤k} α^j`` differ between the two. Rerun with
``NPY_DISABLE_CPU_FEATURES="AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL X86_V4"``
to compare without AVX-512. (Why the lane leaves SmartSpec decisions between goodputs within 1e-12
of each other to the engine: docs/engine.md, "The fast lane".)
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    alphas = np.random.default_rng(0).random(a.n)
    numpy_sums = np.cumsum(alphas[:, None] ** np.arange(a.k + 1)[None, :], axis=1)
    differ = 0
    for r, x in enumerate(alphas.tolist()):
        acc, row = 0.0, numpy_sums[r]
        for j in range(a.k + 1):
            acc += math.pow(x, float(j))  # the C library's pow
            if acc != row[j]:
                differ += 1
                break
    print(f"numpy {np.__version__} (its SIMD targets: np.show_runtime())")
    print(f"{differ:,} of {a.n:,} alphas ({100 * differ / a.n:.2f} %) give cumulative sums of α^j, j <= {a.k}, "
          f"that differ between numpy's power and the C library's pow")


if __name__ == "__main__":
    main()
