"""Named, independent random streams derived from one run seed.

Each stream is its own ``numpy.random.Generator`` seeded from ``SeedSequence(seed, spawn_key=(h,))``
where ``h`` is a stable hash (CRC-32) of the stream name. Adding a new stream never changes the
numbers drawn by existing ones, so the same config and seed give byte-identical outputs.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, name: str) -> np.random.Generator:
    """Return the generator for stream ``name`` of run ``seed``."""
    key = zlib.crc32(name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(key,)))


# --------------------------------------------------------------------- counter-based uniforms
# A draw is a pure function of (run seed, stream, request key, draw index): the numbers a request
# sees do not depend on which replica serves it, on the batch it shares, or on how many steps the
# engine advances at once. SplitMix64's finaliser (Steele, Lea & Flood 2014) applied to a
# Weyl-spaced combination of the three keys, twice; 53 high bits → a double in [0, 1).

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G1 = np.uint64(0x9E3779B97F4A7C15)
_G2 = np.uint64(0xD1B54A32D192ED03)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0
# the same constants as 0-d arrays: an array operand skips numpy's scalar conversion (about half
# the cost of each operation on the small arrays of one step)
_A_M1, _A_M2, _A_G2 = (np.array(c, dtype=np.uint64) for c in (_M1, _M2, _G2))
_A_S30, _A_S27, _A_S31, _A_S11 = (np.array(c, dtype=np.uint64) for c in (_S30, _S27, _S31, _S11))
_A_INV53 = np.array(_INV53)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def stream_key(seed: int, name: str) -> np.uint64:
    """A 64-bit key for counter-based draws of stream ``name`` of run ``seed``."""
    key = zlib.crc32(name.encode("utf-8"))
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(key,))
    return np.uint64(int(ss.generate_state(1, dtype=np.uint64)[0]))


def request_bases(key: np.uint64, request_key: np.ndarray) -> np.ndarray:
    """Per-request SplitMix64 starting states for stream ``key`` (computed once per run)."""
    with np.errstate(over="ignore"):
        return _mix(_mix((np.asarray(request_key, dtype=np.uint64) * _G1) ^ key))


def counter_uniforms(base: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) for draws ``counter`` of requests with starting states ``base`` (uint64
    arrays that broadcast together): SplitMix64's output ``mix(base + counter·γ)``. Same inputs →
    same numbers, whatever the array shapes."""
    with np.errstate(over="ignore"):
        z = np.add(base, np.multiply(counter, _A_G2, dtype=np.uint64), dtype=np.uint64)
        z ^= z >> _A_S30
        z *= _A_M1
        z ^= z >> _A_S27
        z *= _A_M2
        z ^= z >> _A_S31
        z >>= _A_S11
    u = z.astype(np.float64)
    u *= _A_INV53
    return u


def request_keys(request_id: np.ndarray) -> np.ndarray:
    """A stable 64-bit key per request id (independent of row order; pandas' SipHash of the text)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(request_id).astype(str).astype(object)).astype(np.uint64)
