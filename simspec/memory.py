"""Hand freed heap memory back to the operating system (glibc), for long runs' peak memory.

glibc's ``malloc`` raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after the first few large numpy arrays come and go, arrays of a few MiB are carved from the heap,
and their pages stay resident after ``free`` unless they sit at the heap's top. A million-request
replay builds its step log per replica and then moves it into one table column by column, so
without help its resident set holds the freed per-replica logs next to the new table (2.0 GiB at
1M requests on 16 replicas instead of ~1.6 GiB; docs/performance.md). :func:`release_free_memory`
calls ``malloc_trim(0)``, which returns every free page of the heap to the OS (``MADV_DONTNEED``);
the simulator calls it after phases that free much memory. It changes no result, costs a few
milliseconds, and does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
_tried = False


def _malloc_trim():
    global _trim, _tried
    if not _tried:
        _tried = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = libc.malloc_trim
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
                _trim = fn
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _trim = None
    return _trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``). True if memory was
    released, False if none was or the C library has no ``malloc_trim``."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
