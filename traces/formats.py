"""Readers for trace formats, each converting to the canonical :class:`~simspec.trace.Trace`.

Formats are registered in :data:`FORMATS` (name → reader) and auto-detected from the header
(CSV) or the first record (JSONL). Every reader refuses what it cannot parse with the file, line
and column named; repairs it makes (sorting out-of-order rows) are listed in ``Trace.notes``.
"""

from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from simspec.errors import TraceError
from simspec.trace import CANONICAL_COLUMNS, OPTIONAL_COLUMNS, Trace

Reader = Callable[[Path], Trace]
FORMATS: dict[str, Reader] = {}
# detector: (format name, predicate over the lower-cased header field set)
_DETECTORS: list[tuple[str, Callable[[set[str]], bool]]] = []


def register_format(name: str, detect: Callable[[set[str]], bool] | None = None):
    """Decorator: register a reader under ``name``; ``detect`` recognises its CSV header."""

    def deco(fn: Reader) -> Reader:
        FORMATS[name] = fn
        if detect is not None:
            _DETECTORS.append((name, detect))
        return fn

    return deco


def bundled_traces() -> dict[str, Path]:
    """Map bundled trace name (file stem) → path."""
    d = Path(str(resources.files("simspec.traces") / "data"))
    return {p.stem: p for p in sorted(list(d.glob("*.csv")) + list(d.glob("*.jsonl")))}


DEFAULT_TRACE = "azure_code_2023"


def bundled_trace_path(name: str) -> Path:
    traces = bundled_traces()
    if name not in traces:
        raise TraceError(f"no bundled trace {name!r} (bundled: {', '.join(traces)})")
    return traces[name]


def _read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            first = fh.readline()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None
    if not first.strip():
        raise TraceError(f"{path}: empty file (no header line)")
    return [h.strip() for h in next(csv.reader([first]))]


def detect_format(path: Path) -> str:
    """Name of the format of ``path``, from its header; raises :class:`TraceError` if unknown."""
    path = Path(path)
    header = _read_header(path)
    fields = {h.lower() for h in header}
    for name, pred in _DETECTORS:
        if pred(fields):
            return name
    raise TraceError(f"{path}: line 1: unknown header {','.join(header)!r}; expected the canonical columns "
                     f"{','.join(CANONICAL_COLUMNS)} or a known public format (see `simspec trace --help`)")


def load_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """Read ``path`` (format auto-detected unless ``fmt`` is given) into a canonical trace."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(f"{path}: unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    return FORMATS[fmt](path)


def read_csv_strings(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
                     case_insensitive: bool = False) -> dict[str, list[str]]:
    """Read a CSV as strings, checking the header: every ``required`` column present, nothing outside
    ``required + optional``. Returns column name (as in ``required``/``optional``) → values.

    Errors name the file and line: a row with the wrong number of fields, a missing or unknown
    column, a file with a header and no rows.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not any(c.strip() for c in rows[0]):
        raise TraceError(f"{path}: empty file (no header line)")
    header = [h.strip() for h in rows[0]]
    key = (lambda s: s.lower()) if case_insensitive else (lambda s: s)
    known = {key(c): c for c in required + optional}
    pos: dict[str, int] = {}
    for i, h in enumerate(header):
        if key(h) not in known:
            raise TraceError(f"{path}: line 1: unexpected column {h!r} (expected {', '.join(required + optional)})")
        if known[key(h)] in pos:
            raise TraceError(f"{path}: line 1: column {h!r} appears twice")
        pos[known[key(h)]] = i
    for c in required:
        if c not in pos:
            raise TraceError(f"{path}: line 1: missing column {c!r}")
    body = [(ln, r) for ln, r in enumerate(rows[1:], start=2) if any(x.strip() for x in r)]
    if not body:
        raise TraceError(f"{path}: header but no requests")
    out: dict[str, list[str]] = {c: [] for c in pos}
    lines: list[int] = []
    ncol = len(header)
    for ln, r in body:
        if len(r) != ncol:
            raise TraceError(f"{path}: line {ln}: expected {ncol} fields, got {len(r)} "
                             f"(wrong delimiter or truncated row?)")
        for c, i in pos.items():
            out[c].append(r[i].strip())
        lines.append(ln)
    out["__line__"] = lines  # type: ignore[assignment]
    return out


def parse_numeric(path: Path, column: str, values: list[str], lines: list[int], *,
                  integer: bool, min_value: float | None = None) -> np.ndarray:
    """Parse a column of strings as numbers; the first bad value is reported with its line."""
    out = np.empty(len(values), dtype=np.float64)
    for j, v in enumerate(values):
        try:
            x = float(v)
        except ValueError:
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not a number ({v!r})") from None
        if not np.isfinite(x):
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not a finite number ({v!r})")
        if integer and x != int(x):
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not an integer ({v!r})")
        if min_value is not None and x < min_value:
            raise TraceError(f"{path}: line {lines[j]}: column {column}: must be >= {min_value:g}, got {v}")
        out[j] = x
    return out.astype(np.int64) if integer else out


@register_format("canonical", detect=lambda f: {"request_id", "arrival_s", "prompt_tokens", "output_tokens"} <= f)
def read_canonical(path: Path) -> Trace:
    """The canonical CSV: ``request_id, arrival_s, prompt_tokens, output_tokens[, acceptance_class][, slo_class]``."""
    cols = read_csv_strings(path, CANONICAL_COLUMNS, OPTIONAL_COLUMNS)
    lines = cols["__line__"]
    arr = parse_numeric(path, "arrival_s", cols["arrival_s"], lines, integer=False, min_value=0)
    pt = parse_numeric(path, "prompt_tokens", cols["prompt_tokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "output_tokens", cols["output_tokens"], lines, integer=True, min_value=1)
    for j, v in enumerate(cols["request_id"]):
        if v == "":
            raise TraceError(f"{path}: line {lines[j]}: column request_id: empty")
    return _finish(path, "canonical", lines, cols["request_id"], arr, pt, ot,
                   cols.get("acceptance_class"), cols.get("slo_class"))


def _finish(path: Path, fmt: str, lines: list[int], rid, arr, pt, ot, acc=None, slo=None,
            notes: list[str] | None = None) -> Trace:
    """Duplicate-id check with line numbers, then build (sorting out-of-order arrivals, reported)."""
    seen: dict[str, int] = {}
    for j, r in enumerate(rid):
        if r in seen:
            raise TraceError(f"{path}: line {lines[j]}: column request_id: duplicate id {r!r} "
                             f"(first at line {seen[r]})")
        seen[r] = lines[j]
    return Trace.from_columns(request_id=rid, arrival_s=arr, prompt_tokens=pt, output_tokens=ot,
                              acceptance_class=acc, slo_class=slo, source=f"{path} ({fmt})",
                              notes=notes)


@register_format("azure2023", detect=lambda f: {"timestamp", "contexttokens", "generatedtokens"} <= f)
def read_azure(path: Path) -> Trace:
    """Azure LLM inference trace (2023 and 2024): ``TIMESTAMP, ContextTokens, GeneratedTokens``.

    Timestamps are wall-clock strings; arrival_s is seconds since the earliest one. Request ids are
    ``azure-<line>``.
    """
    import pandas as pd

    cols = read_csv_strings(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), case_insensitive=True)
    lines = cols["__line__"]
    pt = parse_numeric(path, "ContextTokens", cols["ContextTokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "GeneratedTokens", cols["GeneratedTokens"], lines, integer=True, min_value=1)
    ts = pd.to_datetime(pd.Series(cols["TIMESTAMP"]), errors="coerce", format="mixed", utc=True)
    bad = np.flatnonzero(ts.isna().to_numpy())
    if bad.size:
        j = int(bad[0])
        raise TraceError(f"{path}: line {lines[j]}: column TIMESTAMP: not a timestamp ({cols['TIMESTAMP'][j]!r})")
    ns = ts.astype("int64").to_numpy()
    arr = (ns - ns.min()) / 1e9
    rid = [f"azure-{ln}" for ln in lines]
    return _finish(path, "azure2023", lines, rid, arr, pt, ot)
