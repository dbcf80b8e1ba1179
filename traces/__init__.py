"""Trace formats, synthetic workloads and bundled sample traces.

``load_trace(path, fmt=None)`` reads any supported format into a canonical
:class:`simspec.trace.Trace`; ``bundled_trace_path(name)`` finds a shipped sample.
"""

from simspec.traces.formats import FORMATS, bundled_trace_path, bundled_traces, detect_format, load_trace

__all__ = ["FORMATS", "bundled_trace_path", "bundled_traces", "detect_format", "load_trace"]
