"""Import acceptance logs made elsewhere (standard library + numpy/scipy; no torch).

Spec-Bench answer files (``data/spec_bench/model_answer/*.jsonl``): one JSON object per line with
``category`` and ``choices``, each choice holding ``accept_lengths`` — the tokens committed by each
verification step (accepted drafts + 1). Every choice is one request; its class is
``prompts.class_of(category)``. The drafts offered per step are not in the file: ``k`` (default: the
largest accept length in the file minus 1) is taken as the number offered at every step, so a step
that committed ``L`` tokens accepted ``L - 1`` of ``k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simspec.calibrate.acceptance import RequestLog, fit_section, split_heldout
from simspec.calibrate.prompts import class_of, jsonl_objects
from simspec.errors import SimspecError


def read_spec_bench(path: str | Path) -> list[tuple[str, Any, list[int]]]:
    """``(class, question_id, accept_lengths)`` per choice, in file order. Any malformed line raises a
    one-line :class:`SimspecError` naming the file and line."""
    out: list[tuple[str, Any, list[int]]] = []
    for no, where, rec in jsonl_objects(path, "acceptance log"):
        cat = rec.get("category")
        if not isinstance(cat, str) or not cat.strip():
            raise SimspecError(f"{where}: field category: missing or not a string")
        choices = rec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SimspecError(f"{where}: field choices: expected a non-empty list")
        for ci, ch in enumerate(choices):
            al = ch.get("accept_lengths") if isinstance(ch, dict) else None
            if not isinstance(al, list) or not al:
                raise SimspecError(f"{where}: field choices[{ci}].accept_lengths: expected a non-empty list")
            for j, v in enumerate(al):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
                    raise SimspecError(f"{where}: field choices[{ci}].accept_lengths[{j}]: expected an "
                                       f"integer >= 1, got {v!r}")
            out.append((class_of(cat), rec.get("question_id", no), [int(v) for v in al]))
    if not out:
        raise SimspecError(f"acceptance log {Path(path)}: no records")
    return out


def import_spec_bench(path: str | Path, method: str = "draft", k: int | None = None,
                      heldout_share: float = 0.0, min_exposure: int = 10) -> dict[str, dict[str, Any]]:
    """The acceptance section (``{class: entry}`` plus ``default``) a Spec-Bench answer file encodes."""
    rows = read_spec_bench(path)
    longest = max(max(al) for _, _, al in rows)
    if k is None:
        k = max(1, longest - 1)
    if k < 1:
        raise SimspecError(f"--k {k}: must be >= 1")
    if longest - 1 > k:
        raise SimspecError(f"acceptance log {path}: an accept length of {longest} needs --k >= {longest - 1}")
    by_cls: dict[str, list[RequestLog]] = {}
    for cls, qid, al in rows:
        by_cls.setdefault(cls, []).append(RequestLog(cls=cls, offered=[k] * len(al), accepted=[v - 1 for v in al],
                                                     drafts=[k] * len(al), tokens=sum(al), request_id=qid))
    fit: dict[str, list[RequestLog]] = {}
    held: dict[str, list[RequestLog]] = {}
    for cls, reqs in by_cls.items():
        fit[cls], held[cls] = split_heldout(reqs, heldout_share)
    settings = {"k": k, "source": f"imported from {Path(path).name} (Spec-Bench accept_lengths)",
                "heldout_share": heldout_share}
    return fit_section(method, fit, settings, {c: h for c, h in held.items() if h}, min_exposure)
