"""The canonical trace: one request a row, columns with units in their names.

``request_id, arrival_s, prompt_tokens, output_tokens[, acceptance_class][, slo_class]``

A :class:`Trace` holds the columns as numpy arrays sorted by ``(arrival_s, input row)``. Loaders for
public formats live in :mod:`simspec.traces.formats`; they all produce this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simspec.errors import TraceError

CANONICAL_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens")
OPTIONAL_COLUMNS = ("acceptance_class", "slo_class")
DEFAULT_CLASS = "default"


@dataclass
class Trace:
    """A request trace in canonical form.

    Attributes:
        request_id: string id per request (unique).
        arrival_s: arrival time in seconds from the trace start (non-decreasing, >= 0).
        prompt_tokens: prompt length in tokens (>= 1).
        output_tokens: tokens to generate (>= 1).
        acceptance_class: acceptance class per request (``"default"`` when the trace has none).
        slo_class: SLO class per request (``""`` when none).
        source: where it came from (file path and format), for reports.
        notes: repairs the loader made (e.g. "sorted 3 out-of-order rows"), shown to the user.
    """

    request_id: np.ndarray
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    acceptance_class: np.ndarray
    slo_class: np.ndarray
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @classmethod
    def from_columns(cls, *, request_id, arrival_s, prompt_tokens, output_tokens,
                     acceptance_class=None, slo_class=None, source: str = "",
                     notes: list[str] | None = None, sort: bool = True,
                     row_offset: int = 2) -> "Trace":
        """Build and validate a trace; ``row_offset`` maps index 0 to the file's line number for
        error messages (2 for a CSV with a header)."""
        n = len(arrival_s)
        where = source or "trace"
        if n == 0:
            raise TraceError(f"{where}: no requests")
        rid = _as_str_objects(request_id)
        arr = np.asarray(arrival_s, dtype=np.float64)
        pt = np.asarray(prompt_tokens)
        ot = np.asarray(output_tokens)
        for name, col in (("arrival_s", arr), ("prompt_tokens", pt), ("output_tokens", ot)):
            colf = np.asarray(col, dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(colf))
            if bad.size:
                raise TraceError(f"{where}: row {bad[0] + row_offset}: column {name}: not a finite number")
            if name != "arrival_s":
                bad = np.flatnonzero(colf != np.round(colf))
                if bad.size:
                    raise TraceError(f"{where}: row {bad[0] + row_offset}: column {name}: "
                                     f"not an integer ({colf[bad[0]]!r})")
                lo = 1
                bad = np.flatnonzero(colf < lo)
                if bad.size:
                    raise TraceError(f"{where}: row {bad[0] + row_offset}: column {name}: "
                                     f"must be >= {lo}, got {colf[bad[0]]:g}")
        bad = np.flatnonzero(arr < 0)
        if bad.size:
            raise TraceError(f"{where}: row {bad[0] + row_offset}: column arrival_s: must be >= 0, got {arr[bad[0]]:g}")
        pt = pt.astype(np.int64)
        ot = ot.astype(np.int64)
        repeated = repeated_mask(rid)
        if repeated.any():
            dup = min(rid[repeated])  # the smallest repeated id, as a sorted unique pass finds it
            rows = np.flatnonzero(rid == dup)
            raise TraceError(f"{where}: row {rows[1] + row_offset}: column request_id: duplicate id {dup!r} "
                             f"(first at row {rows[0] + row_offset})")
        acc = np.full(n, DEFAULT_CLASS, dtype=object) if acceptance_class is None else _as_str_objects(acceptance_class)
        if acceptance_class is not None:
            acc[acc == ""] = DEFAULT_CLASS
        slo = np.full(n, "", dtype=object) if slo_class is None else _as_str_objects(slo_class)
        notes = list(notes or [])
        if sort:
            back = int(np.count_nonzero(np.diff(arr) < 0))
            if back:
                order = np.argsort(arr, kind="stable")
                rid, arr, pt, ot, acc, slo = (c[order] for c in (rid, arr, pt, ot, acc, slo))
                notes.append(f"sorted {back} out-of-order arrival(s) by arrival_s (stable)")
        return cls(request_id=rid, arrival_s=arr, prompt_tokens=pt, output_tokens=ot,
                   acceptance_class=acc, slo_class=slo, source=source, notes=notes)

    def to_frame(self):
        """The trace as a pandas DataFrame with the canonical columns."""
        import pandas as pd

        return pd.DataFrame({
            "request_id": self.request_id.astype(str),
            "arrival_s": self.arrival_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "acceptance_class": self.acceptance_class.astype(str),
            "slo_class": self.slo_class.astype(str),
        })

    def subset(self, idx: np.ndarray) -> "Trace":
        """Rows ``idx`` (in that order) as a new trace."""
        return Trace(self.request_id[idx], self.arrival_s[idx], self.prompt_tokens[idx],
                     self.output_tokens[idx], self.acceptance_class[idx], self.slo_class[idx],
                     source=self.source, notes=list(self.notes))


def _as_str_objects(values) -> np.ndarray:
    """An object array of ``str`` (a new array; elements already ``str`` are kept, not copied)."""
    a = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if a.dtype == object and a.ndim == 1:
        out = a.copy()
        kinds = np.frompyfunc(type, 1, 1)(out) if out.size else out
        other = np.flatnonzero(kinds != str) if out.size else np.empty(0, dtype=np.int64)
        for i in other:
            out[i] = str(out[i])
        return out
    return np.asarray([str(x) for x in np.asarray(values).ravel()], dtype=object)


def repeated_mask(ids) -> np.ndarray:
    """Mask of every element of ``ids`` (str) whose value occurs more than once. Memory-light: the
    values' hashes (8 bytes each) are sorted to find candidates, which are then compared exactly,
    so the answer never depends on the process's hash seed."""
    ids = np.asarray(ids, dtype=object)
    n = ids.shape[0]
    mask = np.zeros(n, dtype=bool)
    if n < 2:
        return mask
    h = np.fromiter(map(hash, ids), dtype=np.int64, count=n)
    s = np.sort(h)
    same = s[1:] == s[:-1]
    if not same.any():
        return mask
    cand = np.flatnonzero(np.isin(h, np.unique(s[1:][same])))
    counts: dict[str, int] = {}
    for i in cand:
        counts[ids[i]] = counts.get(ids[i], 0) + 1
    mask[cand] = [counts[ids[i]] > 1 for i in cand]
    return mask


def first_repeat(ids) -> int | None:
    """Index of the first element of ``ids`` equal to an earlier one, or None."""
    ids = np.asarray(ids, dtype=object)
    seen: set[str] = set()
    for i in np.flatnonzero(repeated_mask(ids)):
        if ids[i] in seen:
            return int(i)
        seen.add(ids[i])
    return None
