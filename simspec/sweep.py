"""Sweeps: a grid of replays run in parallel, each into its own run directory.

A grid (YAML) names a ``base`` configuration and the ``axes`` to vary; the sweep is their cartesian
product::

    name: policies-vs-rate            # optional
    base:                             # any replay option; unset ones take replay's defaults
      trace: azure_code_2023          # a file (relative to this YAML file) or a bundled name
      first: 200                      # trace transforms: first, rate, rate_scale, window, ...
      profile: llama70b-4xh100-smartspec
      slo_ttft_ms: 2000
    axes:                             # each a non-empty list; one run per combination
      policy: [fcfs, srpt]
      spec: [none, "draft:k=4"]
      rate: [1.0, 2.0, 4.0]           # target mean request rate, req/s (arrival times rescaled)
      seed: [0, 1]

Every run gets a stable id: a hash of its *resolved* configuration (the :class:`RunConfig` with
defaults filled in, the trace transforms, and the SHA-256 of the trace and profile files), so
spelling a default out in the grid, reordering the axes or moving the files does not change it.
Run ``<id>`` is written atomically to ``OUT/runs/<id>/`` (:func:`simspec.simulator.output.write_run`).

Restart: runs whose directory is complete are skipped, leftover temporary directories of a killed
sweep are removed and their runs redone. A run that raises is recorded in ``OUT/failed/<id>.json``
(error and traceback) and does not stop the others; it is not retried unless asked
(``retry_failed``). At the end ``OUT/sweep.parquet`` holds one row per run of the grid, in grid
order: the axes, ``run_id``, ``status`` (``ok``/``failed``), ``error``, ``run_dir``,
``offered_rate_rps`` and the run's summary metrics; ``OUT/sweep.json`` records the grid and the
executor. Rows depend only on the grid (never on the executor, the number of workers, the order of
completion or on restarts).

Executors: local processes (:class:`concurrent.futures.ProcessPoolExecutor`) by default, or a Dask
distributed cluster (``scheduler_address``) through the same submit / as-completed loop. Dask
workers must be able to import simspec and read the trace and profile files and write ``OUT``
(a shared file system).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from simspec.atomic import dumps_json, json_safe, write_bytes, write_json
from simspec.errors import ConfigError, SimspecError

RUNS_DIR = "runs"
FAILED_DIR = "failed"
SWEEP_TABLE = "sweep.parquet"
SWEEP_MANIFEST = "sweep.json"
LOCK_FILE = ".sweep.lock"

RATE_AXES = ("rate", "rate_scale")
CONNECT_TIMEOUT_S = 20.0  # how long to wait for a Dask scheduler


# ---------------------------------------------------------------------------------------------
# Options a grid may set (base) or vary (axes)
# ---------------------------------------------------------------------------------------------

def _check_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v.strip()


def _check_spec(v: Any) -> str:
    """A ``--spec`` string, or vLLM's speculative config as a mapping (converted to one)."""
    if isinstance(v, dict):
        from simspec.speculative_config import spec_from_speculative_config

        try:
            return spec_from_speculative_config(v)
        except ConfigError as exc:
            raise ValueError(str(exc).replace("--speculative-config: ", "vLLM speculative config: ")) from None
    return _check_str(v)


def _check_int(lo: int | None = None, nullable: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer{' or null' if nullable else ''}, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        return int(v)
    return check


def _check_pos_float(nullable: bool = True) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"expected a finite number > 0{' or null' if nullable else ''}, got {v!r}")
        return float(v)
    return check


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _check_opt_str(v: Any) -> str | None:
    return None if v is None else _check_str(v)


def _check_str_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"expected a class name or a list of class names, got {v!r}")
    return tuple(v)


def _check_choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return v
    return check


def _check_goodput(v: Any) -> str | None:
    if v is None:
        return None
    from simspec.vllm_metrics import GoodputSLO

    try:
        slo = GoodputSLO.parse([str(v)])
    except ConfigError as exc:
        raise ValueError(str(exc).replace("--goodput ", "")) from None
    return slo.describe() if slo else None


def _check_window(v: Any) -> str | None:
    if v is None:
        return None
    from simspec.traces.transforms import parse_window

    try:
        parse_window(str(v))
    except ConfigError as exc:
        raise ValueError(str(exc).replace("--window ", "")) from None
    return str(v)


# name -> (default, checker, what it is). Names follow `simspec replay`'s options (dashes → underscores).
RUN_OPTIONS: dict[str, tuple[Any, Callable[[Any], Any], str]] = {
    "policy": ("fcfs", _check_str, "request scheduler, e.g. srpt:predictor=oracle"),
    "spec": ("none", _check_spec, "speculation method, e.g. draft:k=4, or vLLM's speculative config as a mapping"),
    "spec_len": ("fixed", _check_str, "speculation-length policy"),
    "replicas": (1, _check_int(1), "model replicas behind the router"),
    "router": ("round-robin", _check_choice("round-robin", "least-outstanding"), "router"),
    "max_batch": (None, _check_int(1, nullable=True), "requests per step per replica"),
    "kv_budget_tokens": (None, _check_int(1, nullable=True), "KV-cache tokens per replica"),
    "max_batched_tokens": (None, _check_int(1, nullable=True), "tokens fed per step per replica"),
    "preempt": ("recompute", _check_choice("recompute", "swap", "keep"), "preemption mode"),
    "batching": ("vllm", _check_choice("vllm", "preemptive"), "batch formation (vllm | preemptive)"),
    "block_size": (16, _check_int(1), "KV-cache block size, tokens"),
    "chunked_prefill": (True, _check_bool, "split long prompts over steps"),
    "long_prefill_token_threshold": (None, _check_int(1, nullable=True), "most prompt tokens per request per step"),
    "max_concurrency": (None, _check_int(1, nullable=True), "most requests in flight (closed loop)"),
    "steps_log": ("full", _check_choice("full", "sampled", "none"), "steps.parquet rows: full | sampled | none"),
    "steps_log_every": (100, _check_int(1), "with steps_log sampled: keep one step in this many"),
    "seed": (0, _check_int(0), "run seed (>= 0)"),
    "slo_ttft_ms": (None, _check_pos_float(), "TTFT SLO, ms"),
    "slo_tpot_ms": (None, _check_pos_float(), "TPOT SLO, ms"),
    "allow_extrapolation": (False, _check_bool, "allow latency lookups outside the profile's range"),
    "goodput": (None, _check_goodput, "vLLM goodput bounds, e.g. 'ttft:500 tpot:50' (ms): request_goodput"),
}
TRACE_OPTIONS: dict[str, tuple[Any, Callable[[Any], Any], str]] = {
    "trace": (None, _check_str, "trace file (relative to the grid) or bundled name"),
    "format": (None, _check_opt_str, "trace format (default: detect)"),
    "profile": (None, _check_str, "profile file (relative to the grid) or bundled name"),
    "window": (None, _check_window, "START:END seconds of the trace to keep"),
    "only_class": ((), _check_str_list, "acceptance classes to keep"),
    "first": (None, _check_int(1, nullable=True), "keep the first N requests"),
    "rate": (None, _check_pos_float(), "target mean request rate, req/s"),
    "rate_scale": (None, _check_pos_float(), "multiply the trace's request rate by this"),
    "max_prompt_tokens": (None, _check_int(1, nullable=True), "clip prompt lengths"),
    "max_output_tokens": (None, _check_int(1, nullable=True), "clip output lengths"),
    "relabel_classes": (None, _check_opt_str, "set acceptance classes (mixture or mapping)"),
    "burstiness": (None, _check_pos_float(), "with rate: Gamma arrivals of this shape (vLLM's --burstiness)"),
}
# vLLM's names (``vllm serve`` / ``vllm bench serve``) accepted as grid keys
OPTION_ALIASES = {"max_num_seqs": "max_batch", "max_num_batched_tokens": "max_batched_tokens",
                  "request_rate": "rate"}
OPTIONS = {**RUN_OPTIONS, **TRACE_OPTIONS}
TRANSFORM_KEYS = ("window", "only_class", "first", "rate", "rate_scale", "max_prompt_tokens",
                  "max_output_tokens", "relabel_classes", "burstiness")
# transforms added later: left out of a run's identity while unset, so older sweeps keep their ids
_NEW_TRANSFORM_KEYS = ("burstiness",)
GRID_KEYS = ("name", "description", "base", "axes")


# ---------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep.

    ``axes``: this run's value of each grid axis (grid order); ``options``: every option resolved
    (defaults filled, trace/profile as absolute paths); ``run_config``: ``RunConfig.to_dict()``;
    ``trace_sha256``/``profile_sha256``: hashes of the files; ``offered_rate_rps``: the mean
    request rate of the trace after the transforms ((n-1)/span, req/s).
    """

    run_id: str
    axes: dict[str, Any]
    options: dict[str, Any]
    run_config: dict[str, Any]
    trace_sha256: str
    profile_sha256: str
    offered_rate_rps: float | None

    def task(self, out_dir: Path) -> dict[str, Any]:
        """The picklable work item a worker receives (plain data only)."""
        return {"run_id": self.run_id, "run_dir": str(out_dir / RUNS_DIR / self.run_id), "axes": self.axes,
                "options": self.options, "run_config": self.run_config, "trace_sha256": self.trace_sha256,
                "profile_sha256": self.profile_sha256, "offered_rate_rps": self.offered_rate_rps}


@dataclass
class Grid:
    """A parsed, validated grid: its axes and the runs of their cartesian product (grid order)."""

    path: str
    name: str
    description: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    runs: list[RunSpec]


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_file(value: str, base_dir: Path) -> Path | None:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    return p.resolve() if p.is_file() else None


def resolve_trace(value: str, base_dir: Path) -> Path:
    """A trace named in a grid: a file (relative to the grid's folder) or a bundled name."""
    from simspec.traces.formats import resolve_trace_arg

    found = _resolve_file(value, base_dir)
    return found if found is not None else Path(resolve_trace_arg(value)).resolve()


def resolve_profile(value: str, base_dir: Path) -> Path:
    """A profile named in a grid: a JSON file (relative to the grid's folder) or a bundled name."""
    from simspec.profile import resolve_profile_path

    found = _resolve_file(value, base_dir)
    return found if found is not None else Path(resolve_profile_path(value)).resolve()


def _component_check(key: str, value: str) -> None:
    from simspec.policies import SCHEDULERS, SPEC_LEN_POLICIES
    from simspec.simulator.config import ComponentSpec
    from simspec.simulator.methods import METHODS

    registry, what = {"policy": (SCHEDULERS, "scheduler"), "spec": (METHODS, "method"),
                      "spec_len": (SPEC_LEN_POLICIES, "speculation-length policy")}[key]
    comp = ComponentSpec.parse(value, key)
    if comp.name not in registry:
        raise ValueError(f"unknown {what} {comp.name!r} (choose from {', '.join(sorted(registry))})")
    if key != "spec":
        registry[comp.name].check_param_names(dict(comp.params))


def _check_value(key: str, value: Any) -> Any:
    value = OPTIONS[key][1](value)
    if key in ("policy", "spec", "spec_len"):
        try:
            _component_check(key, value)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
    return value


def _norm_key(key: Any) -> str:
    key = str(key).strip().replace("-", "_")
    return OPTION_ALIASES.get(key, key)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file; raise :class:`SimspecError` naming the file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such grid file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return expand_grid(doc, where=str(path), base_dir=path.parent)


def expand_grid(doc: Any, where: str = "<grid>", base_dir: str | Path = ".") -> Grid:
    """Validate a grid document (the parsed YAML) and expand it into runs."""
    from simspec.profile import DEFAULT_PROFILE, load_profile
    from simspec.traces.formats import DEFAULT_TRACE

    base_dir = Path(base_dir).resolve()
    if doc is None:
        raise ConfigError(f"{where}: empty grid (expected keys {', '.join(GRID_KEYS)})")
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(GRID_KEYS)}, got {type(doc).__name__}")
    for key in doc:
        if key not in GRID_KEYS:
            raise ConfigError(f"{where}: unknown top-level key {key!r} (expected {', '.join(GRID_KEYS)})")
    base_doc = doc.get("base") or {}
    axes_doc = doc.get("axes") or {}
    for sect, d in (("base", base_doc), ("axes", axes_doc)):
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: {sect}: expected a mapping of option: value, got {type(d).__name__}")
    base: dict[str, Any] = {}
    for raw, value in base_doc.items():
        key = _norm_key(raw)
        if key not in OPTIONS:
            raise ConfigError(f"{where}: base.{raw}: unknown option (known: {', '.join(sorted(OPTIONS))})")
        if key in base:
            raise ConfigError(f"{where}: base.{raw}: given twice (under another name)")
        try:
            base[key] = _check_value(key, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: base.{raw}: {exc}") from None
    axes: dict[str, list[Any]] = {}
    for raw, values in axes_doc.items():
        key = _norm_key(raw)
        if key not in OPTIONS:
            raise ConfigError(f"{where}: axes.{raw}: unknown axis (known: {', '.join(sorted(OPTIONS))})")
        if key in base:
            raise ConfigError(f"{where}: axes.{raw}: also set in base; set it in one place")
        if key in axes:
            raise ConfigError(f"{where}: axes.{raw}: given twice")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: axes.{raw}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: axes.{raw}: empty axis (give at least one value)")
        checked = []
        for i, v in enumerate(values):
            try:
                checked.append(_check_value(key, v))
            except ValueError as exc:
                raise ConfigError(f"{where}: axes.{raw}[{i}]: {exc}") from None
        seen = [dumps_json(x) for x in checked]
        dup = next((i for i, s in enumerate(seen) if s in seen[:i]), None)
        if dup is not None:
            raise ConfigError(f"{where}: axes.{raw}[{dup}]: duplicate value {values[dup]!r}")
        axes[key] = [list(v) if isinstance(v, tuple) else v for v in checked]
    both = [k for k in RATE_AXES if k in base or k in axes]
    if len(both) == 2:
        raise ConfigError(f"{where}: rate and rate_scale: give one of them, not both")

    defaults = {k: v[0] for k, v in OPTIONS.items()}
    defaults["trace"] = DEFAULT_TRACE
    defaults["profile"] = DEFAULT_PROFILE
    names = list(axes)
    trace_cache: dict[tuple, tuple[Path, str]] = {}
    profile_cache: dict[str, tuple[Path, str]] = {}
    transformed: dict[str, float | None] = {}
    profiles: dict[str, Any] = {}
    spec_profiles: dict[str, set[str]] = {}
    runs: list[RunSpec] = []
    ids: dict[str, str] = {}
    for combo in itertools.product(*(axes[n] for n in names)):
        point = dict(zip(names, combo))
        opts = {**defaults, **base, **point}
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        src = "axes.trace" if "trace" in point else "base.trace"
        tkey = (opts["trace"], opts["format"])
        if tkey not in trace_cache:
            try:
                tpath = resolve_trace(opts["trace"], base_dir)
            except SimspecError as exc:
                raise ConfigError(f"{where}: {src}: {exc}") from None
            trace_cache[tkey] = (tpath, _sha256_file(tpath))
        tpath, tsha = trace_cache[tkey]
        if opts["profile"] not in profile_cache:
            psrc = "axes.profile" if "profile" in point else "base.profile"
            try:
                ppath = resolve_profile(opts["profile"], base_dir)
                prof = load_profile(ppath)
            except SimspecError as exc:
                raise ConfigError(f"{where}: {psrc}: {exc}") from None
            profile_cache[opts["profile"]] = (ppath, prof.sha256)
            profiles[str(ppath)] = prof
        ppath, psha = profile_cache[opts["profile"]]
        spec_profiles.setdefault(opts["spec"], set()).add(str(ppath))
        # absolute paths for the workers, and the names as written (a worker on another machine
        # finds a bundled trace or profile by name if the path does not exist there)
        opts["trace_ref"], opts["profile_ref"] = opts["trace"], opts["profile"]
        opts["trace"], opts["profile"] = str(tpath), str(ppath)
        opts["only_class"] = list(opts["only_class"])
        try:
            cfg = run_config_from_options(opts)
        except SimspecError as exc:
            raise ConfigError(f"{where}: run {label}: {exc}") from None
        transforms = {k: opts[k] for k in TRANSFORM_KEYS}
        tk = dumps_json([tsha, opts["format"], transforms, opts["seed"]])
        if tk not in transformed:
            try:
                tr = load_run_trace(str(tpath), opts["format"], tsha, transforms, opts["seed"])
            except SimspecError as exc:
                raise ConfigError(f"{where}: run {label}: trace {tpath.name}: {exc}") from None
            from simspec.traces.stats import mean_rate_rps

            transformed[tk] = mean_rate_rps(tr.arrival_s)
        id_transforms = {k: v for k, v in transforms.items() if not (k in _NEW_TRANSFORM_KEYS and v is None)}
        identity = {"run": cfg.identity_dict(), "trace_sha256": tsha, "format": opts["format"],
                    "transforms": id_transforms, "profile_sha256": psha}
        if opts.get("goodput"):  # only when set, so that older sweeps keep their ids
            identity["goodput"] = opts["goodput"]
        run_id = hashlib.sha256(dumps_json(identity).encode()).hexdigest()[:12]
        if run_id in ids:
            raise ConfigError(f"{where}: runs {ids[run_id]} and {label} resolve to the same configuration "
                              f"(an axis repeats a value in another spelling)")
        ids[run_id] = label
        runs.append(RunSpec(run_id=run_id, axes=point, options=opts, run_config=cfg.to_dict(),
                            trace_sha256=tsha, profile_sha256=psha, offered_rate_rps=transformed[tk]))
    _check_methods(spec_profiles, profiles, axes, where)
    name = doc.get("name") or (Path(where).stem if where != "<grid>" else "sweep")
    return Grid(path=where, name=str(name), description=str(doc.get("description") or ""),
                base=base, axes=axes, runs=runs)


def _check_methods(spec_profiles: dict[str, set[str]], profiles: dict[str, Any], axes: dict[str, list],
                   where: str) -> None:
    """Build each speculation method once per profile it runs with: a value that no profile of the
    grid accepts (a bad parameter) is a grid error; one that only some profiles reject (say, an
    early-exit method on a whole-model profile) is left to fail, and be recorded, in those runs."""
    from simspec.simulator.config import ComponentSpec
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import get_method_class

    for spec, ppaths in spec_profiles.items():
        comp = ComponentSpec.parse(spec, "spec")
        errors = []
        for pp in sorted(ppaths):
            prof = profiles[pp]
            try:
                get_method_class(comp.name)(dict(comp.params), prof, CostModel(prof))
            except ConfigError as exc:
                errors.append(str(exc))
        if errors and len(errors) == len(ppaths):
            src = f"axes.spec[{axes['spec'].index(spec)}]" if spec in axes.get("spec", []) else "base.spec"
            msg = errors[0][len("--spec "):] if errors[0].startswith("--spec ") else errors[0]
            raise ConfigError(f"{where}: {src}: {msg}")


def run_config_from_options(opts: dict[str, Any]):
    """The :class:`RunConfig` for resolved grid options (names as in ``simspec replay``)."""
    from simspec.commands.replay import build_config

    return build_config(opts["policy"], opts["spec"], opts["spec_len"], opts["replicas"], opts["router"],
                        opts["max_batch"], opts["kv_budget_tokens"], opts["preempt"], opts["seed"],
                        opts["slo_ttft_ms"], opts["slo_tpot_ms"], opts["allow_extrapolation"],
                        opts["max_batched_tokens"],
                        {k: opts[k] for k in ("batching", "block_size", "chunked_prefill",
                                              "long_prefill_token_threshold", "max_concurrency", "steps_log",
                                              "steps_log_every")})


# ---------------------------------------------------------------------------------------------
# Worker side: load (cached per process), simulate, write the run directory
# ---------------------------------------------------------------------------------------------

_TRACES: dict[tuple[str, str | None, str], Any] = {}
_PROFILES: dict[tuple[str, str], Any] = {}


def load_run_trace(path: str, fmt: str | None, sha256: str, transforms: dict[str, Any], seed: int):
    """The trace of a run: the file (parsed once per process, keyed by its hash) with the
    transforms applied (:mod:`simspec.traces.transforms`). Length-only tables get seeded Poisson
    arrivals at ``rate``."""
    from simspec.traces.formats import LENGTH_FORMATS, detect_format, load_trace
    from simspec.traces.transforms import apply_transforms, load_and_transform

    tf = dict(transforms)
    tf["only_class"] = tuple(tf.get("only_class") or ())
    fmt_eff = fmt or detect_format(Path(path))
    if fmt_eff in LENGTH_FORMATS:
        return load_and_transform(path, fmt_eff, seed=seed, **tf)
    key = (path, fmt, sha256)
    trace = _TRACES.get(key)
    if trace is None:
        trace = load_trace(path, fmt)
        if len(_TRACES) > 8:
            _TRACES.clear()
        _TRACES[key] = trace
    return apply_transforms(trace, seed=seed, **tf)


def _load_run_profile(path: str, sha256: str):
    from simspec.profile import load_profile

    key = (path, sha256)
    prof = _PROFILES.get(key)
    if prof is None:
        prof = load_profile(path)
        if len(_PROFILES) > 8:
            _PROFILES.clear()
        _PROFILES[key] = prof
    return prof


def _json_roundtrip(obj: Any) -> Any:
    """What a value reads back as from the run's JSON files (so fresh and resumed rows agree)."""
    return json.loads(dumps_json(json_safe(obj)))


def execute_run(task: dict[str, Any]) -> dict[str, Any]:
    """Run one sweep task (see :meth:`RunSpec.task`) and write its run directory.

    Never raises for a failing simulation: returns ``{"status": "failed", "error", "traceback"}``;
    on success ``{"status": "ok", "summary"}`` (the summary as JSON reads it back).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        from simspec.simulator.config import RunConfig
        from simspec.simulator.output import write_run
        from simspec.simulator.run import simulate

        opts = dict(task["options"])
        if not Path(opts["trace"]).is_file() and opts.get("trace_ref"):
            opts["trace"] = str(resolve_trace(opts["trace_ref"], Path.cwd()))
        if not Path(opts["profile"]).is_file() and opts.get("profile_ref"):
            opts["profile"] = str(resolve_profile(opts["profile_ref"], Path.cwd()))
        if _sha256_file(opts["trace"]) != task["trace_sha256"]:
            raise SimspecError(f"{opts['trace']}: not the trace the sweep was planned with (changed since, or "
                               f"a different file on this worker)")
        profile = _load_run_profile(opts["profile"], task["profile_sha256"])
        if profile.sha256 != task["profile_sha256"]:
            raise SimspecError(f"{opts['profile']}: not the profile the sweep was planned with (changed since, "
                               f"or a different file on this worker)")
        trace = load_run_trace(opts["trace"], opts["format"], task["trace_sha256"],
                               {k: opts[k] for k in TRANSFORM_KEYS}, opts["seed"])
        config = RunConfig.from_dict(task["run_config"])
        result = simulate(config, trace, profile)
        if opts.get("goodput"):
            from simspec.vllm_metrics import GoodputSLO, vllm_goodput

            slo = GoodputSLO.parse([opts["goodput"]])
            result.summary.update(vllm_goodput(result.requests, result.summary["makespan_s"], slo))
            result.config["vllm_goodput_slo_ms"] = slo.to_dict()
        result.config["sweep"] = {"run_id": task["run_id"], "axes": task["axes"], "options": opts,
                                  "trace_sha256": task["trace_sha256"],
                                  "offered_rate_rps": task["offered_rate_rps"]}
        write_run(result, task["run_dir"], overwrite=False)
        return {"run_id": task["run_id"], "status": "ok", "summary": _json_roundtrip(result.summary),
                "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    except Exception as exc:  # recorded, never fatal to the sweep
        return {"run_id": task["run_id"], "status": "failed", "error": _one_line(exc),
                "traceback": traceback.format_exc(), "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Executors: one submit / as-completed loop for local processes and Dask
# ---------------------------------------------------------------------------------------------

@dataclass
class Executor:
    """``submit(fn, arg, key) -> future``; ``as_completed(futures)`` yields them as they finish."""

    submit: Callable[[Callable, Any, str], Any]
    as_completed: Callable[[Any], Iterator[Any]]
    description: str
    cancel: Callable[[], None] = lambda: None


def default_workers() -> int:
    return os.cpu_count() or 1


@contextlib.contextmanager
def open_executor(workers: int | None = None, scheduler_address: str | None = None) -> Iterator[Executor]:
    """Local worker processes (``workers``, default all cores) or the Dask cluster at
    ``scheduler_address`` (``tcp://HOST:PORT``; any address ``dask.distributed.Client`` accepts)."""
    if scheduler_address:
        try:
            from dask.distributed import Client, as_completed
        except ImportError:
            raise ConfigError("--scheduler-address needs dask.distributed: pip install 'simspec[sweep]'") from None
        try:
            client = Client(scheduler_address, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"--scheduler-address {scheduler_address}: cannot connect ({_one_line(exc)})") from None
        try:
            n = len(client.nthreads())
            futures: list[Any] = []

            def submit(fn, arg, key):
                fut = client.submit(fn, arg, key=f"simspec-{key}", pure=False)
                futures.append(fut)
                return fut

            yield Executor(submit=submit, as_completed=lambda futs: as_completed(futs, loop=client.loop),
                           description=f"dask cluster {scheduler_address} ({n} worker(s))",
                           cancel=lambda: client.cancel(futures))
        finally:
            client.close()
        return
    workers = workers or default_workers()
    ctx = _mp_context()
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                  initializer=watch_parent, initargs=(os.getpid(),))
    def cancel() -> None:
        """Stop now (Ctrl-C): drop queued runs and terminate the workers; a run cut short leaves
        only a temporary directory, removed when the sweep is resumed."""
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()

    try:
        yield Executor(submit=lambda fn, arg, key: pool.submit(fn, arg),
                       as_completed=concurrent.futures.as_completed,
                       description=f"{workers} local process(es)", cancel=cancel)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


PARENT_POLL_S = 0.5  # how often a worker checks that the process that started it is alive


def watch_parent(driver_pid: int) -> None:
    """Worker initializer: a daemon thread that ends this worker as soon as the driver (the
    ``simspec sweep``/``capacity`` process, ``driver_pid``) is gone, even if it was SIGKILLed and
    could not stop its workers. (With ``forkserver`` a worker's parent is the fork server, not the
    driver, so ``os.getppid()`` alone cannot tell; the driver's pid is polled, and the parent too.)"""
    import threading

    parent = os.getppid()

    def poll() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if not _pid_running(driver_pid) or os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=poll, name="simspec-parent-watch", daemon=True).start()


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt while the block runs (main thread only), so a
    ``kill`` of the driver goes through the same path as Ctrl-C: workers terminated, partial runs
    removed on resume, exit status 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _mp_context():
    """``forkserver`` (a clean server that has imported simspec, so workers start fast and never
    inherit the driver's threads) where available, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["simspec.sweep", "simspec.simulator.run", "simspec.simulator.output"])
        return ctx
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the table it wrote and how many runs it ran, skipped, failed."""

    out_dir: Path
    table: Any  # pandas.DataFrame, one row per run in grid order
    n_runs: int
    n_executed: int
    n_skipped: int
    n_failed: int
    wall_s: float
    executor: str
    notes: list[str] = field(default_factory=list)
    run_cpu_s: float = 0.0  # CPU seconds the executed runs took in their workers (load-independent)


def is_complete_run(run_dir: Path) -> bool:
    """A run directory with all four files (``write_run`` renames it into place only when complete)."""
    return all((run_dir / n).is_file() for n in ("config.json", "summary.json", "requests.parquet", "steps.parquet"))


@contextlib.contextmanager
def _sweep_lock(out_dir: Path) -> Iterator[None]:
    """One sweep writes into ``out_dir`` at a time; a lock left by a dead process on this host is taken over."""
    lock = out_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                lock.unlink(missing_ok=True)
                continue
            raise SimspecError(f"{out_dir}: another sweep (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) "
                               f"is writing here; if it is gone, delete {lock}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _pid_running(pid: int) -> bool:
    """Alive and not a zombie (a killed driver stays a zombie until its own parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_partials(runs_dir: Path) -> int:
    """Delete temporary directories left by a killed sweep (``.<id>.tmp-*``, ``.<id>.old-*``)."""
    n = 0
    if runs_dir.is_dir():
        for p in runs_dir.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
    return n


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def make_row(run: RunSpec, status: str, error: str | None, summary: dict[str, Any] | None) -> dict[str, Any]:
    """One ``sweep.parquet`` row: axes, identity, status, offered rate, every other option's value
    (the grid's base and defaults), scalar summary metrics (a list metric such as
    ``replica_utilisation`` becomes its mean, ``<name>_mean``)."""
    row: dict[str, Any] = dict(run.axes)
    for k, v in list(row.items()):
        if isinstance(v, (list, tuple)):
            row[k] = ",".join(map(str, v))
    row.update({"run_id": run.run_id, "status": status, "error": error,
                "run_dir": f"{RUNS_DIR}/{run.run_id}", "offered_rate_rps": run.offered_rate_rps})
    # the base (non-axis) values too, so a row says everything the run used (trace and profile
    # as written in the grid)
    for k in OPTIONS:
        if k in row:
            continue
        v = run.options.get(f"{k}_ref", run.options.get(k)) if k in ("trace", "profile") else run.options.get(k)
        row[k] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    for k, v in (summary or {}).items():
        if k in row:
            continue
        if isinstance(v, list):
            vals = [float(x) for x in v if x is not None]
            row[f"{k}_mean"] = sum(vals) / len(vals) if vals else None
        elif isinstance(v, (int, float, str, bool)) or v is None:
            row[k] = v
    return row


def sweep_frame(rows: list[dict[str, Any]]):
    """Rows → DataFrame with a fixed column order (first-seen order over the rows)."""
    import pandas as pd

    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return pd.DataFrame.from_records(rows, columns=cols)


def _write_table(df, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=False)
    write_bytes(path, sink.getvalue().to_pybytes())


def run_sweep(grid: Grid, out_dir: str | Path, *, workers: int | None = None,
              scheduler_address: str | None = None, progress: bool = True,
              retry_failed: bool = False, echo: Callable[[str], None] | None = None) -> SweepResult:
    """Run every run of ``grid`` that ``out_dir`` does not hold yet; write ``sweep.parquet``.

    ``workers``: local processes (default: all cores); ``scheduler_address``: run on that Dask
    cluster instead. Finished runs are skipped; failed ones are skipped unless ``retry_failed``.
    """
    from simspec.atomic import MARKER, check_output_dir, chmod_tree, dir_mode, write_marker

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if scheduler_address and workers:
        raise ConfigError("--workers sets local processes; with --scheduler-address the cluster's workers run")
    check_output_dir(out_dir, "sweep", resume=True)
    out_dir.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    if not (out_dir / MARKER).is_file():
        write_marker(out_dir, "sweep")
    runs_dir, failed_dir = out_dir / RUNS_DIR, out_dir / FAILED_DIR
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if echo:
            echo(f"note: {msg}")
    with _sweep_lock(out_dir):
        n_partial = _remove_partials(runs_dir)
        if n_partial:
            note(f"removed {n_partial} partial run director{'y' if n_partial == 1 else 'ies'} "
                         f"left by an interrupted sweep; those runs are redone")
        rows: dict[str, dict[str, Any]] = {}
        todo: list[RunSpec] = []
        n_failed_kept = 0
        for run in grid.runs:
            rdir, fjson = runs_dir / run.run_id, failed_dir / f"{run.run_id}.json"
            if is_complete_run(rdir):
                rows[run.run_id] = make_row(run, "ok", None, _read_json(rdir / "summary.json"))
                fjson.unlink(missing_ok=True)
            elif fjson.is_file() and not retry_failed:
                rows[run.run_id] = make_row(run, "failed", _read_json(fjson).get("error"), None)
                n_failed_kept += 1
            else:
                if rdir.exists():  # not a run directory we wrote: refuse to guess
                    raise SimspecError(f"{rdir}: exists but is not a complete run directory; remove it")
                todo.append(run)
        n_skipped = len(grid.runs) - len(todo)
        if n_failed_kept:
            note(f"{n_failed_kept} run(s) failed in an earlier attempt and were not retried "
                         f"(see {failed_dir}; pass --retry-failed to rerun them)")
        executor_desc = "none (nothing to run)"
        pbar = None
        if progress:
            from tqdm import tqdm

            pbar = tqdm(total=len(grid.runs), initial=n_skipped, unit="run", desc="sweep",
                        mininterval=0.5, dynamic_ncols=True, file=sys.stderr)
        n_failed_now = 0
        run_cpu_s = 0.0
        try:
            if todo:
                with open_executor(None if scheduler_address else (workers or min(default_workers(), len(todo))),
                                   scheduler_address) as ex:
                    executor_desc = ex.description
                    pending = {ex.submit(execute_run, run.task(out_dir), run.run_id): run for run in todo}
                    try:
                        for fut in ex.as_completed(list(pending)):
                            run = pending.pop(fut)
                            try:
                                res = fut.result()
                            except concurrent.futures.process.BrokenProcessPool:
                                raise SimspecError(
                                    f"a worker process died (killed, out of memory, or a script that calls "
                                    f"run_sweep without an `if __name__ == '__main__':` guard); finished runs "
                                    f"are kept in {runs_dir}: run the same sweep again to resume") from None
                            except Exception as exc:  # e.g. Dask's KilledWorker: this task kills workers
                                res = {"status": "failed", "error": _one_line(exc),
                                       "traceback": traceback.format_exc()}
                            run_cpu_s += float(res.get("cpu_s", 0.0))
                            if res["status"] == "ok":
                                rows[run.run_id] = make_row(run, "ok", None, res["summary"])
                                (failed_dir / f"{run.run_id}.json").unlink(missing_ok=True)
                            else:
                                n_failed_now += 1
                                write_json(failed_dir / f"{run.run_id}.json",
                                           {"run_id": run.run_id, "axes": run.axes, "options": run.options,
                                            "error": res["error"], "traceback": res.get("traceback", "")})
                                rows[run.run_id] = make_row(run, "failed", res["error"], None)
                            if pbar is not None:
                                pbar.update(1)
                                if n_failed_now:
                                    pbar.set_postfix(failed=n_failed_now, refresh=False)
                    except BaseException:
                        ex.cancel()
                        raise
        finally:
            if pbar is not None:
                pbar.close()
        table = sweep_frame([rows[r.run_id] for r in grid.runs])
        _write_table(table, out_dir / SWEEP_TABLE)
        n_failed = int((table["status"] == "failed").sum()) if len(table) else 0
        wall = time.perf_counter() - t0
        write_json(out_dir / SWEEP_MANIFEST, {
            "grid": {"path": grid.path, "name": grid.name, "description": grid.description,
                     "base": _json_roundtrip(grid.base), "axes": _json_roundtrip(grid.axes)},
            "axes": list(grid.axes), "n_runs": len(grid.runs), "n_ok": len(grid.runs) - n_failed,
            "n_failed": n_failed, "last_attempt": {"executed": len(todo), "skipped": n_skipped,
                                                   "executor": executor_desc, "wall_s": round(wall, 3)},
        })
    return SweepResult(out_dir=out_dir, table=table, n_runs=len(grid.runs), n_executed=len(todo),
                       n_skipped=n_skipped, n_failed=n_failed, wall_s=wall, executor=executor_desc, notes=notes,
                       run_cpu_s=run_cpu_s)


def read_sweep(path: str | Path):
    """Load a sweep directory's ``sweep.parquet`` (or the file itself) as a DataFrame."""
    import pandas as pd

    path = Path(path)
    table = path / SWEEP_TABLE if path.is_dir() else path
    if not table.is_file():
        raise SimspecError(f"{path}: not a sweep directory (no {SWEEP_TABLE}; is the sweep finished?)")
    try:
        return pd.read_parquet(table)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        msg = " ".join(str(exc).split())[:120]
        raise SimspecError(f"{table}: not a readable parquet file ({type(exc).__name__}: {msg})") from None


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """``sweep.json`` of a sweep directory (``{}`` if absent)."""
    p = Path(sweep_dir) / SWEEP_MANIFEST
    if not p.is_file():
        return {}
    try:
        doc = _read_json(p)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SimspecError(f"{p}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(doc, dict):
        raise SimspecError(f"{p}: expected a JSON object, got {type(doc).__name__}")
    return doc
