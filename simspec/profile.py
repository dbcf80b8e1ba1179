"""The profile: one versioned JSON document that carries everything the simulator knows about a
model pair on a device — per-stage latency models and per-method, per-class acceptance.

Reading a profile needs only the standard library (no torch). Schema (version 2; version 1 documents still load, as version 2
without ``latency.forward_overhead``, i.e. no per-forward overhead)::

    {
      "schema": "simspec-profile", "schema_version": 2,
      "meta":     {"name", "source": "published"|"measured"|"analytic", "description", "provenance",
                   "device", "dtype", "date", "versions": {...}, ...},
      "models":   {"target": {"name", "num_layers", "hidden_size", "vocab_size", ...},
                   "draft": {...}?},
      "capacity": {"kv_budget_tokens": int, "max_batch_size": int},      # defaults for replay
      "latency":  {"unit": "ms", "overhead": {"fraction": f, "fixed_ms": x},
                   "forward_overhead": {"target_ms": x, "draft_ms": y, "early_exit_ms": z,
                                        "source": "..."}?,                 # version 2
                   "stages": {STAGE: LATENCY_MODEL, ...}},
      "acceptance": {METHOD: {CLASS: ACCEPTANCE_ENTRY, ...}, ...}
    }

Every latency model maps one batch shape — ``batch_size`` (requests in the step),
``batched_tokens`` (tokens fed to the stage this step, summed over the batch) and ``kv_tokens``
(context tokens already in the KV cache, summed over the batch) — to milliseconds. Kinds:

- ``linear``: ``ms = c0 + c_b*B + c_t*batched_tokens + c_kv*kv_tokens + c_spec*[speculating]``
  (``coef`` holds ``c0, c_b, c_t, c_kv`` and optionally ``c_spec``).
- ``scaled``: ``ms = factor * <stage named in "of">``.
- ``grid``: a table over ``batch_size`` × ``tokens_per_request`` × ``context_tokens`` (per-request
  means) in ``ms`` (nested lists [b][t][c]), interpolated multilinearly.

``overhead`` is per *step* (the scheduler, input preparation): ``step_ms * (1 + fraction) +
fixed_ms``. ``forward_overhead`` is per *model forward* (framework dispatch prelude, sampling, the
device→host sync of the sampled tokens), on top of the stages that forward runs: ``target_ms`` per
target forward (verification passes included), ``draft_ms`` per draft-model pass (``draft_step``),
``early_exit_ms`` per early-exit head pass (a Kangaroo/HiSpec draft, a HiSpec intermediate
verification; default: ``target_ms``, the same model stack). Each is >= 0; absent means 0. A
measured whole-forward stage (``target_step``, ``draft_step``) already holds what its timing
included, so calibration writes only the part it did not time.

Optional on any model: ``valid`` (ranges it was fitted on), ``fit`` (``heldout_mape_pct``,
``n_train``, ``n_heldout``), ``samples`` (``[[B, batched_tokens, kv_tokens, ms], ...]``).

Stage names: whole-model ``target_step`` and ``draft_step``, or layer-level ``layer`` (one decoder
layer), ``lm_head`` (final norm + LM head), ``embed``, ``adapter``. ``draft_step`` is one
draft-model decode pass (``"per": "pass"``, default: charged once per draft token) or, with
``"per": "step"``, the whole drafting of one speculative step whatever k is (an EAGLE-class drafter
costed as one figure per step, as some published simulators do).

An acceptance entry (per method, per class)::

    {"alpha": {"kind": "beta", "a": .., "b": ..} | {"kind": "fixed", "value": ..}
              | {"kind": "empirical", "values": [..]},     # per-request per-token acceptance α
     "position_conditional": [a_1, ..., a_K]?,  # P(draft i accepted | drafts < i accepted), pop. mean
     "mean_tokens_per_step": τ?, "n_requests": n?, "n_tokens": n?, ... method-specific keys}

A request draws its own level α_r from ``alpha`` at arrival; its per-position conditional acceptance
is ``min(1, α_r * s_i)`` with shape ``s_i = position_conditional[i] / mean(position_conditional)``
(``s_i = 1``, i.i.d., when absent; positions past the list reuse its last value).

Method-specific keys (acceptance[METHOD][CLASS]):

- ``draft``: the keys above (k the entry was measured at may be kept in ``settings``).
- ``kangaroo``: the keys above for draft-vs-full acceptance, plus optional ``confidence``::

      "confidence": {"bin_edges": [0.0, 0.05, ..., 1.0],       # top-1 probability bins
                     "accepted": [[count per bin], ...],          # one row per draft position
                     "rejected": [[count per bin], ...]}

  The simulator derives P(confident ≥ η | accepted, position i) and P(confident ≥ η | rejected, i)
  for any η, so the number of drafts per step is sampled. Without ``confidence`` drafting stops
  only at γ.
- ``hispec``: the keys above describe intermediate-verifier vs full-model agreement (what the full
  pass commits), plus ``draft_vs_inter``: ``{"alpha": ..., "position_conditional": [...]}`` for
  draft-exit vs intermediate-exit agreement.

- tree methods (``tree``, ``eagle``, ``eagle3``, ``mtp``, ``medusa``): the keys above give the
  drafter's top-1 per-depth acceptance; ``rank_hazard`` h (needed when ``topk`` > 1) is
  P(the target's token is the drafter's next rank | it is not in the ranks above, not rank 1):
  see :mod:`simspec.simulator.acceptance_tree`.
- ``ngram``: the keys above for accepted proposals, plus ``hit_probability`` (P(the lookup finds a
  match) per step).

``settings`` (free-form object) records what the entry was measured with (k, γ, η, exit layers).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from simspec.errors import ProfileError

SCHEMA_NAME = "simspec-profile"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORWARD_ROLES = ("target", "draft", "early_exit")
SOURCES = ("published", "measured", "analytic")
LATENCY_KINDS = ("linear", "scaled", "grid")
ALPHA_KINDS = ("beta", "fixed", "empirical")
GRID_AXES = ("batch_size", "tokens_per_request", "context_tokens")


@dataclass(frozen=True)
class Profile:
    """A validated profile document.

    ``doc`` is the parsed JSON (treat it as read-only); ``path`` where it came from; ``sha256`` the
    hash of its canonical JSON text (sorted keys), recorded in every run's ``config.json``.
    """

    doc: dict[str, Any]
    path: str
    sha256: str

    @property
    def name(self) -> str:
        return str(self.doc["meta"].get("name", Path(self.path).stem))

    @property
    def source(self) -> str:
        return str(self.doc["meta"]["source"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.doc["meta"]

    @property
    def stages(self) -> dict[str, Any]:
        return self.doc["latency"]["stages"]

    @property
    def overhead(self) -> dict[str, float]:
        ov = self.doc["latency"].get("overhead", {})
        return {"fraction": float(ov.get("fraction", 0.0)), "fixed_ms": float(ov.get("fixed_ms", 0.0))}

    @property
    def forward_overhead(self) -> dict[str, float]:
        """Per-forward overhead (ms) by role: ``target``, ``draft``, ``early_exit`` (0 when absent;
        ``early_exit`` defaults to ``target``)."""
        fo = self.doc["latency"].get("forward_overhead") or {}
        target = float(fo.get("target_ms", 0.0))
        return {"target": target, "draft": float(fo.get("draft_ms", 0.0)),
                "early_exit": float(fo.get("early_exit_ms", target))}

    @property
    def capacity(self) -> dict[str, int]:
        return dict(self.doc.get("capacity", {}))

    @property
    def acceptance(self) -> dict[str, dict[str, Any]]:
        return self.doc.get("acceptance", {})

    @property
    def models(self) -> dict[str, Any]:
        return self.doc.get("models", {})

    def has_stage(self, name: str) -> bool:
        return name in self.stages


def canonical_hash(doc: dict[str, Any]) -> str:
    """sha256 of the document's canonical JSON text (sorted keys, no whitespace)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bundled_dir() -> Path:
    """Directory of the profiles shipped with the package."""
    return Path(str(resources.files("simspec") / "data" / "profiles"))


def bundled_profiles() -> dict[str, Path]:
    """Map bundled profile name (file stem) → path."""
    d = bundled_dir()
    return {p.stem: p for p in sorted(d.glob("*.json"))}


DEFAULT_PROFILE = "llama70b-4xh100-smartspec"


def resolve_profile_path(name_or_path: str) -> Path:
    """A bundled profile name, or a path to a JSON file."""
    bundled = bundled_profiles()
    if name_or_path in bundled:
        return bundled[name_or_path]
    p = Path(name_or_path)
    if p.exists():
        return p
    names = ", ".join(bundled) or "(none)"
    raise ProfileError(f"profile {name_or_path!r}: no such file and no bundled profile of that name "
                       f"(bundled: {names})")


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load and validate a profile (bundled name or file path). Raises :class:`ProfileError`."""
    path = resolve_profile_path(str(name_or_path))
    if path.is_dir():
        raise ProfileError(f"profile {path}: is a directory, not a profile JSON file")
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path}: {path.stat().st_size:,} bytes; a profile is a JSON file of at most "
                               f"{MAX_PROFILE_BYTES:,} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"profile {path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        kind = "a pickle" if data[:1] == b"\x80" else "binary data"
        raise ProfileError(f"profile {path}: not a JSON text file (looks like {kind}: not UTF-8 at byte "
                           f"{exc.start}); simspec reads JSON profiles only") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ProfileError(f"profile {path}: not valid JSON ({exc})") from None
    validate_profile(doc, str(path))
    return Profile(doc=doc, path=str(path), sha256=canonical_hash(doc))


MAX_PROFILE_BYTES = 256 << 20


def profile_from_doc(doc: dict[str, Any], label: str = "<memory>") -> Profile:
    """Validate an in-memory document and wrap it."""
    validate_profile(doc, label)
    return Profile(doc=doc, path=label, sha256=canonical_hash(doc))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ----------------------------------------------------------------------------------- validation


def _fail(where: str, field_path: str, msg: str) -> None:
    raise ProfileError(f"profile {where}: field {field_path}: {msg}")


def _num(where: str, fp: str, v: Any, *, positive: bool = False, nonneg: bool = False,
         unit_interval: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        _fail(where, fp, f"expected a finite number, got {v!r}")
    v = float(v)
    if positive and v <= 0:
        _fail(where, fp, f"must be > 0, got {v}")
    if nonneg and v < 0:
        _fail(where, fp, f"must be >= 0, got {v}")
    if unit_interval and not (0.0 <= v <= 1.0):
        _fail(where, fp, f"must be in [0, 1], got {v}")
    return v


def _obj(where: str, fp: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        _fail(where, fp, f"expected an object, got {type(v).__name__}")
    return v


def _list(where: str, fp: str, v: Any, min_len: int = 1) -> list[Any]:
    if not isinstance(v, list) or len(v) < min_len:
        _fail(where, fp, f"expected a list of at least {min_len} item(s)")
    return v


def validate_profile(doc: Any, where: str) -> None:
    """Check ``doc`` against schema v2 (or v1); raise :class:`ProfileError` naming the first bad field."""
    doc = _obj(where, "(root)", doc)
    if doc.get("schema") != SCHEMA_NAME:
        _fail(where, "schema", f"expected {SCHEMA_NAME!r}, got {doc.get('schema')!r}")
    ver = doc.get("schema_version")
    if isinstance(ver, bool) or ver not in READABLE_VERSIONS:
        _fail(where, "schema_version", f"this simspec reads versions {', '.join(map(str, READABLE_VERSIONS))}, "
                                       f"got {ver!r}")
    meta = _obj(where, "meta", doc.get("meta"))
    if meta.get("source") not in SOURCES:
        _fail(where, "meta.source", f"expected one of {', '.join(SOURCES)}, got {meta.get('source')!r}")
    models = _obj(where, "models", doc.get("models", {}))
    for role, m in models.items():
        m = _obj(where, f"models.{role}", m)
        if "num_layers" in m:
            n = _num(where, f"models.{role}.num_layers", m["num_layers"], positive=True)
            if n != int(n):
                _fail(where, f"models.{role}.num_layers", "must be an integer")
    cap = _obj(where, "capacity", doc.get("capacity", {}))
    for key in ("kv_budget_tokens", "max_batch_size"):
        if key in cap:
            _num(where, f"capacity.{key}", cap[key], positive=True)
    lat = _obj(where, "latency", doc.get("latency"))
    if lat.get("unit", "ms") != "ms":
        _fail(where, "latency.unit", f"expected 'ms', got {lat.get('unit')!r}")
    ov = _obj(where, "latency.overhead", lat.get("overhead", {}))
    if "fraction" in ov:
        _num(where, "latency.overhead.fraction", ov["fraction"], nonneg=True)
    if "fixed_ms" in ov:
        _num(where, "latency.overhead.fixed_ms", ov["fixed_ms"], nonneg=True)
    if "forward_overhead" in lat:
        if ver == 1:
            _fail(where, "latency.forward_overhead", "needs schema_version 2 (a version-1 reader would ignore it)")
        fo = _obj(where, "latency.forward_overhead", lat["forward_overhead"])
        known = {f"{r}_ms" for r in FORWARD_ROLES} | {"source", "note", "engine", "fit"}
        for key in fo:
            if key not in known:
                _fail(where, f"latency.forward_overhead.{key}", f"unknown field (known: {', '.join(sorted(known))})")
        for r in FORWARD_ROLES:
            if f"{r}_ms" in fo:
                _num(where, f"latency.forward_overhead.{r}_ms", fo[f"{r}_ms"], nonneg=True)
    stages = _obj(where, "latency.stages", lat.get("stages"))
    if not stages:
        _fail(where, "latency.stages", "no stages")
    if "target_step" not in stages and not ("layer" in stages and "lm_head" in stages):
        _fail(where, "latency.stages", "missing stage: need 'target_step', or 'layer' and 'lm_head'")
    for name, model in stages.items():
        _validate_latency_model(where, f"latency.stages.{name}", model, stages)
    acc = _obj(where, "acceptance", doc.get("acceptance", {}))
    for method, classes in acc.items():
        classes = _obj(where, f"acceptance.{method}", classes)
        if not classes:
            _fail(where, f"acceptance.{method}", "no classes")
        for cls, entry in classes.items():
            _validate_acceptance_entry(where, f"acceptance.{method}.{cls}", entry)


def _validate_latency_model(where: str, fp: str, model: Any, stages: dict[str, Any]) -> None:
    model = _obj(where, fp, model)
    kind = model.get("kind")
    if "per" in model and model["per"] not in ("pass", "step"):
        _fail(where, f"{fp}.per", f"expected 'pass' or 'step', got {model['per']!r}")
    if kind not in LATENCY_KINDS:
        _fail(where, f"{fp}.kind", f"expected one of {', '.join(LATENCY_KINDS)}, got {kind!r}")
    if kind == "linear":
        coef = _obj(where, f"{fp}.coef", model.get("coef"))
        for c in ("c0", "c_b", "c_t", "c_kv"):
            if c not in coef:
                _fail(where, f"{fp}.coef.{c}", "missing")
            _num(where, f"{fp}.coef.{c}", coef[c])
        if "c_spec" in coef:
            _num(where, f"{fp}.coef.c_spec", coef["c_spec"])
        _check_linear_nonnegative(where, fp, coef, model.get("valid"))
    elif kind == "scaled":
        of = model.get("of")
        if of not in stages or of == fp.rsplit(".", 1)[-1]:
            _fail(where, f"{fp}.of", f"must name another stage, got {of!r}")
        if stages[of].get("kind") == "scaled":
            _fail(where, f"{fp}.of", "cannot scale a scaled stage")
        _num(where, f"{fp}.factor", model.get("factor"), positive=True)
    else:  # grid
        axes = _obj(where, f"{fp}.axes", model.get("axes"))
        shape = []
        for ax in GRID_AXES:
            vals = _list(where, f"{fp}.axes.{ax}", axes.get(ax))
            prev = -math.inf
            for i, v in enumerate(vals):
                v = _num(where, f"{fp}.axes.{ax}[{i}]", v, nonneg=True)
                if v <= prev:
                    _fail(where, f"{fp}.axes.{ax}", "values must be strictly increasing")
                prev = v
            shape.append(len(vals))
        ms = model.get("ms")
        _check_grid(where, f"{fp}.ms", ms, shape)
    if "fit" in model:
        fit = _obj(where, f"{fp}.fit", model["fit"])
        if "heldout_mape_pct" in fit and fit["heldout_mape_pct"] is not None:
            _num(where, f"{fp}.fit.heldout_mape_pct", fit["heldout_mape_pct"], nonneg=True)


# the shapes a linear stage is checked over when it declares no ``valid`` range: from one request of
# one token to a large batch of long contexts
_DEFAULT_LINEAR_BOX = {"batch_size": (1.0, 1024.0), "tokens_per_request": (1.0, 32768.0),
                       "context_tokens": (0.0, 131072.0)}


def _check_linear_nonnegative(where: str, fp: str, coef: dict[str, Any], valid: Any) -> None:
    """A linear stage must not predict a negative time anywhere in its range: ``valid`` (batch_size,
    tokens_per_request, context_tokens: [lo, hi]) or, without one, :data:`_DEFAULT_LINEAR_BOX`.
    ms = c0 + c_b*B + c_t*B*tokens_per_request + c_kv*B*context (+ c_spec) is multilinear in the
    three, so its minimum over the box is at a corner; the error names the negative coefficient
    that makes it negative and the corner."""
    import itertools

    box = dict(_DEFAULT_LINEAR_BOX)
    if isinstance(valid, dict):
        for ax in box:
            rng = valid.get(ax)
            if isinstance(rng, (list, tuple)) and len(rng) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in rng):
                box[ax] = (float(min(rng)), float(max(rng)))
    c0, cb, ct, ckv = (float(coef[k]) for k in ("c0", "c_b", "c_t", "c_kv"))
    cs = float(coef.get("c_spec", 0.0))
    worst = None
    for b, t, c, spec in itertools.product(box["batch_size"], box["tokens_per_request"], box["context_tokens"],
                                           (0.0, 1.0)):
        ms = c0 + cb * b + ct * b * t + ckv * b * c + cs * spec
        if worst is None or ms < worst[0]:
            worst = (ms, b, t, c, spec)
    if worst is not None and worst[0] < 0:
        negs = {k: float(coef[k]) for k in ("c0", "c_b", "c_t", "c_kv", "c_spec") if float(coef.get(k, 0.0)) < 0}
        name = min(negs, key=negs.get) if negs else "c0"
        ms, b, t, c, spec = worst
        _fail(where, f"{fp}.coef.{name}", f"negative coefficient {float(coef.get(name, 0.0)):g} makes the stage "
                                          f"negative ({ms:.4g} ms at batch_size {b:g}, tokens_per_request {t:g}, "
                                          f"context_tokens {c:g}{', speculating' if spec else ''}) within its "
                                          f"{'valid' if isinstance(valid, dict) else 'default'} range")


def _check_grid(where: str, fp: str, arr: Any, shape: list[int]) -> None:
    if not shape:
        _num(where, fp, arr, nonneg=True)
        return
    if not isinstance(arr, list) or len(arr) != shape[0]:
        _fail(where, fp, f"expected a list of {shape[0]} items to match the axes")
    for i, a in enumerate(arr):
        _check_grid(where, f"{fp}[{i}]", a, shape[1:])


def _validate_acceptance_entry(where: str, fp: str, entry: Any) -> None:
    entry = _obj(where, fp, entry)
    alpha = _obj(where, f"{fp}.alpha", entry.get("alpha"))
    kind = alpha.get("kind")
    if kind not in ALPHA_KINDS:
        _fail(where, f"{fp}.alpha.kind", f"expected one of {', '.join(ALPHA_KINDS)}, got {kind!r}")
    if kind == "beta":
        _num(where, f"{fp}.alpha.a", alpha.get("a"), positive=True)
        _num(where, f"{fp}.alpha.b", alpha.get("b"), positive=True)
    elif kind == "fixed":
        _num(where, f"{fp}.alpha.value", alpha.get("value"), unit_interval=True)
    else:
        vals = _list(where, f"{fp}.alpha.values", alpha.get("values"))
        for i, v in enumerate(vals):
            _num(where, f"{fp}.alpha.values[{i}]", v, unit_interval=True)
    if "position_conditional" in entry:
        vals = _list(where, f"{fp}.position_conditional", entry["position_conditional"])
        for i, v in enumerate(vals):
            _num(where, f"{fp}.position_conditional[{i}]", v, unit_interval=True)
    if "mean_tokens_per_step" in entry:
        _num(where, f"{fp}.mean_tokens_per_step", entry["mean_tokens_per_step"], positive=True)
    for key in ("rank_hazard", "hit_probability"):  # tree methods, n-gram lookup
        if key in entry:
            _num(where, f"{fp}.{key}", entry[key], unit_interval=True)


def alpha_mean(alpha: dict[str, Any]) -> float:
    """Mean per-request acceptance α of an ``alpha`` distribution entry."""
    kind = alpha["kind"]
    if kind == "beta":
        return float(alpha["a"]) / (float(alpha["a"]) + float(alpha["b"]))
    if kind == "fixed":
        return float(alpha["value"])
    vals = alpha["values"]
    return float(sum(vals)) / len(vals)
