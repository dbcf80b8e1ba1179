"""The bounded-memory trace readers (streamed pieces, typed columns) against the exact path:
identical traces on every bundled file and on files cut into many small pieces; on bad input the
same one-line error as the exact path, wherever in the file the problem is."""

from __future__ import annotations

import json

import numpy as np
import pytest

import simspec.traces.formats as F
from simspec.errors import TraceError
from simspec.trace import first_repeat, repeated_mask


def _columns(path, fmt=None):
    fmt = fmt or F.detect_format(path)
    if fmt in F.LENGTH_FORMATS:
        t = F.read_length_table(path)
        return [t.prompt_tokens, t.output_tokens, t.acceptance_class, t.slo_class, np.asarray(t.lines)]
    t = F.load_trace(path, fmt)
    return [t.request_id, t.arrival_s, t.prompt_tokens, t.output_tokens, t.acceptance_class, t.slo_class,
            np.asarray(t.notes, dtype=object), np.asarray([t.source], dtype=object)]


def _exact(monkeypatch):
    """Turn the fast paths off: every reader takes the exact (whole file as strings) path."""
    monkeypatch.setattr(F, "_read_csv_fast", lambda *a, **k: None)
    monkeypatch.setattr(F, "_mooncake_stream", lambda path: None)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _bundled():
    return list(F.bundled_traces().values()) + list(F.bundled_length_tables().values())


@pytest.mark.parametrize("piece_bytes", [0, 4099])  # 0: the default piece size; 4099: many pieces
def test_streamed_equals_exact_on_every_bundled_file(monkeypatch, piece_bytes):
    if piece_bytes:
        monkeypatch.setattr(F, "_PIECE_BYTES", piece_bytes)
    fast = {p.name: _columns(p) for p in _bundled()}
    with monkeypatch.context() as m:
        _exact(m)
        exact = {p.name: _columns(p) for p in _bundled()}
    for name in fast:
        _same(fast[name], exact[name])


def test_regular_csv_takes_the_typed_path(monkeypatch, tmp_path):
    p = tmp_path / "t.csv"
    rows = [f"r{i},{i * 0.25!r},{10 + i},{1 + i % 7},{'code' if i % 3 else ''},s{i % 2}" for i in range(500)]
    p.write_text("request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class,slo_class\n"
                 + "\n".join(rows) + "\n")
    monkeypatch.setattr(F, "_PIECE_BYTES", 211)
    calls = []
    orig = F._read_csv_fast

    def spy(*a, **k):
        out = orig(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(F, "_read_csv_fast", spy)
    tr = F.load_trace(p)
    assert calls == [True]
    assert list(tr.acceptance_class[:3]) == ["default", "code", "code"]
    assert tr.request_id[499] == "r499" and tr.prompt_tokens[499] == 509
    # classes are shared objects (at most one per distinct value per piece), not one str per row
    pieces = len(list(F.iter_line_pieces(p)))
    assert 10 < pieces < 100
    assert len({id(x) for x in tr.acceptance_class}) <= 2 * pieces


def _canonical_body(n, bad_row=None, bad_line=""):
    lines = ["request_id,arrival_s,prompt_tokens,output_tokens"]
    for i in range(n):
        lines.append(bad_line if i == bad_row else f"r{i},{i},{10 + i},5")
    return "\n".join(lines) + "\n"


BAD_LINES = [
    "r150,150,ten,5",            # not a number
    "r150,150,10.5,5",           # not an integer
    "r150,150,0,5",              # below the minimum
    "r150,-1,10,5",              # negative time
    "r150,nan,10,5",             # not finite
    "r150,150,10",               # truncated row
    "r150,150,10,5,9",           # extra field
    "",                          # blank line (kept in the line numbering)
    "r3,150,10,5",               # duplicate id
    ",150,10,5",                 # empty id
    '"r150",150,10,5',           # quotes: read by the exact csv module
    "r150,150,10,5\r",           # a lone carriage return
    "r150, 150 ,10,5",           # spaces around a number
    "x" * 2000 + ",150,10,5",    # an id over the field limit
]


@pytest.mark.parametrize("bad", BAD_LINES, ids=range(len(BAD_LINES)))
def test_a_problem_deep_in_the_file_reads_as_the_exact_path_reports_it(monkeypatch, tmp_path, bad):
    p = tmp_path / "t.csv"
    p.write_text(_canonical_body(300, bad_row=150, bad_line=bad))
    monkeypatch.setattr(F, "_PIECE_BYTES", 256)
    monkeypatch.setattr(F, "MAX_FIELD_CHARS", 1024)
    try:
        fast = ("ok", _columns(p))
    except TraceError as exc:
        fast = ("error", str(exc))
    with monkeypatch.context() as m:
        _exact(m)
        try:
            exact = ("ok", _columns(p))
        except TraceError as exc:
            exact = ("error", str(exc))
    assert fast[0] == exact[0]
    if fast[0] == "error":
        assert fast[1] == exact[1]
        assert "\n" not in fast[1] and len(fast[1]) < 400
    else:
        _same(fast[1], exact[1])


def test_a_long_line_in_a_later_piece_is_refused_with_its_line(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "MAX_LINE_BYTES", 300)
    monkeypatch.setattr(F, "_PIECE_BYTES", 128)
    p = tmp_path / "t.csv"
    p.write_text(_canonical_body(100, bad_row=60, bad_line="r60," + "1" * 400 + ",10,5"))
    with pytest.raises(TraceError, match=r"t\.csv: line 62: longer than 300 bytes"):
        F.load_trace(p)
    with pytest.raises(TraceError, match=r"line 62: longer than 300 bytes"):
        list(F.iter_line_pieces(p))


def test_pieces_reassemble_the_file(tmp_path, monkeypatch):
    p = tmp_path / "t.csv"
    text = _canonical_body(257)
    p.write_text(text)
    for size in (1, 7, 64, 10_000):
        pieces = list(F.iter_line_pieces(p, size))
        assert b"".join(pieces) == text.encode()
        assert all(x.endswith(b"\n") for x in pieces)


def _mooncake_file(path, n, bad_row=None, bad=""):
    with open(path, "w") as fh:
        for i in range(n):
            if i == bad_row:
                fh.write(bad + "\n")
                continue
            fh.write(json.dumps({"timestamp": i * 10, "input_length": 10 + i, "output_length": 1 + i % 5,
                                 "hash_ids": [i]}) + "\n")


MOONCAKE_BAD = [None, '{"timestamp": 1, "input_length": 2}',
                '{"timestamp": 1, "input_length": 2, "output_length": true}',
                '{"timestamp": 1, "input_length": 2, "output_length": 3, "x": 1}', '{"timestamp": 1, "inpu',
                '', '[1, 2]']


@pytest.mark.parametrize("bad", MOONCAKE_BAD, ids=range(len(MOONCAKE_BAD)))
def test_mooncake_streamed_equals_exact(monkeypatch, tmp_path, bad):
    p = tmp_path / "m.jsonl"
    _mooncake_file(p, 200, bad_row=None if bad is None else 120, bad=bad or "")
    monkeypatch.setattr(F, "_PIECE_BYTES", 300)
    try:
        fast = ("ok", _columns(p))
    except TraceError as exc:
        fast = ("error", str(exc))
    with monkeypatch.context() as m:
        _exact(m)
        try:
            exact = ("ok", _columns(p))
        except TraceError as exc:
            exact = ("error", str(exc))
    assert fast[0] == exact[0]
    if fast[0] == "error":
        assert fast[1] == exact[1]
    else:
        _same(fast[1], exact[1])


def test_repeated_mask_and_first_repeat_match_a_dict():
    rng = np.random.default_rng(3)
    for _ in range(30):
        ids = np.asarray([f"id{x}" for x in rng.integers(0, 60, size=rng.integers(0, 80))], dtype=object)
        counts: dict[str, int] = {}
        for x in ids:
            counts[x] = counts.get(x, 0) + 1
        assert repeated_mask(ids).tolist() == [counts[x] > 1 for x in ids]
        seen: set[str] = set()
        want = None
        for i, x in enumerate(ids):
            if x in seen:
                want = i
                break
            seen.add(x)
        assert first_repeat(ids) == want
