"""simspec.memory: freed heap memory goes back to the OS (glibc), and results do not change."""

from __future__ import annotations

import numpy as np
import pytest

from simspec import memory


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_arrays_leave_the_resident_set():
    big = np.ones(2_000_000)  # a 16 MB mapped block freed: glibc raises its mmap threshold to 16 MB
    del big
    arrays = [np.ones(300_000) for _ in range(160)]  # 2.4 MB each: now carved from the heap
    keep = np.ones(300_000)  # a live block above them, so the heap's top cannot simply shrink
    alive = _rss_mib()
    del arrays
    memory.release_free_memory()
    after = _rss_mib()
    assert after < alive - 0.8 * 160 * 2.4 * 1e6 / 2**20, (alive, after)
    assert keep.sum() == 300_000


def test_release_is_harmless_without_garbage():
    assert memory.release_free_memory() in (True, False)
