"""Every loader on bad input: one TraceError naming the file, the line and the column (or a
documented repair, reported in Trace.notes)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from simspec.errors import TraceError
from simspec.traces.formats import load_trace

CAN = "request_id,arrival_s,prompt_tokens,output_tokens\n"
AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
BG = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
VI = "arrived_at,num_prefill_tokens,num_decode_tokens\n"
LE = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


def mc(ts=0, i=10, o=5, **extra):
    rec = {"timestamp": ts, "input_length": i, "output_length": o, "hash_ids": [0, 1]}
    rec.update(extra)
    import json
    return json.dumps(rec)


# (id, file name, contents, explicit format or None, message regex after "<path>: ")
CASES = [
    # ---- canonical
    ("canonical-truncated", "t.csv", CAN + "a,0,10,5\nb,1,1", None,
     r"line 3: expected 4 fields, got 3 \(column output_tokens missing; wrong delimiter or truncated row\?\)"),
    ("canonical-delimiter", "t.csv", CAN.replace(",", ";") + "a;0;10;5\n", None,
     r"line 1: unknown header .*\(the header looks ';'-delimited; simspec reads comma-separated files\)"),
    ("canonical-delimiter-explicit", "t.csv", CAN.replace(",", ";") + "a;0;10;5\n", "canonical",
     r"line 1: column 1: unexpected column 'request_id;arrival_s;prompt_tokens;output_tokens' "
     r"\(the header looks ';'-delimited"),
    ("canonical-delimiter-rows", "t.csv", CAN + "a;0;10;5\n", None,
     r"line 2: expected 4 fields, got 1 \(column arrival_s missing; wrong delimiter"),
    ("canonical-unknown-header", "t.csv", CAN.strip() + ",foo\na,0,10,5,x\n", None,
     r"line 1: column 5: unexpected column 'foo'"),
    ("canonical-missing-column", "t.csv", "request_id,arrival_s,prompt_tokens\na,0,10\n", "canonical",
     r"line 1: missing column 'output_tokens'"),
    ("canonical-mixed-types", "t.csv", CAN + "a,0,10,5\nb,1,ten,5\n", None,
     r"line 3: column prompt_tokens: not a number \('ten'\)"),
    ("canonical-not-integer", "t.csv", CAN + "a,0,10.5,5\n", None,
     r"line 2: column prompt_tokens: not an integer \('10.5'\)"),
    ("canonical-time-not-number", "t.csv", CAN + "a,soon,10,5\n", None,
     r"line 2: column arrival_s: not a number \('soon'\)"),
    ("canonical-negative-length", "t.csv", CAN + "a,0,10,5\nb,1,10,-3\n", None,
     r"line 3: column output_tokens: must be >= 1, got -3"),
    ("canonical-zero-length", "t.csv", CAN + "a,0,0,5\n", None,
     r"line 2: column prompt_tokens: must be >= 1, got 0"),
    ("canonical-negative-time", "t.csv", CAN + "a,-1,10,5\n", None,
     r"line 2: column arrival_s: must be >= 0, got -1"),
    ("canonical-duplicate-id", "t.csv", CAN + "a,0,10,5\na,1,10,5\n", None,
     r"line 3: column request_id: duplicate id 'a' \(first at line 2\)"),
    ("canonical-empty-id", "t.csv", CAN + ",0,10,5\n", None, r"line 2: column request_id: empty"),
    ("canonical-blank-lines-keep-line-numbers", "t.csv", CAN + "a,0,10,5\n\n   \nb,1,x,5\n", None,
     r"line 5: column prompt_tokens: not a number \('x'\)"),
    ("canonical-quoted-field", "t.csv", CAN + '"a,1",0,10,5\n"b",1,10\n', None,
     r"line 3: expected 4 fields, got 3 \(column output_tokens missing"),
    ("canonical-nan", "t.csv", CAN + "a,nan,10,5\n", None, r"line 2: column arrival_s: not a finite number"),
    ("empty-file", "t.csv", "", None, r"empty file \(no header line\)"),
    ("header-only", "t.csv", CAN, None, r"header but no requests"),
    # ---- Azure 2023 / 2024
    ("azure-truncated", "a.csv", AZ + "2023-11-16 18:17:03.5,4808,10\n2023-11-16 18:1", None,
     r"line 3: expected 3 fields, got 1 \(column ContextTokens missing"),
    ("azure-truncated-timestamp", "a.csv", AZ + "2023-11-16 18:17:03.5,4808,10\n2023-11-16 18:1,5,5\n", None,
     r"line 3: column TIMESTAMP: not a timestamp \('2023-11-16 18:1'; expected YYYY-MM-DD HH:MM:SS"),
    ("azure-delimiter", "a.csv", AZ.replace(",", "\t") + "2023-11-16 18:17:03.5\t4808\t10\n", None,
     r"line 1: unknown header .*\(the header looks tab-delimited"),
    ("azure-unknown-header", "a.csv", AZ.strip() + ",Service\n2023-11-16 18:17:03.5,4808,10,code\n", None,
     r"line 1: column 4: unexpected column 'Service'"),
    ("azure-mixed-types", "a.csv", AZ + "2023-11-16 18:17:03.5,abc,10\n", None,
     r"line 2: column ContextTokens: not a number \('abc'\)"),
    ("azure2024-bad-timestamp", "a.csv", AZ + "2024-05-10 00:00:00+00:00,1,1\nyesterday,1,1\n", None,
     r"line 3: column TIMESTAMP: not a timestamp \('yesterday';"),
    ("azure-negative", "a.csv", AZ + "2023-11-16 18:17:03.5,4808,-1\n", None,
     r"line 2: column GeneratedTokens: must be >= 1, got -1"),
    ("azure-zero", "a.csv", AZ + "2023-11-16 18:17:03.5,0,10\n", "azure2024",
     r"line 2: column ContextTokens: must be >= 1, got 0"),
    # ---- Mooncake JSONL
    ("mooncake-truncated", "m.jsonl", mc() + "\n" + mc(1000)[:30], None,
     r"line 2: column \d+: not a complete JSON record \(.*; truncated file\?\)"),
    ("mooncake-not-object", "m.jsonl", mc() + "\n[1, 2]\n", None,
     r"line 2: column 1: expected a JSON object, got list"),
    ("mooncake-unknown-first-keys", "m.jsonl", '{"ts": 0, "in": 5}\n', None,
     r"line 1: unknown JSONL record keys 'ts,in'"),
    ("mooncake-unknown-key", "m.jsonl", mc() + "\n" + mc(5, session="s1") + "\n", None,
     r"line 2: column session: unexpected key 'session'"),
    ("mooncake-missing-key", "m.jsonl", mc() + '\n{"timestamp": 5, "input_length": 3}\n', None,
     r"line 2: column output_length: missing key 'output_length'"),
    ("mooncake-mixed-types", "m.jsonl", mc() + "\n" + mc(5, i="12") + "\n", None,
     r"line 2: column input_length: not a number \('12'\)"),
    ("mooncake-bool", "m.jsonl", mc() + "\n" + mc(5, o=True) + "\n", None,
     r"line 2: column output_length: not a number \(True\)"),
    ("mooncake-not-integer", "m.jsonl", mc(i=12.5) + "\n", None,
     r"line 1: column input_length: not an integer \(12.5\)"),
    ("mooncake-negative", "m.jsonl", mc() + "\n" + mc(5, o=-2) + "\n", None,
     r"line 2: column output_length: must be >= 1, got -2"),
    ("mooncake-zero", "m.jsonl", mc(i=0) + "\n", None, r"line 1: column input_length: must be >= 1, got 0"),
    ("mooncake-negative-time", "m.jsonl", mc(-5) + "\n", None, r"line 1: column timestamp: must be >= 0, got -5"),
    ("mooncake-hash-ids", "m.jsonl", mc(hash_ids="0,1") + "\n", None,
     r"line 1: column hash_ids: expected a list of integers"),
    ("mooncake-empty", "m.jsonl", "\n\n", "mooncake", r"empty file \(no records\)"),
    # ---- BurstGPT
    ("burstgpt-truncated", "b.csv", BG + "5,ChatGPT,472,18,490,Conversation log\n6,GPT-4,10", None,
     r"line 3: expected 6 fields, got 3 \(column Response tokens missing"),
    ("burstgpt-delimiter", "b.csv", BG.replace(",", ";") + "5;ChatGPT;472;18;490;API log\n", None,
     r"line 1: unknown header .*looks ';'-delimited"),
    ("burstgpt-unknown-header", "b.csv", BG.strip() + ",Region\n5,ChatGPT,472,18,490,API log,eu\n", None,
     r"line 1: column 7: unexpected column 'Region'"),
    ("burstgpt-missing-column", "b.csv", "Timestamp,Model,Request tokens,Response tokens\n5,ChatGPT,4,1\n", None,
     r"line 1: missing column 'Total tokens'"),
    ("burstgpt-mixed-types", "b.csv", BG + "5,ChatGPT,n/a,18,490,API log\n", None,
     r"line 2: column Request tokens: not a number \('n/a'\)"),
    ("burstgpt-negative", "b.csv", BG + "5,ChatGPT,472,-1,490,API log\n", None,
     r"line 2: column Response tokens: must be >= 0, got -1"),
    ("burstgpt-zero-request", "b.csv", BG + "5,ChatGPT,0,18,18,API log\n", None,
     r"line 2: column Request tokens: must be >= 1, got 0"),
    ("burstgpt-negative-time", "b.csv", BG + "-5,ChatGPT,4,18,22,API log\n", None,
     r"line 2: column Timestamp: must be >= 0, got -5"),
    # ---- Vidur-style
    ("vidur-truncated", "v.csv", VI + "0.5,10,2\n1.0,", None,
     r"line 3: expected 3 fields, got 2 \(column num_decode_tokens missing"),
    ("vidur-delimiter", "v.csv", VI.replace(",", "|") + "0.5|10|2\n", None, r"line 1: unknown header .*looks '\|'-delimited"),
    ("vidur-unknown-header", "v.csv", VI.strip() + ",priority\n0.5,10,2,1\n", None,
     r"line 1: column 4: unexpected column 'priority'"),
    ("vidur-mixed-types", "v.csv", VI + "0.5,10,2\n1.0,11,two\n", None,
     r"line 3: column num_decode_tokens: not a number \('two'\)"),
    ("vidur-negative", "v.csv", VI + "0.5,-10,2\n", None, r"line 2: column num_prefill_tokens: must be >= 1, got -10"),
    ("vidur-zero", "v.csv", VI + "0.5,10,0\n", None, r"line 2: column num_decode_tokens: must be >= 1, got 0"),
    ("vidur-duplicate-id", "v.csv", "request_id," + VI + "x,0.5,10,2\nx,0.7,10,2\n", None,
     r"line 3: column request_id: duplicate id 'x' \(first at line 2\)"),
    # ---- length-only tables (validated before the no-arrivals refusal)
    ("lengths-truncated", "l.csv", LE + "74,918,992,0.08\n290,9", None,
     r"line 3: expected 4 fields, got 2 \(column num_total_tokens missing"),
    ("lengths-delimiter", "l.csv", LE.replace(",", ";") + "74;918;992;0.08\n", None,
     r"line 1: unknown header .*looks ';'-delimited"),
    ("lengths-unknown-header", "l.csv", "num_prefill_tokens,num_decode_tokens,dataset\n74,918,sharegpt\n", None,
     r"line 1: column 3: unexpected column 'dataset'"),
    ("lengths-mixed-types", "l.csv", LE + "74,9x8,992,0.08\n", None,
     r"line 2: column num_decode_tokens: not a number \('9x8'\)"),
    ("lengths-negative", "l.csv", LE + "-74,918,992,0.08\n", None,
     r"line 2: column num_prefill_tokens: must be >= 1, got -74"),
    ("lengths-zero", "l.csv", LE + "74,0,74,inf\n", None, r"line 2: column num_decode_tokens: must be >= 1, got 0"),
]


@pytest.mark.parametrize("name,text,fmt,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_file_line_column(tmp_path, name, text, fmt, pattern):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(TraceError) as ei:
        load_trace(p, fmt)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: "), msg
    assert re.search(pattern, msg), msg


def test_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(TraceError, match=r"nope\.csv: no such file"):
        load_trace(tmp_path / "nope.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match=r"bin\.csv: not UTF-8 text"):
        load_trace(p)


def test_utf8_bom_is_ignored(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeff".encode() + (CAN + "a,0,10,5\n").encode())
    assert len(load_trace(p)) == 1


# ---- the repair: timestamps that go backwards are sorted (stable) and counted, in every format

BACKWARDS = [
    ("canonical", "t.csv", CAN + "a,2,1,1\nb,1,1,1\nc,3,1,1\nd,0,1,1\n", ["d", "b", "a", "c"]),
    ("azure2023", "a.csv", AZ + "2023-11-16 18:00:02,1,1\n2023-11-16 18:00:01,1,1\n2023-11-16 18:00:03,1,1\n"
                                "2023-11-16 18:00:00,1,1\n", ["azure-5", "azure-3", "azure-2", "azure-4"]),
    ("azure2024", "a.csv", AZ + "2024-05-10 00:00:02+00:00,1,1\n2024-05-10 00:00:01+00:00,1,1\n"
                                "2024-05-10 00:00:03+00:00,1,1\n2024-05-10 00:00:00+00:00,1,1\n",
     ["azure-5", "azure-3", "azure-2", "azure-4"]),
    ("mooncake", "m.jsonl", "\n".join([mc(2000), mc(1000), mc(3000), mc(0)]) + "\n",
     ["mooncake-4", "mooncake-2", "mooncake-1", "mooncake-3"]),
    ("burstgpt", "b.csv", BG + "2,ChatGPT,1,1,2,API log\n1,ChatGPT,1,1,2,API log\n3,ChatGPT,1,1,2,API log\n"
                               "0,ChatGPT,1,1,2,API log\n", ["burstgpt-5", "burstgpt-3", "burstgpt-2", "burstgpt-4"]),
    ("vidur", "v.csv", VI + "2,1,1\n1,1,1\n3,1,1\n0,1,1\n", ["vidur-5", "vidur-3", "vidur-2", "vidur-4"]),
]


@pytest.mark.parametrize("fmt,name,text,order", BACKWARDS, ids=[b[0] for b in BACKWARDS])
def test_backwards_timestamps_are_sorted_and_reported(tmp_path, fmt, name, text, order):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    t = load_trace(p)
    assert t.source.endswith(f"({fmt})")
    assert t.request_id.tolist() == order
    assert np.all(np.diff(t.arrival_s) >= 0)
    assert t.notes == ["sorted 2 out-of-order arrival(s) by arrival_s (stable)"]


def test_equal_timestamps_keep_file_order(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join([mc(0, i=1), mc(0, i=2), mc(0, i=3)]) + "\n")
    t = load_trace(p)
    assert t.prompt_tokens.tolist() == [1, 2, 3] and t.notes == []
