"""Prompt sets with task categories, for acceptance calibration and adapter training (standard
library only; tokenisation helpers take a tokenizer object).

A prompt file is JSON Lines in Spec-Bench's ``question.jsonl`` format: one object per line with
``question_id``, ``category`` and ``turns`` (a list of user messages; only the first turn is used).
The bundled copy of Spec-Bench's 480 prompts is :func:`bundled_prompts_path`.

Categories map to acceptance classes with :func:`class_of`: MT-Bench's eight categories (Spec-Bench
question ids 81-160: writing, roleplay, reasoning, math, coding, extraction, stem, humanities) form
the class ``mt_bench``; Spec-Bench's other five categories (translation, summarization, qa,
math_reasoning, rag) are classes of the same name; any other category is its own class (lower-cased,
spaces → ``_``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from simspec.errors import SimspecError

SPEC_BENCH_CLASSES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                       "humanities")


def class_of(category: str) -> str:
    """Acceptance class of a prompt-file / answer-file category (see the module docstring)."""
    c = str(category).strip().lower().replace(" ", "_").replace("-", "_")
    if c in MT_BENCH_CATEGORIES or c in ("mt_bench", "mtbench"):
        return "mt_bench"
    return c


def bundled_prompts_path() -> Path:
    """The bundled copy of Spec-Bench's ``question.jsonl`` (see ``data/prompts/ATTRIBUTION.md``)."""
    return Path(str(resources.files("simspec") / "data" / "prompts" / "spec_bench_question.jsonl"))


@dataclass(frozen=True)
class Prompt:
    """One prompt: its id, source category, acceptance class and (first-turn) text."""

    question_id: Any
    category: str
    cls: str
    text: str


def jsonl_objects(path: str | Path, label: str):
    """Yield ``(line_no, where, record)`` for each non-blank line of a JSONL file, ``where`` being
    ``"<label> <path>: line N"`` for error messages. An unreadable file, a line that is not JSON or
    not a JSON object raises a one-line :class:`SimspecError` naming the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SimspecError(f"{label} {p}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected JSONL") from None
    except OSError as exc:
        raise SimspecError(f"{label} {p}: cannot read ({exc.strerror})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{label} {p}: line {no}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise SimspecError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise SimspecError(f"{where}: expected a JSON object")
        yield no, where, rec


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; a malformed line raises a one-line :class:`SimspecError` naming it."""
    out: list[Prompt] = []
    for no, where, rec in jsonl_objects(path, "prompts"):
        if "category" not in rec:
            raise SimspecError(f"{where}: field category: missing")
        turns = rec.get("turns")
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise SimspecError(f"{where}: field turns: expected a non-empty list of strings")
        out.append(Prompt(question_id=rec.get("question_id", no), category=str(rec["category"]),
                          cls=class_of(rec["category"]), text=turns[0]))
    if not out:
        raise SimspecError(f"prompts {Path(path)}: no prompts")
    return out


def by_class(prompts: list[Prompt]) -> dict[str, list[Prompt]]:
    """Prompts grouped by class; within a class, source categories are interleaved in file order
    (MT-Bench's first prompts cover all eight categories rather than ten writing prompts)."""
    groups: dict[str, dict[str, list[Prompt]]] = {}
    for pr in prompts:
        groups.setdefault(pr.cls, {}).setdefault(pr.category, []).append(pr)
    out: dict[str, list[Prompt]] = {}
    for cls, cats in groups.items():
        lists = list(cats.values())
        merged: list[Prompt] = []
        for i in range(max(len(x) for x in lists)):
            merged.extend(x[i] for x in lists if i < len(x))
        out[cls] = merged
    return out


def select(prompts: list[Prompt], per_class: int | None, skip_per_class: int = 0,
           classes: list[str] | None = None) -> dict[str, list[Prompt]]:
    """Per class, prompts ``skip_per_class .. skip_per_class + per_class - 1`` of :func:`by_class`'s
    order (all after the skip when ``per_class`` is None), optionally only ``classes``."""
    groups = by_class(prompts)
    if classes:
        unknown = [c for c in classes if c not in groups]
        if unknown:
            raise SimspecError(f"--category {unknown[0]}: no such class in the prompt file "
                               f"(has {', '.join(sorted(groups))})")
        groups = {c: groups[c] for c in classes}
    end = None if per_class is None else skip_per_class + per_class
    return {c: g[skip_per_class:end] for c, g in groups.items() if g[skip_per_class:end]}


def encode(tokenizer: Any, text: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` as a single user turn in the tokenizer's chat template (plain text when it
    has none). With ``max_prompt_tokens``, an over-long message is cut at its end so the whole prompt
    fits (default: no cut)."""
    ids = _encode(tokenizer, text)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(1, len(body) - (len(ids) - max_prompt_tokens))
        ids = _encode(tokenizer, tokenizer.decode(body[:keep]))
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        s = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])
