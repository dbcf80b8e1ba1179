"""Readers for trace formats, each converting to the canonical :class:`~simspec.trace.Trace`.

Formats are registered in :data:`FORMATS` (name → reader) and auto-detected from the header
(CSV) or the keys of the first record (JSONL); ``load_trace(path, fmt=...)`` overrides detection.

========== ================================================ =========================================
format     detected by                                      arrival_s
========== ================================================ =========================================
canonical  ``request_id, arrival_s, prompt_tokens,          as written (seconds)
           output_tokens[, acceptance_class][, slo_class]``
azure2023  ``TIMESTAMP, ContextTokens, GeneratedTokens``,   wall clock → seconds since the earliest
           first timestamp without a time zone
azure2024  same header, first timestamp with a UTC offset   same; offsets honoured, naive → UTC
mooncake   JSONL, first record has ``timestamp,             ``timestamp`` (ms) / 1000
           input_length, output_length``
burstgpt   ``Timestamp, Model, Request tokens,              ``Timestamp`` (s) as written
           Response tokens, Total tokens, Log Type``
vidur      ``arrived_at, num_prefill_tokens,                ``arrived_at`` (s) as written
           num_decode_tokens``
lengths    ``num_prefill_tokens, num_decode_tokens`` (or    none: needs an arrival process
           ``prompt_tokens, output_tokens``) and no time
========== ================================================ =========================================

Repair policy (the same for every format): rows whose arrival times go backwards are sorted by
arrival time (stable) and the count is reported in ``Trace.notes``; BurstGPT rows with zero
``Response tokens`` (failed requests) are dropped and counted in ``Trace.notes``; Azure files that
mix time-zone-aware and naive timestamps read the naive ones as UTC, counted in ``Trace.notes``.
Everything else a reader cannot parse (truncated rows, wrong delimiter, unknown header or key,
non-numbers, non-integers, lengths < 1, negative times, duplicate ids) is refused with one
:class:`~simspec.errors.TraceError` naming the file, the line and the column.

Any file may be gzip-compressed (``trace.csv.gz``; recognised by its magic bytes). Limits that keep
a malformed or hostile file from exhausting memory: a line is at most :data:`MAX_LINE_BYTES`
(checked while reading, before anything is parsed), an id or class name at most
:data:`MAX_FIELD_CHARS` characters; values echoed in errors are cut to 80 characters.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from simspec.atomic import clip
from simspec.errors import TraceError
from simspec.trace import CANONICAL_COLUMNS, OPTIONAL_COLUMNS, Trace, first_repeat

MAX_LINE_BYTES = 1 << 20  # 1 MiB: no trace format has lines anywhere near this long
MAX_FIELD_CHARS = 1024  # request_id, acceptance_class, slo_class
_READ_CHUNK = 16 << 20

Reader = Callable[[Path], Trace]
FORMATS: dict[str, Reader] = {}
# detector: (format name, predicate over the lower-cased header field set / first record's key set)
_DETECTORS: list[tuple[str, Callable[[set[str]], bool]]] = []
_JSONL_DETECTORS: list[tuple[str, Callable[[set[str]], bool]]] = []
# formats whose files carry lengths but no arrival times (need an arrival process)
LENGTH_FORMATS: set[str] = set()


def register_format(name: str, detect: Callable[[set[str]], bool] | None = None, *, jsonl: bool = False):
    """Decorator: register a reader under ``name``; ``detect`` recognises its CSV header (or, with
    ``jsonl=True``, the key set of the first JSON record)."""

    def deco(fn: Reader) -> Reader:
        FORMATS[name] = fn
        if detect is not None:
            (_JSONL_DETECTORS if jsonl else _DETECTORS).append((name, detect))
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# Bundled samples
# ---------------------------------------------------------------------------------------------

LENGTHS_SUFFIX = "_lengths"


def _data_dir() -> Path:
    return Path(str(resources.files("simspec.traces") / "data"))


def bundled_traces() -> dict[str, Path]:
    """Map bundled trace name (file stem) → path. Length-only tables (``*_lengths.csv``) are not
    traces; see :func:`bundled_length_tables`."""
    d = _data_dir()
    return {p.stem: p for p in sorted(list(d.glob("*.csv")) + list(d.glob("*.jsonl")))
            if not p.stem.endswith(LENGTHS_SUFFIX)}


def bundled_length_tables() -> dict[str, Path]:
    """Map bundled length table name (file stem without ``_lengths``, e.g. ``sharegpt``) → path."""
    d = _data_dir()
    return {p.stem[: -len(LENGTHS_SUFFIX)]: p for p in sorted(d.glob(f"*{LENGTHS_SUFFIX}.csv"))}


DEFAULT_TRACE = "azure_code_2023"


def bundled_trace_path(name: str) -> Path:
    traces = bundled_traces()
    if name not in traces:
        raise TraceError(f"no bundled trace {name!r} (bundled: {', '.join(traces)})")
    return traces[name]


def resolve_trace_arg(text: str | Path) -> Path:
    """A trace given on the command line: an existing file, else a bundled trace or length-table
    name (``azure_code_2023``, ``sharegpt``, ...)."""
    p = Path(text)
    if p.exists():
        return p
    name = str(text)
    traces, tables = bundled_traces(), bundled_length_tables()
    if name in traces:
        return traces[name]
    if name in tables:
        return tables[name]
    if name.endswith(LENGTHS_SUFFIX) and name[: -len(LENGTHS_SUFFIX)] in tables:
        return tables[name[: -len(LENGTHS_SUFFIX)]]
    raise TraceError(f"{text}: no such file, and no bundled trace or length table of that name "
                     f"(bundled: {', '.join(list(traces) + list(tables))})")


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

_DELIMS = {";": "';'", "\t": "tab", "|": "'|'"}


def _delimiter_hint(header: list[str]) -> str:
    if len(header) == 1:
        for d, name in _DELIMS.items():
            if d in header[0]:
                return f" (the header looks {name}-delimited; simspec reads comma-separated files)"
    return ""


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with gzip's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _open_binary(path: Path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _too_long(path: Path, line: int) -> TraceError:
    return TraceError(f"{path}: line {line}: longer than {MAX_LINE_BYTES:,} bytes (no trace format has lines "
                      f"this long; a binary or corrupt file?)")


def read_text(path: Path) -> str:
    """The whole file as text (gzip decompressed; UTF-8, a byte-order mark ignored), refusing a line
    longer than :data:`MAX_LINE_BYTES` as soon as it is met (a 2 GB one-line file never reaches
    memory whole). Raises :class:`TraceError` with one line."""
    chunks: list[bytes] = []
    lines_before = 0
    carry = 0  # length of the unfinished line at the end of the previous chunk
    try:
        with _open_binary(path) as fh:
            while True:
                b = fh.read(_READ_CHUNK)
                if not b:
                    break
                nl = np.flatnonzero(np.frombuffer(b, dtype=np.uint8) == 10)
                if nl.size == 0:
                    carry += len(b)
                    if carry > MAX_LINE_BYTES:
                        raise _too_long(path, lines_before + 1)
                else:
                    if carry + int(nl[0]) > MAX_LINE_BYTES:
                        raise _too_long(path, lines_before + 1)
                    if nl.size > 1:
                        gaps = np.diff(nl) - 1
                        j = int(np.argmax(gaps))
                        if int(gaps[j]) > MAX_LINE_BYTES:
                            raise _too_long(path, lines_before + j + 2)
                    lines_before += int(nl.size)
                    carry = len(b) - int(nl[-1]) - 1
                    if carry > MAX_LINE_BYTES:
                        raise _too_long(path, lines_before + 1)
                chunks.append(b)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except (gzip.BadGzipFile, EOFError, zlib_error()) as exc:
        raise TraceError(f"{path}: a corrupt or truncated gzip file ({exc})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def zlib_error():
    import zlib

    return zlib.error


def _first_line(path: Path) -> str:
    try:
        with _open_binary(path) as fh:
            raw = fh.readline(MAX_LINE_BYTES + 1)
        if len(raw) > MAX_LINE_BYTES:
            raise _too_long(path, 1)
        return raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (gzip.BadGzipFile, EOFError, zlib_error()) as exc:
        raise TraceError(f"{path}: a corrupt or truncated gzip file ({exc})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None


def _read_header(path: Path) -> list[str]:
    first = _first_line(path)
    if not first.strip():
        raise TraceError(f"{path}: empty file (no header line)")
    return [h.strip() for h in next(csv.reader([first]))]


def _json_record(path: Path, line: str, ln: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: line {ln}: column {exc.colno}: not a complete JSON record "
                         f"({exc.msg}; truncated file?)") from None
    if not isinstance(rec, dict):
        raise TraceError(f"{path}: line {ln}: column 1: expected a JSON object, got {type(rec).__name__}")
    return rec


_TZ_RE = re.compile(r"(?:[zZ]|[+-]\d\d:?\d\d)$")
_AZURE_TS_RE = r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?(?:[zZ]|[+-]\d\d:?\d\d)?"


def detect_format(path: Path) -> str:
    """Name of the format of ``path``, from its header (CSV) or first record's keys (JSONL);
    raises :class:`TraceError` if unknown."""
    path = Path(path)
    first = _first_line(path)
    if not first.strip():
        raise TraceError(f"{path}: empty file (no header line)")
    if first.lstrip().startswith("{"):
        rec = _json_record(path, first, 1)
        keys = {str(k).lower() for k in rec}
        for name, pred in _JSONL_DETECTORS:
            if pred(keys):
                return name
        raise TraceError(f"{path}: line 1: unknown JSONL record keys {clip(','.join(map(str, rec)))}; expected Mooncake's "
                         f"timestamp,input_length,output_length[,hash_ids] (see docs/workloads.md)")
    header = [h.strip() for h in next(csv.reader([first]))]
    fields = {h.lower() for h in header}
    for name, pred in _DETECTORS:
        if pred(fields):
            if name == "azure2023":
                return _azure_flavour(path)
            return name
    raise TraceError(f"{path}: line 1: unknown header {clip(','.join(header))}{_delimiter_hint(header)}; expected the "
                     f"canonical columns {','.join(CANONICAL_COLUMNS)} or a known public format "
                     f"(see docs/workloads.md)")


def _azure_flavour(path: Path) -> str:
    """azure2024 when the first data row's timestamp carries a time zone, else azure2023."""
    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader)]
        for row in reader:
            if any(c.strip() for c in row):
                i = header.index("timestamp")
                if i < len(row) and _TZ_RE.search(row[i].strip()):
                    return "azure2024"
                break
    return "azure2023"


def load_trace(path: str | Path, fmt: str | None = None, *, arrivals=None, seed: int = 0) -> Trace:
    """Read ``path`` (format auto-detected unless ``fmt`` is given) into a canonical trace.

    A length-only table (format ``lengths``) has no arrival times: it is refused unless
    ``arrivals`` (a :mod:`simspec.traces.synthetic` arrival process, e.g. ``PoissonArrivals(4.0)``)
    is given, in which case the table's rows, in order, arrive at times drawn from it with
    ``simspec.rng.stream(seed, "arrivals")``.
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(f"{path}: unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    if fmt in LENGTH_FORMATS:
        if arrivals is None:
            return FORMATS[fmt](path)  # validates the table, then refuses (no arrival times)
        return _lengths_with_arrivals(path, arrivals, seed)
    if arrivals is not None:
        raise TraceError(f"{path}: has its own arrival times ({fmt}); an arrival process only goes with a "
                         f"length-only table (use `simspec trace synth --arrivals replay:{path}` to replay "
                         f"its timestamps, or --rate/--rate-scale to rescale them)")
    return FORMATS[fmt](path)


def length_table_refusal(path: Path) -> str:
    return (f"{path}: a length-only table (no arrival times); give an arrival process: --rate R "
            f"(Poisson arrivals at R req/s) on replay/stats/convert, or "
            f"`simspec trace synth --lengths empirical:{path} --arrivals poisson --rate R --n N --out FILE`")


# ---------------------------------------------------------------------------------------------
# Shared parsing helpers
# ---------------------------------------------------------------------------------------------

def read_csv_strings(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
                     case_insensitive: bool = False) -> dict[str, list[str]]:
    """Read a CSV as strings, checking the header: every ``required`` column present, nothing outside
    ``required + optional``. Returns column name (as in ``required``/``optional``) → values, plus
    ``"__line__"`` → the file line number of each row.

    Errors name the file and line: a row with the wrong number of fields, a missing or unknown
    column, a file with a header and no rows. A UTF-8 byte-order mark is ignored.
    """
    text = read_text(path)
    quoted = '"' in text
    try:  # without quotes, only the header now: the body is read by _regular_body or further below
        nl = text.find("\n")
        rows = list(csv.reader(io.StringIO(text if quoted else text[: nl if nl >= 0 else len(text)])))
    except csv.Error as exc:
        raise TraceError(f"{path}: not a readable CSV ({exc})") from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise TraceError(f"{path}: empty file (no header line)")
    header = [h.strip() for h in rows[0]]
    key = (lambda s: s.lower()) if case_insensitive else (lambda s: s)
    known = {key(c): c for c in required + optional}
    pos: dict[str, int] = {}
    for i, h in enumerate(header):
        if key(h) not in known:
            raise TraceError(f"{path}: line 1: column {i + 1}: unexpected column {clip(h)}{_delimiter_hint(header)} "
                             f"(expected {', '.join(required + optional)})")
        if known[key(h)] in pos:
            raise TraceError(f"{path}: line 1: column {clip(h)} appears twice")
        pos[known[key(h)]] = i
    for c in required:
        if c not in pos:
            raise TraceError(f"{path}: line 1: missing column {c!r}")
    fast = _regular_body(text, len(header), pos)
    if fast is not None:
        return fast
    if not quoted:
        rows = list(csv.reader(io.StringIO(text)))
    body_rows = rows[1:]
    keep = [i for i, r in enumerate(body_rows) if "".join(r).strip()]  # skip blank lines
    if not keep:
        raise TraceError(f"{path}: header but no requests")
    body = body_rows if len(keep) == len(body_rows) else [body_rows[i] for i in keep]
    lines: list[int] = [i + 2 for i in keep]
    ncol = len(header)
    lens = np.fromiter(map(len, body), dtype=np.int64, count=len(body))
    bad = np.flatnonzero(lens != ncol)
    if bad.size:
        j = int(bad[0])
        got = int(lens[j])
        where = (f"column {header[got]} missing" if got < ncol else f"extra field after column {header[-1]}")
        raise TraceError(f"{path}: line {lines[j]}: expected {ncol} fields, got {got} "
                         f"({where}; wrong delimiter or truncated row?)")
    columns = list(zip(*body))
    out: dict[str, list[str]] = {c: [v.strip() for v in columns[i]] for c, i in pos.items()}
    out["__line__"] = lines  # type: ignore[assignment]
    return out


def _regular_body(text: str, ncol: int, pos: dict[str, int]) -> dict[str, list[str]] | None:
    """Fast path for large files: the body read by pandas' C parser when the file has no quotes and
    every row has exactly ``ncol`` fields and no blank lines; ``None`` otherwise (the exact,
    error-reporting path in :func:`read_csv_strings` then reads it)."""
    if '"' in text:
        return None
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), header=None, skiprows=1, names=list(range(ncol + 1)), dtype=object,
                         keep_default_na=False, na_values=[""], skip_blank_lines=False, engine="c")
    except Exception:
        return None
    na = df.isna().to_numpy()
    # regular: no empty or missing field, and nothing in the spare column (no extra field)
    if len(df) == 0 or na[:, :ncol].any() or not na[:, ncol].all():
        return None
    out: dict[str, list[str]] = {c: df[i].str.strip().tolist() for c, i in pos.items()}
    out["__line__"] = list(range(2, len(df) + 2))  # type: ignore[assignment]
    return out


# ---------------------------------------------------------------------------------------------
# Bounded-memory fast path: the file streamed in line-aligned pieces, parsed by pyarrow into typed
# columns. It never raises: on anything it does not read exactly as the exact path would (quotes,
# blank or ragged rows, a bad number, non-UTF-8, a line over the limit, ...) it returns ``None`` and
# the exact path (:func:`read_csv_strings`, the whole file as strings) reads the file again and
# reports the first problem with the same one-line message as always. Memory on a well-formed file:
# one piece (:data:`_PIECE_BYTES`) plus the typed columns.
# ---------------------------------------------------------------------------------------------

_PIECE_BYTES = 4 << 20
#: a numeric column's rule: (integer, min_value) as :func:`parse_numeric` takes them
NumericRule = tuple[bool, "float | None"]


def iter_line_pieces(path: Path, piece_bytes: int | None = None) -> Iterator[bytes]:
    """``path`` (gzip decompressed) in pieces of about ``piece_bytes`` that each end at a newline
    (the last one at the end of the file). Raises :class:`TraceError` (line number as
    :func:`read_text` counts it) as soon as a line longer than :data:`MAX_LINE_BYTES` is met, so a
    hostile file is never held whole."""
    piece_bytes = piece_bytes or _PIECE_BYTES
    pending = b""
    line = 1  # number of the line `pending` starts
    with _open_binary(path) as fh:
        while True:
            b = fh.read(piece_bytes)
            if not b:
                break
            cut = b.rfind(b"\n")
            if cut < 0:
                pending += b
                if len(pending) > MAX_LINE_BYTES:
                    raise _too_long(path, line)
                continue
            out = pending + b[: cut + 1]
            pending = b[cut + 1:]
            nl = np.flatnonzero(np.frombuffer(out, dtype=np.uint8) == 10)
            starts = np.concatenate(([0], nl[:-1] + 1))
            longest = nl - starts
            if int(longest.max()) > MAX_LINE_BYTES:
                raise _too_long(path, line + int(np.argmax(longest > MAX_LINE_BYTES)))
            line += int(nl.size)
            if len(pending) > MAX_LINE_BYTES:
                raise _too_long(path, line)
            yield out
    if pending:
        yield pending


def _strip_objects(a: np.ndarray) -> np.ndarray:
    """``str.strip`` of every element of an object array of str (unchanged strings keep their object)."""
    if a.size == 0:
        return a
    return _STRIP(a).astype(object, copy=False)


_STRIP = np.frompyfunc(str.strip, 1, 1)


def _read_csv_fast(path: Path, required: tuple[str, ...], optional: tuple[str, ...], case_insensitive: bool,
                   numeric: dict[str, NumericRule], categorical: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Typed columns of a regular CSV (see the section comment), or ``None``: column name → float64
    array (``numeric``, already checked against its rule) or object array of stripped str, plus
    ``"__line__"`` → int64 line numbers. ``categorical`` string columns share one str object per
    distinct value."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        first = _first_line(path)
        if '"' in first or not first.strip():
            return None
        header = [h.strip() for h in next(csv.reader([first]))]
        key = (lambda s: s.lower()) if case_insensitive else (lambda s: s)
        known = {key(c): c for c in required + optional}
        pos: dict[str, int] = {}
        for i, h in enumerate(header):
            if key(h) not in known or known[key(h)] in pos:
                return None
            pos[known[key(h)]] = i
        if any(c not in pos for c in required):
            return None
        names = [f"f{i}" for i in range(len(header))]
        types = {names[i]: (pa.float64() if c in numeric else pa.string()) for c, i in pos.items()}
        for i, nm in enumerate(names):
            types.setdefault(nm, pa.string())  # unused columns: still checked to be UTF-8
        read_opts = pacsv.ReadOptions(column_names=names, use_threads=False)
        parse_opts = pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False, newlines_in_values=False)
        conv_opts = pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=False,
                                         quoted_strings_can_be_null=False, check_utf8=True)
        pool = pa.default_memory_pool()
        parts: dict[str, list[np.ndarray]] = {c: [] for c in pos}
        n = 0
        head = True
        for piece in iter_line_pieces(path):
            if head:  # drop the byte-order mark and the header line
                head = False
                if piece.startswith(b"\xef\xbb\xbf"):
                    piece = piece[3:]
                nl = piece.find(b"\n")
                piece = piece[nl + 1:] if nl >= 0 else b""
            if not piece:
                continue
            if b'"' in piece or piece.count(b"\r") != piece.count(b"\r\n"):
                return None
            table = pacsv.read_csv(pa.BufferReader(piece), read_options=read_opts, parse_options=parse_opts,
                                   convert_options=conv_opts, memory_pool=pool)
            for c, i in pos.items():
                col = table.column(names[i])
                if c in numeric:
                    if col.null_count:
                        return None
                    x = col.to_numpy()
                    integer, lo = numeric[c]
                    if not bool(np.isfinite(x).all()) or (integer and not bool((x == np.trunc(x)).all())) \
                            or (lo is not None and not bool((x >= lo).all())):
                        return None
                    parts[c].append(x)
                elif c in categorical:
                    enc = col.combine_chunks().dictionary_encode()
                    values = _strip_objects(enc.dictionary.to_numpy(zero_copy_only=False))
                    parts[c].append(values[enc.indices.to_numpy(zero_copy_only=False)])
                else:
                    parts[c].append(_strip_objects(col.to_numpy(zero_copy_only=False)))
            n += table.num_rows
            del table, col
            pool.release_unused()  # hand the piece's buffers back rather than keep them cached
        if n == 0:
            return None
        out = {c: (np.concatenate(v) if len(v) != 1 else v[0]) for c, v in parts.items()}
        out["__line__"] = np.arange(2, n + 2, dtype=np.int64)
        return out
    except Exception:  # the exact path reads the file again and reports the problem
        return None


def read_csv_columns(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (), *,
                     case_insensitive: bool = False, numeric: dict[str, NumericRule] | None = None,
                     categorical: tuple[str, ...] = ()) -> dict:
    """The columns of a CSV trace: :func:`_read_csv_fast` (typed, bounded memory) when the file is
    regular, else :func:`read_csv_strings` (exact; every problem reported with its line). Either way
    the result feeds :func:`parse_numeric` with the same rules and gives the same values."""
    numeric = numeric or {}
    cols = _read_csv_fast(path, required, optional, case_insensitive, numeric, categorical)
    if cols is not None:
        return cols
    return read_csv_strings(path, required, optional, case_insensitive=case_insensitive)


def parse_numeric(path: Path, column: str, values: list[str], lines: list[int], *,
                  integer: bool, min_value: float | None = None) -> np.ndarray:
    """Parse a column of strings as numbers; the first bad value is reported with its line."""
    try:  # fast path; the loop below finds and reports the first bad value
        out = np.asarray(values, dtype=np.float64)
        ok = bool(np.isfinite(out).all())
        if ok and integer:
            ok = bool((out == np.trunc(out)).all())
        if ok and min_value is not None:
            ok = bool((out >= min_value).all())
        if ok:
            return out.astype(np.int64) if integer else out
    except (ValueError, TypeError):
        pass
    out = np.empty(len(values), dtype=np.float64)
    for j, v in enumerate(values):
        try:
            x = float(v)
        except ValueError:
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not a number ({clip(v)})") from None
        if not np.isfinite(x):
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not a finite number ({clip(v)})")
        if integer and x != int(x):
            raise TraceError(f"{path}: line {lines[j]}: column {column}: not an integer ({clip(v)})")
        if min_value is not None and x < min_value:
            raise TraceError(f"{path}: line {lines[j]}: column {column}: must be >= {min_value:g}, got {clip(v)[1:-1]}")
        out[j] = x
    return out.astype(np.int64) if integer else out


def _finish(path: Path, fmt: str, lines: list[int], rid, arr, pt, ot, acc=None, slo=None,
            notes: list[str] | None = None, ids_from_file: bool = True) -> Trace:
    """Duplicate-id check with line numbers (ids read from the file), then build (sorting
    out-of-order arrivals, reported)."""
    for column, values in (("request_id", rid if ids_from_file else None), ("acceptance_class", acc),
                           ("slo_class", slo)):
        if values is None or len(values) == 0:
            continue
        lens = np.fromiter(map(len, map(str, values)), dtype=np.int64, count=len(values))
        if int(lens.max()) > MAX_FIELD_CHARS:
            j = int(np.argmax(lens > MAX_FIELD_CHARS))
            raise TraceError(f"{path}: line {lines[j]}: column {column}: {int(lens[j]):,} characters (at most "
                             f"{MAX_FIELD_CHARS:,}): {clip(str(values[j]))}")
    if ids_from_file and len(rid):
        j = first_repeat(rid)
        if j is not None:
            r = rid[j]
            first = int(np.flatnonzero(np.asarray(rid[:j], dtype=object) == r)[0])
            raise TraceError(f"{path}: line {lines[j]}: column request_id: duplicate id {clip(r)} "
                             f"(first at line {lines[first]})")
    return Trace.from_columns(request_id=rid, arrival_s=arr, prompt_tokens=pt, output_tokens=ot,
                              acceptance_class=acc, slo_class=slo, source=f"{path} ({fmt})",
                              notes=notes)


def _check_ids(path: Path, ids, lines, column: str = "request_id") -> None:
    bad = np.flatnonzero(np.asarray(ids, dtype=object) == "")
    if bad.size:
        raise TraceError(f"{path}: line {lines[int(bad[0])]}: column {column}: empty")


# ---------------------------------------------------------------------------------------------
# Canonical
# ---------------------------------------------------------------------------------------------

@register_format("canonical", detect=lambda f: {"request_id", "arrival_s", "prompt_tokens", "output_tokens"} <= f)
def read_canonical(path: Path) -> Trace:
    """The canonical CSV: ``request_id, arrival_s, prompt_tokens, output_tokens[, acceptance_class][, slo_class]``."""
    cols = read_csv_columns(path, CANONICAL_COLUMNS, OPTIONAL_COLUMNS, categorical=OPTIONAL_COLUMNS,
                            numeric={"arrival_s": (False, 0), "prompt_tokens": (True, 1), "output_tokens": (True, 1)})
    lines = cols["__line__"]
    arr = parse_numeric(path, "arrival_s", cols["arrival_s"], lines, integer=False, min_value=0)
    pt = parse_numeric(path, "prompt_tokens", cols["prompt_tokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "output_tokens", cols["output_tokens"], lines, integer=True, min_value=1)
    _check_ids(path, cols["request_id"], lines)
    return _finish(path, "canonical", lines, cols["request_id"], arr, pt, ot,
                   cols.get("acceptance_class"), cols.get("slo_class"))


def canonical_csv_text(trace: Trace) -> str:
    """The trace as canonical CSV text (all six columns; ``arrival_s`` written with ``repr`` so that
    reading it back gives the same floats)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CANONICAL_COLUMNS + OPTIONAL_COLUMNS)
    for rid, a, p, o, acc, slo in zip(trace.request_id, trace.arrival_s.tolist(), trace.prompt_tokens.tolist(),
                                      trace.output_tokens.tolist(), trace.acceptance_class, trace.slo_class):
        w.writerow((rid, repr(float(a)), int(p), int(o), acc, slo))
    return buf.getvalue()


def write_canonical(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as canonical CSV, atomically (:mod:`simspec.atomic`)."""
    from simspec.atomic import write_text

    write_text(path, canonical_csv_text(trace))


# ---------------------------------------------------------------------------------------------
# Azure LLM inference traces (2023, 2024)
# ---------------------------------------------------------------------------------------------

def _read_azure(path: Path, fmt: str) -> Trace:
    import pandas as pd

    cols = read_csv_columns(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), case_insensitive=True,
                            numeric={"ContextTokens": (True, 1), "GeneratedTokens": (True, 1)})
    lines = cols["__line__"]
    pt = parse_numeric(path, "ContextTokens", cols["ContextTokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "GeneratedTokens", cols["GeneratedTokens"], lines, integer=True, min_value=1)
    raw = cols["TIMESTAMP"]
    s = pd.Series(raw, dtype=object)
    # strict shape first (pandas alone would read a truncated '2023-11-16 18:1' as 18:01)
    bad = np.flatnonzero(~s.str.fullmatch(_AZURE_TS_RE).to_numpy(dtype=bool))
    if not bad.size:
        # one ISO-8601 pass: any number of fractional digits, 'T' or ' ', offsets, 'Z'
        ts = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
        bad = np.flatnonzero(ts.isna().to_numpy())
    if bad.size:
        j = int(bad[0])
        raise TraceError(f"{path}: line {lines[j]}: column TIMESTAMP: not a timestamp ({clip(raw[j])}; expected "
                         f"YYYY-MM-DD HH:MM:SS[.fraction][+HH:MM|Z])")
    notes: list[str] = []
    aware = s.str.contains(_TZ_RE).to_numpy(dtype=bool)
    n_naive = int((~aware).sum())
    if 0 < n_naive < len(raw):
        notes.append(f"read {n_naive} timestamp(s) without a time zone as UTC "
                     f"(the other {len(raw) - n_naive} carry an offset)")
    arr = (ts - ts.min()).dt.total_seconds().to_numpy(dtype=np.float64)
    rid = [f"azure-{ln}" for ln in lines]
    return _finish(path, fmt, lines, rid, arr, pt, ot, notes=notes, ids_from_file=False)


@register_format("azure2023", detect=lambda f: {"timestamp", "contexttokens", "generatedtokens"} <= f)
def read_azure(path: Path) -> Trace:
    """Azure LLM inference trace (2023 and 2024): ``TIMESTAMP, ContextTokens, GeneratedTokens``.

    Timestamps are wall-clock strings (2023: naive, 7 fractional digits; 2024: UTC offset, varying
    fractional digits); arrival_s is seconds since the earliest one. Offsets are honoured; in a
    file that mixes naive and offset timestamps the naive ones are read as UTC (reported in notes).
    Request ids are ``azure-<line>``.
    """
    return _read_azure(path, "azure2023")


@register_format("azure2024")
def read_azure2024(path: Path) -> Trace:
    """Azure LLM inference trace 2024 (same columns as 2023; see :func:`read_azure`)."""
    return _read_azure(path, "azure2024")


# ---------------------------------------------------------------------------------------------
# Mooncake (FAST 2025) JSONL
# ---------------------------------------------------------------------------------------------

_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
_MOONCAKE_OPTIONAL = ("hash_ids",)


def _json_number(path: Path, ln: int, key: str, v, *, integer: bool, min_value: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TraceError(f"{path}: line {ln}: column {key}: not a number ({clip(v)})")
    if not np.isfinite(v):
        raise TraceError(f"{path}: line {ln}: column {key}: not a finite number ({clip(v)})")
    if integer and v != int(v):
        raise TraceError(f"{path}: line {ln}: column {key}: not an integer ({clip(v)})")
    if v < min_value:
        raise TraceError(f"{path}: line {ln}: column {key}: must be >= {min_value:g}, got {clip(v)}")
    return float(v)


@register_format("mooncake", detect=lambda k: set(_MOONCAKE_KEYS) <= k, jsonl=True)
def read_mooncake(path: Path) -> Trace:
    """Mooncake JSONL (Qin et al., FAST 2025): one object a line with ``timestamp`` (ms from the trace
    start), ``input_length``, ``output_length`` and ``hash_ids`` (512-token prefix-block hashes;
    checked to be a list of integers, not carried into the canonical table).

    arrival_s = timestamp / 1000. Request ids are ``mooncake-<line>``. Unknown keys are refused.
    """
    cols = _mooncake_stream(path)
    if cols is None:  # the exact path: the whole file read first, then every record checked in order
        cols = _mooncake_records(path, enumerate(read_text(path).splitlines(), start=1))
    ts, pt, ot, lines = cols
    if not len(lines):
        raise TraceError(f"{path}: empty file (no records)")
    rid = [f"mooncake-{ln}" for ln in lines.tolist()]
    return _finish(path, "mooncake", lines, rid, ts / 1000.0, pt.astype(np.int64), ot.astype(np.int64),
                   ids_from_file=False)


def _mooncake_records(path: Path, numbered_lines) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check every (line number, text) record; (timestamp ms, input_length, output_length, line)."""
    from array import array

    ts, pt, ot, lines = array("d"), array("d"), array("d"), array("q")
    allowed = set(_MOONCAKE_KEYS + _MOONCAKE_OPTIONAL)
    for ln, line in numbered_lines:
        if not line.strip():
            continue
        rec = _json_record(path, line, ln)
        for k in rec:
            if k not in allowed:
                raise TraceError(f"{path}: line {ln}: column {str(k)[:80]}: unexpected key {clip(k)} "
                                 f"(expected {', '.join(_MOONCAKE_KEYS + _MOONCAKE_OPTIONAL)})")
        for k in _MOONCAKE_KEYS:
            if k not in rec:
                raise TraceError(f"{path}: line {ln}: column {k}: missing key {k!r}")
        ts.append(_json_number(path, ln, "timestamp", rec["timestamp"], integer=False, min_value=0))
        pt.append(_json_number(path, ln, "input_length", rec["input_length"], integer=True, min_value=1))
        ot.append(_json_number(path, ln, "output_length", rec["output_length"], integer=True, min_value=1))
        h = rec.get("hash_ids", [])
        if not isinstance(h, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in h):
            raise TraceError(f"{path}: line {ln}: column hash_ids: expected a list of integers")
        lines.append(ln)
    return (np.frombuffer(ts, dtype=np.float64), np.frombuffer(pt, dtype=np.float64),
            np.frombuffer(ot, dtype=np.float64), np.frombuffer(lines, dtype=np.int64))


def _mooncake_stream(path: Path):
    """:func:`_mooncake_records` over the file streamed in line-aligned pieces (bounded memory), or
    ``None`` on any problem, which the exact path then reports as it always has (it reads the whole
    file first, so a problem further down, say a line over the limit, takes precedence)."""
    def numbered():
        ln = 0
        head = True
        for piece in iter_line_pieces(path):
            text = piece.decode("utf-8-sig" if head else "utf-8")  # pieces end at b"\n": no split characters
            head = False
            for line in text.splitlines():
                ln += 1
                yield ln, line

    try:
        return _mooncake_records(path, numbered())
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# BurstGPT (KDD 2025)
# ---------------------------------------------------------------------------------------------

_BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
_BURSTGPT_OPTIONAL = ("Session ID", "Elapsed time")


@register_format("burstgpt", detect=lambda f: {"timestamp", "model", "request tokens", "response tokens"} <= f)
def read_burstgpt(path: Path) -> Trace:
    """BurstGPT CSV (Wang et al., KDD 2025): ``Timestamp, Model, Request tokens, Response tokens,
    Total tokens, Log Type`` (matched by name, any order, case-insensitive; the newer optional
    ``Session ID`` and ``Elapsed time`` columns are accepted and ignored).

    ``Timestamp`` is seconds from the trace start, kept as arrival_s. Rows with ``Response tokens``
    = 0 are requests that failed: they are dropped and counted in ``Trace.notes``. ``Model``,
    ``Log Type`` and ``Total tokens`` are not carried. Request ids are ``burstgpt-<line>``.
    """
    cols = read_csv_columns(path, _BURSTGPT_COLUMNS, _BURSTGPT_OPTIONAL, case_insensitive=True,
                            numeric={"Timestamp": (False, 0), "Request tokens": (True, 1),
                                     "Response tokens": (True, 0), "Total tokens": (True, 0)})
    lines = cols["__line__"]
    arr = parse_numeric(path, "Timestamp", cols["Timestamp"], lines, integer=False, min_value=0)
    pt = parse_numeric(path, "Request tokens", cols["Request tokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "Response tokens", cols["Response tokens"], lines, integer=True, min_value=0)
    parse_numeric(path, "Total tokens", cols["Total tokens"], lines, integer=True, min_value=0)
    failed = ot == 0
    notes: list[str] = []
    n_failed = int(failed.sum())
    if n_failed:
        if n_failed == len(ot):
            raise TraceError(f"{path}: all {n_failed} requests failed (Response tokens = 0); nothing to replay")
        notes.append(f"dropped {n_failed} failed request(s) (Response tokens = 0)")
    keep = np.flatnonzero(~failed)
    klines = [lines[i] for i in keep]
    rid = [f"burstgpt-{ln}" for ln in klines]
    return _finish(path, "burstgpt", klines, rid, arr[keep], pt[keep], ot[keep], notes=notes,
                   ids_from_file=False)


# ---------------------------------------------------------------------------------------------
# Vidur-style and length-only tables
# ---------------------------------------------------------------------------------------------

_LENGTH_EXTRA = ("num_total_tokens", "pd_ratio")


@register_format("vidur", detect=lambda f: {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} <= f)
def read_vidur(path: Path) -> Trace:
    """Vidur-style trace: ``arrived_at`` (s), ``num_prefill_tokens``, ``num_decode_tokens`` with
    optional ``request_id``, ``num_total_tokens``, ``pd_ratio`` (ignored). Request ids are the
    ``request_id`` column when present (checked unique), else ``vidur-<line>``."""
    cols = read_csv_columns(path, ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
                            ("request_id",) + _LENGTH_EXTRA,
                            numeric={"arrived_at": (False, 0), "num_prefill_tokens": (True, 1),
                                     "num_decode_tokens": (True, 1)})
    lines = cols["__line__"]
    arr = parse_numeric(path, "arrived_at", cols["arrived_at"], lines, integer=False, min_value=0)
    pt = parse_numeric(path, "num_prefill_tokens", cols["num_prefill_tokens"], lines, integer=True, min_value=1)
    ot = parse_numeric(path, "num_decode_tokens", cols["num_decode_tokens"], lines, integer=True, min_value=1)
    if "request_id" in cols:
        rid = cols["request_id"]
        _check_ids(path, rid, lines)
    else:
        rid = [f"vidur-{ln}" for ln in lines]
    return _finish(path, "vidur", lines, rid, arr, pt, ot, ids_from_file="request_id" in cols)


@dataclass
class LengthTable:
    """Prompt/output lengths without arrival times (one row per request, in file order)."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    acceptance_class: np.ndarray | None
    slo_class: np.ndarray | None
    lines: np.ndarray  # int64 file line of each row
    source: str

    def __len__(self) -> int:
        return int(self.prompt_tokens.shape[0])


_TIME_FIELDS = {"arrival_s", "arrived_at", "timestamp", "request_id"}


def _detect_lengths(f: set[str]) -> bool:
    if f & _TIME_FIELDS:
        return False
    return {"num_prefill_tokens", "num_decode_tokens"} <= f or {"prompt_tokens", "output_tokens"} <= f


def read_length_table(path: Path) -> LengthTable:
    """A length-only table: ``num_prefill_tokens, num_decode_tokens[, num_total_tokens][, pd_ratio]``
    (sarathi-serve / Vidur processed traces) or ``prompt_tokens, output_tokens[, acceptance_class]
    [, slo_class]``. Extra columns are ignored only if listed here; anything else is refused."""
    header = {h.lower() for h in _read_header(path)}
    if "num_prefill_tokens" in header or "num_decode_tokens" in header:
        pcol, ocol = "num_prefill_tokens", "num_decode_tokens"
        cols = read_csv_columns(path, (pcol, ocol), _LENGTH_EXTRA, numeric={pcol: (True, 1), ocol: (True, 1)})
    else:
        pcol, ocol = "prompt_tokens", "output_tokens"
        cols = read_csv_columns(path, (pcol, ocol), OPTIONAL_COLUMNS, numeric={pcol: (True, 1), ocol: (True, 1)},
                                categorical=OPTIONAL_COLUMNS)
    lines = cols["__line__"]
    pt = parse_numeric(path, pcol, cols[pcol], lines, integer=True, min_value=1)
    ot = parse_numeric(path, ocol, cols[ocol], lines, integer=True, min_value=1)
    acc = np.asarray([c or "default" for c in cols["acceptance_class"]], dtype=object) \
        if "acceptance_class" in cols else None
    slo = np.asarray(cols["slo_class"], dtype=object) if "slo_class" in cols else None
    return LengthTable(pt, ot, acc, slo, np.asarray(lines, dtype=np.int64), f"{path} (lengths)")


@register_format("lengths", detect=_detect_lengths)
def read_lengths(path: Path) -> Trace:
    """Length-only tables carry no arrival times: refused with a pointer to ``--rate`` (see
    :func:`load_trace` with ``arrivals=``)."""
    read_length_table(path)  # report malformed tables first
    raise TraceError(length_table_refusal(path))


LENGTH_FORMATS.add("lengths")


def _lengths_with_arrivals(path: Path, arrivals, seed: int) -> Trace:
    from simspec.rng import stream
    from simspec.traces.synthetic import arrival_times, describe_arrivals

    table = read_length_table(path)
    times = arrival_times(arrivals, stream(seed, "arrivals"), n=len(table))
    rid = [f"lengths-{ln}" for ln in table.lines.tolist()]
    return Trace.from_columns(request_id=rid, arrival_s=times, prompt_tokens=table.prompt_tokens,
                              output_tokens=table.output_tokens, acceptance_class=table.acceptance_class,
                              slo_class=table.slo_class, source=f"{path} (lengths)",
                              notes=[f"length-only table: arrivals drawn from {describe_arrivals(arrivals)}, "
                                     f"seed {seed}"])


def load_length_pairs(path: str | Path, fmt: str | None = None):
    """(prompt_tokens, output_tokens, acceptance_class) of every request in ``path``: a length-only
    table or any trace format (its arrival times are ignored)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt in LENGTH_FORMATS:
        t = read_length_table(path)
        acc = t.acceptance_class if t.acceptance_class is not None else np.full(len(t), "default", dtype=object)
        return t.prompt_tokens, t.output_tokens, acc
    tr = load_trace(path, fmt)
    return tr.prompt_tokens, tr.output_tokens, tr.acceptance_class
