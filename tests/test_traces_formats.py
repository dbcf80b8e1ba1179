"""Every trace format round-trips a hand-made sample to the exact canonical table; detection; the
bundled samples load with their documented counts and repairs; canonical CSV round-trips exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simspec.errors import TraceError
from simspec.traces.formats import (FORMATS, bundled_length_tables, bundled_trace_path, bundled_traces,
                                    detect_format, load_length_pairs, load_trace, resolve_trace_arg,
                                    write_canonical)
from simspec.traces.synthetic import FixedLengths, PoissonArrivals


def rows(trace):
    """The canonical table as a list of tuples (arrival order)."""
    return [(str(r), float(a), int(p), int(o), str(c), str(s))
            for r, a, p, o, c, s in zip(trace.request_id, trace.arrival_s, trace.prompt_tokens,
                                        trace.output_tokens, trace.acceptance_class, trace.slo_class)]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# (format, file name, contents, expected canonical rows, expected notes)
SAMPLES = [
    ("canonical", "c.csv",
     "request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class,slo_class\n"
     "a,0.5,100,10,code,interactive\n"
     "b,0.25,20,3,,\n"
     "c,2,7,1,chat,batch\n",
     [("b", 0.25, 20, 3, "default", ""), ("a", 0.5, 100, 10, "code", "interactive"),
      ("c", 2.0, 7, 1, "chat", "batch")],
     ["sorted 1 out-of-order arrival(s) by arrival_s (stable)"]),
    ("azure2023", "az23.csv",
     "TIMESTAMP,ContextTokens,GeneratedTokens\n"
     "2023-11-16 18:17:03.5000000,4808,10\n"
     "2023-11-16 18:17:03.7500000,3180,8\n"
     "2023-11-16 18:17:05.0000000,110,27\n",
     [("azure-2", 0.0, 4808, 10, "default", ""), ("azure-3", 0.25, 3180, 8, "default", ""),
      ("azure-4", 1.5, 110, 27, "default", "")],
     []),
    ("azure2024", "az24.csv",
     "TIMESTAMP,ContextTokens,GeneratedTokens\n"
     "2024-05-10 00:00:00.500000+00:00,100,10\n"
     "2024-05-10 02:00:00.250000+02:00,200,20\n"      # 00:00:00.25 UTC: before the first row
     "2024-05-10T00:00:01Z,300,30\n"
     "2024-05-09 20:00:02-04:00,400,40\n"
     "2024-05-10 00:00:03.1250000,500,50\n",          # naive: read as UTC
     [("azure-3", 0.0, 200, 20, "default", ""), ("azure-2", 0.25, 100, 10, "default", ""),
      ("azure-4", 0.75, 300, 30, "default", ""), ("azure-5", 1.75, 400, 40, "default", ""),
      ("azure-6", 2.875, 500, 50, "default", "")],
     ["read 1 timestamp(s) without a time zone as UTC (the other 4 carry an offset)",
      "sorted 1 out-of-order arrival(s) by arrival_s (stable)"]),
    ("mooncake", "m.jsonl",
     '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}\n'
     '{"timestamp": 1500, "input_length": 7322, "output_length": 490, "hash_ids": [0, 14]}\n'
     "\n"
     '{"timestamp": 250, "input_length": 2290, "output_length": 3, "hash_ids": []}\n',
     [("mooncake-1", 0.0, 6758, 500, "default", ""), ("mooncake-4", 0.25, 2290, 3, "default", ""),
      ("mooncake-2", 1.5, 7322, 490, "default", "")],
     ["sorted 1 out-of-order arrival(s) by arrival_s (stable)"]),
    ("burstgpt", "b.csv",
     "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
     "5,ChatGPT,472,18,490,Conversation log\n"
     "5,GPT-4,1000,0,1000,API log\n"
     "7,ChatGPT,30,12,42,API log\n"
     "6.5,GPT-4,64,1,65,Conversation log\n",
     [("burstgpt-2", 5.0, 472, 18, "default", ""), ("burstgpt-5", 6.5, 64, 1, "default", ""),
      ("burstgpt-4", 7.0, 30, 12, "default", "")],
     ["dropped 1 failed request(s) (Response tokens = 0)",
      "sorted 1 out-of-order arrival(s) by arrival_s (stable)"]),
    ("vidur", "v.csv",
     "arrived_at,num_prefill_tokens,num_decode_tokens\n"
     "0.0,1947,30\n"
     "0.75,1641,120\n"
     "2.5,411,56\n",
     [("vidur-2", 0.0, 1947, 30, "default", ""), ("vidur-3", 0.75, 1641, 120, "default", ""),
      ("vidur-4", 2.5, 411, 56, "default", "")],
     []),
]


@pytest.mark.parametrize("fmt,name,text,expected,notes", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_round_trip_exact(tmp_path, fmt, name, text, expected, notes):
    p = write(tmp_path, name, text)
    assert detect_format(p) == fmt
    t = load_trace(p)
    assert rows(t) == expected
    assert t.notes == notes
    assert t.source == f"{p} ({fmt})"
    # explicit override gives the same table
    assert rows(load_trace(p, fmt)) == expected
    # canonical CSV written and read back is the same table, exactly
    out = tmp_path / "out.csv"
    write_canonical(t, out)
    assert rows(load_trace(out)) == expected


def test_vidur_request_id_column_is_used(tmp_path):
    p = write(tmp_path, "v.csv", "request_id,arrived_at,num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
                                 "q7,0.5,10,2,12\nq8,1.0,11,3,14\n")
    assert rows(load_trace(p)) == [("q7", 0.5, 10, 2, "default", ""), ("q8", 1.0, 11, 3, "default", "")]


def test_burstgpt_columns_by_name_any_order_and_optional_columns(tmp_path):
    p = write(tmp_path, "b.csv", "Log Type,Session ID,Response tokens,Model,Total tokens,Request tokens,"
                                 "Timestamp,Elapsed time\n"
                                 "API log,s1,4,GPT-4,14,10,3,1.5\n")
    assert detect_format(p) == "burstgpt"
    assert rows(load_trace(p)) == [("burstgpt-2", 3.0, 10, 4, "default", "")]


def test_burstgpt_all_failed_is_an_error(tmp_path):
    p = write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                 "1,ChatGPT,10,0,10,API log\n")
    with pytest.raises(TraceError, match=r"all 1 requests failed \(Response tokens = 0\)"):
        load_trace(p)


def test_length_table_with_arrival_process(tmp_path):
    p = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                                 "74,918,992,0.08\n290,905,1195,0.32\n15,3,18,5.0\n")
    assert detect_format(p) == "lengths"
    t = load_trace(p, arrivals=PoissonArrivals(2.0), seed=3)
    assert [(r[0], r[2], r[3]) for r in rows(t)] == [("lengths-2", 74, 918), ("lengths-3", 290, 905),
                                                      ("lengths-4", 15, 3)]
    assert np.all(np.diff(t.arrival_s) > 0) and t.arrival_s[0] > 0
    assert t.notes == ["length-only table: arrivals drawn from Poisson arrivals at 2 req/s, seed 3"]
    # same seed, same times
    assert np.array_equal(load_trace(p, arrivals=PoissonArrivals(2.0), seed=3).arrival_s, t.arrival_s)


def test_length_table_canonical_names_keep_classes(tmp_path):
    p = write(tmp_path, "l.csv", "prompt_tokens,output_tokens,acceptance_class\n10,2,qa\n20,4,\n")
    assert detect_format(p) == "lengths"
    pt, ot, acc = load_length_pairs(p)
    assert pt.tolist() == [10, 20] and ot.tolist() == [2, 4] and acc.tolist() == ["qa", "default"]


def test_length_table_without_arrivals_is_refused_with_rate_hint(tmp_path):
    p = write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n10,2\n")
    with pytest.raises(TraceError, match=r"l\.csv: a length-only table \(no arrival times\); give an arrival "
                                         r"process: --rate R"):
        load_trace(p)


def test_arrivals_refused_for_a_timed_trace(tmp_path):
    p = write(tmp_path, "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n")
    with pytest.raises(TraceError, match="has its own arrival times"):
        load_trace(p, arrivals=PoissonArrivals(1.0))


def test_unknown_format_name(tmp_path):
    p = write(tmp_path, "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n")
    with pytest.raises(TraceError, match=r"unknown format 'nope' \(known: azure2023, azure2024, burstgpt, "
                                         r"canonical, lengths, mooncake, vidur\)"):
        load_trace(p, "nope")


def test_formats_registry():
    assert set(FORMATS) == {"canonical", "azure2023", "azure2024", "mooncake", "burstgpt", "vidur", "lengths"}


# ---- bundled samples ------------------------------------------------------------------------

BUNDLED = {
    # name: (format, requests, notes)
    "azure_code_2023": ("azure2023", 8819, []),
    "azure2024_handmade": ("azure2024", 20, [
        "read 1 timestamp(s) without a time zone as UTC (the other 19 carry an offset)",
        "sorted 1 out-of-order arrival(s) by arrival_s (stable)"]),
    "mooncake_conversation": ("mooncake", 600, []),
    "burstgpt_handmade": ("burstgpt", 37, ["dropped 3 failed request(s) (Response tokens = 0)"]),
    "vidur_handmade": ("vidur", 30, []),
}


def test_bundled_lists():
    assert set(BUNDLED) <= set(bundled_traces())  # other engineers bundle traces of their own too
    assert not any(name.endswith("_lengths") for name in bundled_traces())
    assert set(bundled_length_tables()) == {"sharegpt", "arxiv"}
    assert resolve_trace_arg("sharegpt") == bundled_length_tables()["sharegpt"]
    assert resolve_trace_arg("sharegpt_lengths") == bundled_length_tables()["sharegpt"]
    with pytest.raises(TraceError, match="no such file, and no bundled trace"):
        resolve_trace_arg("nope_nothing")


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_samples_load(name):
    fmt, n, notes = BUNDLED[name]
    p = bundled_trace_path(name)
    assert p.stat().st_size <= 330_000
    assert detect_format(p) == fmt
    t = load_trace(p)
    assert len(t) == n and t.notes == notes
    assert np.all(np.diff(t.arrival_s) >= 0)


def test_bundled_mooncake_is_the_upstream_prefix():
    # first 600 records of conversation_trace.jsonl: timestamps 0..200999 ms
    t = load_trace(bundled_trace_path("mooncake_conversation"))
    assert t.arrival_s[0] == 0.0 and t.arrival_s[-1] == 200.999
    assert (t.prompt_tokens[0], t.output_tokens[0]) == (6758, 500)
    first = json.loads(bundled_trace_path("mooncake_conversation").read_text().splitlines()[0])
    assert first["hash_ids"][:3] == [0, 1, 2]


@pytest.mark.parametrize("name,n,prompt_mean", [("sharegpt", 3842, 2341.1), ("arxiv", 2826, 2566.5)])
def test_bundled_length_tables(name, n, prompt_mean):
    p = bundled_length_tables()[name]
    assert p.stat().st_size <= 200_000
    assert detect_format(p) == "lengths"
    pt, ot, acc = load_length_pairs(p)
    assert len(pt) == n and pt.min() >= 1 and ot.min() >= 1
    assert round(float(pt.mean()), 1) == prompt_mean


def test_write_canonical_is_atomic_and_exact(tmp_path):
    t = load_trace(bundled_trace_path("azure_code_2023"))
    out = tmp_path / "sub" / "azure.csv"
    write_canonical(t, out)
    back = load_trace(out)
    assert rows(back) == rows(t)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_fixed_lengths_validation():
    from simspec.errors import ConfigError
    with pytest.raises(ConfigError):
        FixedLengths(0, 5)


def test_fast_and_exact_csv_paths_agree(tmp_path):
    """Regular files are read by pandas' C parser; files with quotes or blank lines by the csv module."""
    body = "".join(f"r{i},{i / 8},{i + 1},{i % 7 + 1},c{i % 3},\n" for i in range(200))
    head = "request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class,slo_class\n"
    regular = write(tmp_path, "regular.csv", head + body.replace(",\n", ",s\n"))
    quoted = write(tmp_path, "quoted.csv", head + body.replace(",\n", ',"s"\n').replace("r0,", '"r0",'))
    blanks = write(tmp_path, "blanks.csv", head + "\n" + body.replace(",\n", ",s\n") + "\n\n")
    ref = rows(load_trace(regular))
    assert rows(load_trace(quoted)) == ref and rows(load_trace(blanks)) == ref
    assert ref[0] == ("r0", 0.0, 1, 1, "c0", "s")
