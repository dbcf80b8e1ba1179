"""``simspec calibrate import-acceptance``: a hand-made Spec-Bench answer file gives exactly the
acceptance it encodes; bad input is one line naming the file and line, exit status 2."""

from __future__ import annotations

import json

import pytest

from simspec.calibrate.importer import import_spec_bench
from simspec.cli import main
from simspec.profile import alpha_mean


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


RECORDS = [
    # MT-Bench categories map to the class mt_bench
    {"question_id": 81, "category": "writing", "choices": [{"index": 0, "accept_lengths": [1, 2, 4, 3]}]},
    {"question_id": 82, "category": "coding", "choices": [{"index": 0, "accept_lengths": [4, 4, 1, 2]}]},
    {"question_id": 321, "category": "qa", "choices": [{"index": 0, "accept_lengths": [1, 1, 2, 1]},
                                                       {"index": 1, "accept_lengths": [2, 1, 3, 1]}]},
]


def test_hand_made_file_gives_exactly_its_acceptance(tmp_path):
    f = _write(tmp_path / "answers.jsonl", RECORDS)
    sec = import_spec_bench(f, min_exposure=1)  # k = longest accept length − 1 = 3; keep every position
    assert set(sec) == {"mt_bench", "qa", "default"}
    mt = sec["mt_bench"]
    # mt_bench steps accept 0,1,3,2,3,3,0,1 of k = 3:
    #   position 1 offered 8, accepted 6; position 2 offered 6, accepted 4; position 3 offered 4, accepted 3
    assert mt["position_conditional"] == pytest.approx([6 / 8, 4 / 6, 3 / 4])
    assert mt["mean_tokens_per_step"] == pytest.approx(21 / 8)
    assert mt["acceptance_rate"] == pytest.approx(13 / 24)
    assert mt["n_requests"] == 2 and mt["n_steps"] == 8 and mt["n_tokens"] == 21
    assert mt["per_request"]["tokens_per_step"] == pytest.approx([10 / 4, 11 / 4])
    assert mt["per_request"]["accept_rate"] == pytest.approx([6 / 12, 7 / 12], abs=1e-4)
    assert mt["settings"]["k"] == 3
    qa = sec["qa"]
    # qa steps accept 0,0,1,0,1,0,2,0: position 1 offered 8, accepted 3; 2: 3, 1; 3: 1, 0
    assert qa["position_conditional"] == pytest.approx([3 / 8, 1 / 3, 0.0])
    assert qa["mean_tokens_per_step"] == pytest.approx(12 / 8)
    assert qa["n_requests"] == 2 and qa["n_tokens"] == 12
    d = sec["default"]
    assert d["mean_tokens_per_step"] == pytest.approx(33 / 16) and d["n_requests"] == 4
    # the fitted α reproduces the measured tokens per step in the simulator's model
    for e in sec.values():
        assert e["fit"]["tau_model"] == pytest.approx(e["mean_tokens_per_step"], rel=1e-4)
        assert 0 < alpha_mean(e["alpha"]) <= 1


def test_explicit_k_and_iid_file(tmp_path):
    # every step commits 2 tokens with k = 1: α = 1 exactly
    f = _write(tmp_path / "a.jsonl", [{"category": "rag", "choices": [{"accept_lengths": [2, 2, 2]}]}])
    e = import_spec_bench(f, k=1, min_exposure=1)["rag"]
    assert e["position_conditional"] == [1.0]
    assert e["mean_tokens_per_step"] == 2.0
    assert alpha_mean(e["alpha"]) == pytest.approx(1.0, abs=1e-3)


def _run_ok(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0


def test_rarely_offered_positions_are_dropped(tmp_path):
    f = _write(tmp_path / "answers.jsonl", RECORDS)
    qa = import_spec_bench(f, min_exposure=3)["qa"]  # position 3 was offered once
    assert qa["position_conditional"] == pytest.approx([3 / 8, 1 / 3])
    assert qa["fit"]["tau_model"] == pytest.approx(1.5, rel=1e-4)


def test_cli_writes_a_valid_profile_section(tmp_path, capsys):
    f = _write(tmp_path / "answers.jsonl", RECORDS)
    out = tmp_path / "p.json"
    _run_ok(["calibrate", "import-acceptance", str(f), "--out", str(out), "--method", "kangaroo", "--min-exposure",
             "1", "-q"])
    doc = json.loads(out.read_text())
    assert set(doc["acceptance"]["kangaroo"]) == {"mt_bench", "qa", "default"}
    assert doc["acceptance"]["kangaroo"]["qa"]["mean_tokens_per_step"] == pytest.approx(1.5)
    # a second import of another method keeps the first
    _run_ok(["calibrate", "import-acceptance", str(f), "--out", str(out), "-q"])
    doc = json.loads(out.read_text())
    assert set(doc["acceptance"]) == {"kangaroo", "draft"}


@pytest.mark.parametrize("line, needle", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"choices": [{"accept_lengths": [1]}]}), "line 2: field category"),
    (json.dumps({"category": "qa"}), "line 2: field choices"),
    (json.dumps({"category": "qa", "choices": [{"turns": ["x"]}]}), "line 2: field choices[0].accept_lengths"),
    (json.dumps({"category": "qa", "choices": [{"accept_lengths": [1, 0]}]}), "accept_lengths[1]: expected an integer >= 1"),
    (json.dumps([1, 2]), "line 2: expected a JSON object"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "import-acceptance", str(f), "--out", str(tmp_path / "p.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("simspec: error: ")
    assert str(f) in err and needle in err
    assert not (tmp_path / "p.json").exists()


def test_k_too_small_and_missing_file(tmp_path, capsys):
    f = _write(tmp_path / "a.jsonl", RECORDS)
    for args, needle in (([str(f), "--k", "2"], "needs --k >= 3"),
                         ([str(tmp_path / "nope.jsonl")], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "import-acceptance", *args, "--out", str(tmp_path / "p.json")])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
