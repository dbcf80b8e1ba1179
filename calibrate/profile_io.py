"""Read-merge-write of profile files, so latency and acceptance calibration can fill the same
profile in either order without clobbering each other (standard library only; no torch).

``update_profile(path, latency=..., models=..., meta_updates=..., acceptance=...)`` reads ``path``
if it exists, merges the given sections and writes the result atomically:

- ``latency`` replaces the whole latency section (a re-run measures every stage again);
- ``models`` is merged per role (``target``, ``draft``): a given role replaces that role;
- ``meta_updates`` is merged key by key into ``meta``;
- ``acceptance`` is merged per method: a given method replaces that method's classes, other
  methods are kept (``replace_acceptance=True`` replaces the whole section).

The merged document is validated against the schema before anything is written. A document that
has no latency section yet (acceptance measured first) is written with everything else validated;
it becomes loadable once latency calibration fills it in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator

from simspec.atomic import write_json
from simspec.errors import ProfileError
from simspec.profile import READABLE_VERSIONS, SCHEMA_NAME, SCHEMA_VERSION, validate_profile

_PLACEHOLDER_STAGES = {"layer": {"kind": "linear", "coef": {"c0": 1.0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}},
                       "lm_head": {"kind": "linear", "coef": {"c0": 1.0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}}}


def empty_profile(name: str) -> dict[str, Any]:
    """A skeleton measured profile named ``name`` (no latency or acceptance yet)."""
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
            "meta": {"name": name, "source": "measured"}, "models": {}, "capacity": {},
            "acceptance": {}}


def read_profile_doc(path: str | os.PathLike) -> dict[str, Any] | None:
    """The raw JSON document at ``path`` (None if the file does not exist). Checks only that it is a
    simspec profile of this schema version; the caller validates after merging."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"profile {p}: cannot read an existing profile to update ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise ProfileError(f"profile {p}: field schema: existing file is not a {SCHEMA_NAME} document; "
                           "refusing to overwrite it")
    if doc.get("schema_version") not in READABLE_VERSIONS:
        raise ProfileError(f"profile {p}: field schema_version: existing file has version "
                           f"{doc.get('schema_version')!r}, this simspec writes {SCHEMA_VERSION}")
    doc["schema_version"] = SCHEMA_VERSION  # v1 → v2 is a pure extension: the update is written as v2
    return doc


def validate_partial(doc: dict[str, Any], where: str) -> None:
    """Validate ``doc``; a missing latency section is allowed (checked with a placeholder)."""
    if "latency" in doc:
        validate_profile(doc, where)
        return
    probe = dict(doc)
    probe["latency"] = {"unit": "ms", "stages": _PLACEHOLDER_STAGES}
    validate_profile(probe, where)


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Serialise read-merge-write cycles on profiles in ``directory`` (flock on the directory,
    so no lock file is left behind; a no-op where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def merge_profile(doc: dict[str, Any] | None, *, name: str, latency: dict[str, Any] | None = None,
                  models: dict[str, Any] | None = None, meta_updates: dict[str, Any] | None = None,
                  acceptance: dict[str, Any] | None = None, capacity: dict[str, Any] | None = None,
                  replace_acceptance: bool = False) -> dict[str, Any]:
    """Return a new document: ``doc`` (or an empty profile named ``name``) with the sections merged
    as described in the module docstring. ``capacity`` is merged key by key."""
    out = copy.deepcopy(doc) if doc is not None else empty_profile(name)
    out.setdefault("meta", {}).setdefault("name", name)
    out["meta"].setdefault("source", "measured")
    out.setdefault("models", {})
    out.setdefault("acceptance", {})
    if latency is not None:
        out["latency"] = copy.deepcopy(latency)
    if models:
        for role, m in models.items():
            out["models"][role] = copy.deepcopy(m)
    if capacity:
        out.setdefault("capacity", {}).update(copy.deepcopy(capacity))
    if meta_updates:
        out["meta"].update(copy.deepcopy(meta_updates))
    if acceptance is not None:
        if replace_acceptance:
            out["acceptance"] = copy.deepcopy(acceptance)
        else:
            for method, classes in acceptance.items():
                out["acceptance"][method] = copy.deepcopy(classes)
    return out


def update_profile(path: str | os.PathLike, *, latency: dict[str, Any] | None = None,
                   models: dict[str, Any] | None = None, meta_updates: dict[str, Any] | None = None,
                   acceptance: dict[str, Any] | None = None, capacity: dict[str, Any] | None = None,
                   replace_acceptance: bool = False) -> dict[str, Any]:
    """Merge the given sections into the profile at ``path`` (created if absent) and write it
    atomically. Returns the written document. Raises :class:`ProfileError` if the existing file is
    not a profile or the result does not validate (nothing is written then)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _locked_dir(p.parent):
        doc = read_profile_doc(p)
        out = merge_profile(doc, name=p.stem, latency=latency, models=models, meta_updates=meta_updates,
                            acceptance=acceptance, capacity=capacity,
                            replace_acceptance=replace_acceptance)
        validate_partial(out, str(p))
        write_json(p, out)
    return out
