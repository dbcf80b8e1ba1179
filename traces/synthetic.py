"""Synthetic workloads: arrival processes × length distributions × acceptance classes → a Trace.

Every random draw comes from ``simspec.rng.stream(seed, name)`` with one stream per concern
(``"arrivals"``, ``"lengths"``, ``"classes"``), so changing the class mixture never changes the
arrival times or lengths drawn for the same seed.

Arrivals (times in seconds from 0; the first request arrives one gap after 0):
  * :class:`PoissonArrivals` — exponential gaps with mean ``1 / rate_per_s`` (CV 1).
  * :class:`GammaArrivals` — Gamma gaps with mean ``1 / rate_per_s`` and coefficient of variation
    ``cv`` (shape ``1/cv²``); ``cv > 1`` is burstier than Poisson, ``cv = 0`` is a fixed gap.
  * :class:`ReplayedArrivals` — the timestamps of an existing trace.

Lengths (tokens, integers >= 1):
  * :class:`FixedLengths` — every request the same.
  * :class:`LognormalLengths` — bivariate lognormal: from target means/CVs (independent), or fitted
    (means and covariance of the log lengths, so the prompt/output correlation is kept).
  * :class:`EmpiricalLengths` — (prompt, output[, class]) rows resampled with replacement from a
    table or trace, e.g. the bundled ShareGPT lengths.

Classes: a mixture ``code:0.3,chat:0.7`` (i.i.d. per request), one name, or a mapping
``map:SRC=DST,...[,*=DST]`` applied to the class each request already has (from an empirical source
with an ``acceptance_class`` column, or ``default``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simspec.errors import ConfigError
from simspec.rng import stream
from simspec.trace import DEFAULT_CLASS, Trace

# ---------------------------------------------------------------------------------------------
# Arrival processes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoissonArrivals:
    """Poisson process: exponential interarrival gaps, mean rate ``rate_per_s`` requests/s."""

    rate_per_s: float

    def __post_init__(self):
        _positive("rate", self.rate_per_s)


@dataclass(frozen=True)
class GammaArrivals:
    """Renewal process with Gamma gaps: mean rate ``rate_per_s`` requests/s, gap CV ``cv``."""

    rate_per_s: float
    cv: float

    def __post_init__(self):
        _positive("rate", self.rate_per_s)
        if not (math.isfinite(self.cv) and self.cv >= 0):
            raise ConfigError(f"--cv must be a finite number >= 0, got {self.cv!r}")


@dataclass(frozen=True)
class ReplayedArrivals:
    """The (sorted) arrival times ``arrival_s`` of an existing trace, replayed as they are."""

    arrival_s: np.ndarray
    source: str = ""


ArrivalProcess = PoissonArrivals | GammaArrivals | ReplayedArrivals


def _positive(name: str, x: float) -> None:
    if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
        raise ConfigError(f"--{name} must be a finite number > 0, got {x!r}")


def describe_arrivals(p: ArrivalProcess) -> str:
    """One-line description, for notes and reports."""
    if isinstance(p, PoissonArrivals):
        return f"Poisson arrivals at {p.rate_per_s:g} req/s"
    if isinstance(p, GammaArrivals):
        return f"Gamma arrivals at {p.rate_per_s:g} req/s, CV {p.cv:g}"
    return f"arrival times replayed from {p.source or 'a trace'} ({len(p.arrival_s)} requests)"


def _gaps(p: ArrivalProcess, rng: np.random.Generator, n: int) -> np.ndarray:
    mean = 1.0 / p.rate_per_s
    if isinstance(p, PoissonArrivals):
        return rng.exponential(mean, size=n)
    if p.cv == 0:
        return np.full(n, mean)
    shape = 1.0 / (p.cv * p.cv)
    return rng.gamma(shape, mean / shape, size=n)


def arrival_times(p: ArrivalProcess, rng: np.random.Generator, *, n: int | None = None,
                  duration_s: float | None = None) -> np.ndarray:
    """Arrival times in seconds: the first ``n`` of the process, or all before ``duration_s``.

    For :class:`ReplayedArrivals`, neither given means every timestamp of the trace.
    """
    if n is not None and duration_s is not None:
        raise ConfigError("give --n or --duration-s, not both")
    if n is not None and (int(n) != n or n < 1):
        raise ConfigError(f"--n must be an integer >= 1, got {n!r}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"--duration-s must be a finite number > 0, got {duration_s!r}")
    if isinstance(p, ReplayedArrivals):
        t = np.asarray(p.arrival_s, dtype=np.float64)
        if n is not None:
            if n > len(t):
                raise ConfigError(f"--n {n} but the replayed trace has only {len(t)} arrivals")
            return t[:n].copy()
        if duration_s is not None:
            return t[t < duration_s].copy()
        return t.copy()
    if n is None and duration_s is None:
        raise ConfigError("give --n N (requests) or --duration-s D (seconds)")
    if n is not None:
        return np.cumsum(_gaps(p, rng, int(n)))
    chunks: list[np.ndarray] = []
    t0 = 0.0
    chunk = max(64, int(1.1 * p.rate_per_s * duration_s) + 64)
    while t0 < duration_s:
        c = t0 + np.cumsum(_gaps(p, rng, chunk))
        chunks.append(c)
        t0 = float(c[-1])
    t = np.concatenate(chunks)
    return t[t < duration_s]


def parse_arrivals(spec: str, rate: float | None = None, cv: float | None = None) -> ArrivalProcess:
    """``poisson`` | ``gamma`` | ``replay:FILE_OR_BUNDLED_NAME`` (with ``--rate``/``--cv``)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "poisson":
        if rate is None:
            raise ConfigError("--arrivals poisson needs --rate R (requests/s)")
        if cv is not None and cv != 1:
            raise ConfigError(f"--arrivals poisson has CV 1; for --cv {cv:g} use --arrivals gamma")
        return PoissonArrivals(float(rate))
    if kind == "gamma":
        if rate is None or cv is None:
            raise ConfigError("--arrivals gamma needs --rate R (requests/s) and --cv C (interarrival CV)")
        return GammaArrivals(float(rate), float(cv))
    if kind in ("replay", "trace"):
        if cv is not None:
            raise ConfigError("--cv goes with --arrivals gamma, not with replayed arrivals")
        if not arg:
            raise ConfigError("--arrivals replay:FILE needs a trace file or bundled trace name")
        from simspec.traces.formats import load_trace, resolve_trace_arg

        tr = load_trace(resolve_trace_arg(arg))
        return ReplayedArrivals(tr.arrival_s.copy(), source=arg)
    raise ConfigError(f"unknown arrival process {spec!r} (expected poisson, gamma or replay:FILE)")


# ---------------------------------------------------------------------------------------------
# Length distributions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedLengths:
    """Every request has ``prompt_tokens`` and ``output_tokens``."""

    prompt_tokens: int
    output_tokens: int

    def __post_init__(self):
        for name, v in (("prompt", self.prompt_tokens), ("output", self.output_tokens)):
            if int(v) != v or v < 1:
                raise ConfigError(f"fixed {name} length must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class LognormalLengths:
    """Bivariate lognormal over (prompt, output) tokens: ``log`` lengths are normal with mean ``mu``
    (2,) and covariance ``cov`` (2×2). Draws are rounded to integers and clipped to >= 1."""

    mu: tuple[float, float]
    cov: tuple[tuple[float, float], tuple[float, float]]
    source: str = ""

    @classmethod
    def from_moments(cls, prompt_mean: float, prompt_cv: float, output_mean: float,
                     output_cv: float) -> "LognormalLengths":
        """Independent prompt and output lognormals with the given arithmetic mean and CV."""
        for name, v in (("prompt mean", prompt_mean), ("output mean", output_mean)):
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"lognormal {name} must be > 0, got {v!r}")
        for name, v in (("prompt CV", prompt_cv), ("output CV", output_cv)):
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"lognormal {name} must be >= 0, got {v!r}")
        s2p, s2o = math.log1p(prompt_cv ** 2), math.log1p(output_cv ** 2)
        return cls((math.log(prompt_mean) - s2p / 2, math.log(output_mean) - s2o / 2),
                   ((s2p, 0.0), (0.0, s2o)),
                   source=f"lognormal(mean {prompt_mean:g}/{output_mean:g}, CV {prompt_cv:g}/{output_cv:g})")

    @classmethod
    def fit(cls, prompt_tokens, output_tokens, source: str = "") -> "LognormalLengths":
        """Maximum-likelihood fit: mean and covariance of (log prompt, log output)."""
        z = np.log(np.vstack([np.asarray(prompt_tokens, float), np.asarray(output_tokens, float)]))
        if z.shape[1] < 2:
            raise ConfigError("a lognormal fit needs at least 2 requests")
        mu = z.mean(axis=1)
        cov = np.cov(z, ddof=0)
        return cls((float(mu[0]), float(mu[1])),
                   ((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
                   source=f"lognormal fitted to {source}" if source else "lognormal (fitted)")


@dataclass(frozen=True)
class EmpiricalLengths:
    """Rows (prompt, output, class) resampled uniformly with replacement."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    acceptance_class: np.ndarray | None = None
    source: str = ""


LengthSpec = FixedLengths | LognormalLengths | EmpiricalLengths


def sample_lengths(spec: LengthSpec, rng: np.random.Generator, n: int):
    """``n`` draws: (prompt_tokens int64, output_tokens int64, source classes or None)."""
    if isinstance(spec, FixedLengths):
        return (np.full(n, int(spec.prompt_tokens), dtype=np.int64),
                np.full(n, int(spec.output_tokens), dtype=np.int64), None)
    if isinstance(spec, EmpiricalLengths):
        idx = rng.integers(0, len(spec.prompt_tokens), size=n)
        acc = None if spec.acceptance_class is None else np.asarray(spec.acceptance_class, dtype=object)[idx]
        return (np.asarray(spec.prompt_tokens, dtype=np.int64)[idx],
                np.asarray(spec.output_tokens, dtype=np.int64)[idx], acc)
    mu = np.asarray(spec.mu, dtype=np.float64)
    cov = np.asarray(spec.cov, dtype=np.float64)
    # Cholesky of a PSD 2x2 (tolerates zero variance): z = mu + L @ e
    a = math.sqrt(max(cov[0, 0], 0.0))
    b = cov[0, 1] / a if a > 0 else 0.0
    c = math.sqrt(max(cov[1, 1] - b * b, 0.0))
    e = rng.standard_normal(size=(2, n))
    zp = mu[0] + a * e[0]
    zo = mu[1] + b * e[0] + c * e[1]
    cap = math.log(1e9)
    pt = np.maximum(1, np.rint(np.exp(np.minimum(zp, cap)))).astype(np.int64)
    ot = np.maximum(1, np.rint(np.exp(np.minimum(zo, cap)))).astype(np.int64)
    return pt, ot, None


def _length_source(name: str):
    from simspec.traces.formats import bundled_length_tables, load_length_pairs, resolve_trace_arg

    from simspec.errors import TraceError

    try:
        path = resolve_trace_arg(name)
    except TraceError:
        tables = bundled_length_tables()
        raise ConfigError(f"lengths source {name!r}: no such file or bundled table "
                          f"(bundled: {', '.join(tables)}; or any bundled trace name)") from None
    pt, ot, acc = load_length_pairs(path)
    return pt, ot, acc, name


def parse_lengths(spec: str) -> LengthSpec:
    """``fixed:P,O`` | ``lognormal:P_MEAN,P_CV,O_MEAN,O_CV`` | ``lognormal:fit=NAME_OR_FILE`` |
    ``empirical:NAME_OR_FILE`` (a length table or any trace; bundled: ``sharegpt``, ``arxiv``, ...)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "fixed":
        parts = arg.split(",")
        if len(parts) != 2:
            raise ConfigError(f"--lengths {spec!r}: expected fixed:PROMPT,OUTPUT (tokens)")
        try:
            p, o = (float(x) for x in parts)
        except ValueError:
            raise ConfigError(f"--lengths {spec!r}: PROMPT and OUTPUT must be integers") from None
        return FixedLengths(int(p) if p == int(p) else p, int(o) if o == int(o) else o)
    if kind == "lognormal":
        if arg.startswith("fit="):
            pt, ot, _, label = _length_source(arg[4:])
            return LognormalLengths.fit(pt, ot, source=label)
        parts = arg.split(",")
        if len(parts) != 4:
            raise ConfigError(f"--lengths {spec!r}: expected lognormal:PROMPT_MEAN,PROMPT_CV,OUTPUT_MEAN,OUTPUT_CV "
                              f"or lognormal:fit=NAME_OR_FILE")
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            raise ConfigError(f"--lengths {spec!r}: the four lognormal parameters must be numbers") from None
        return LognormalLengths.from_moments(*vals)
    if kind == "empirical":
        if not arg:
            raise ConfigError("--lengths empirical:NAME_OR_FILE needs a table or trace (e.g. empirical:sharegpt)")
        pt, ot, acc, label = _length_source(arg)
        return EmpiricalLengths(pt, ot, acc, source=label)
    raise ConfigError(f"unknown lengths spec {spec!r} (expected fixed:P,O, lognormal:..., empirical:NAME_OR_FILE)")


def describe_lengths(spec: LengthSpec) -> str:
    if isinstance(spec, FixedLengths):
        return f"fixed lengths {spec.prompt_tokens}/{spec.output_tokens} tokens"
    if isinstance(spec, EmpiricalLengths):
        return f"lengths resampled from {spec.source} ({len(spec.prompt_tokens)} rows)"
    return spec.source or "lognormal lengths"


# ---------------------------------------------------------------------------------------------
# Acceptance classes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassMixture:
    """Each request independently gets ``names[i]`` with probability ``weights[i]`` (normalised)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class ClassMapping:
    """Relabel: a request of class ``k`` gets ``mapping[k]``; others ``default`` (``*=``) or an error."""

    mapping: dict[str, str] = field(default_factory=dict)
    default: str | None = None


ClassSpec = ClassMixture | ClassMapping


def _check_name(spec: str, name: str) -> str:
    name = name.strip()
    if not name or any(ch in name for ch in ",:= "):
        raise ConfigError(f"class spec {spec!r}: bad class name {name!r}")
    return name


def parse_classes(spec: str) -> ClassSpec:
    """``NAME`` | ``NAME:W,NAME:W,...`` (mixture) | ``map:SRC=DST,...[,*=DST]`` (mapping)."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("class spec is empty")
    if spec.lower().startswith("map:"):
        mapping: dict[str, str] = {}
        default = None
        for item in spec[4:].split(","):
            src, eq, dst = item.partition("=")
            if not eq:
                raise ConfigError(f"class spec {spec!r}: expected SRC=DST, got {item!r}")
            src, dst = src.strip(), _check_name(spec, dst)
            if src == "*":
                default = dst
            else:
                src = _check_name(spec, src)
                if src in mapping:
                    raise ConfigError(f"class spec {spec!r}: {src!r} mapped twice")
                mapping[src] = dst
        return ClassMapping(mapping, default)
    items = spec.split(",")
    if len(items) == 1 and ":" not in items[0]:
        return ClassMixture((_check_name(spec, items[0]),), (1.0,))
    names: list[str] = []
    weights: list[float] = []
    for item in items:
        name, colon, w = item.partition(":")
        if not colon:
            raise ConfigError(f"class spec {spec!r}: expected NAME:WEIGHT, got {item!r}")
        name = _check_name(spec, name)
        if name in names:
            raise ConfigError(f"class spec {spec!r}: class {name!r} given twice")
        try:
            wf = float(w)
        except ValueError:
            raise ConfigError(f"class spec {spec!r}: weight of {name!r} is not a number ({w!r})") from None
        if not (math.isfinite(wf) and wf >= 0):
            raise ConfigError(f"class spec {spec!r}: weight of {name!r} must be >= 0, got {w}")
        names.append(name)
        weights.append(wf)
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"class spec {spec!r}: weights sum to 0")
    return ClassMixture(tuple(names), tuple(w / total for w in weights))


def assign_classes(spec: ClassSpec, rng: np.random.Generator, n: int,
                   current: np.ndarray | None = None) -> np.ndarray:
    """Class per request: drawn from a mixture, or ``current`` relabelled by a mapping."""
    if isinstance(spec, ClassMixture):
        if len(spec.names) == 1:
            return np.full(n, spec.names[0], dtype=object)
        idx = rng.choice(len(spec.names), size=n, p=np.asarray(spec.weights))
        return np.asarray(spec.names, dtype=object)[idx]
    cur = np.full(n, DEFAULT_CLASS, dtype=object) if current is None else np.asarray(current, dtype=object)
    out = np.empty(n, dtype=object)
    missing: dict[str, int] = {}
    for i, c in enumerate(cur):
        if c in spec.mapping:
            out[i] = spec.mapping[c]
        elif spec.default is not None:
            out[i] = spec.default
        else:
            missing[c] = missing.get(c, 0) + 1
    if missing:
        lab, cnt = next(iter(missing.items()))
        raise ConfigError(f"class mapping has no entry for class {lab!r} ({cnt} request(s)); "
                          f"add {lab}=CLASS or *=CLASS")
    return out


def describe_classes(spec: ClassSpec) -> str:
    if isinstance(spec, ClassMixture):
        return ",".join(f"{n}:{w:.4g}" for n, w in zip(spec.names, spec.weights))
    items = [f"{k}={v}" for k, v in spec.mapping.items()] + ([f"*={spec.default}"] if spec.default else [])
    return "map:" + ",".join(items)


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def synthesize(arrivals: ArrivalProcess, lengths: LengthSpec, *, n: int | None = None,
               duration_s: float | None = None, classes: ClassSpec | None = None,
               slo_class: str = "", seed: int = 0, source: str = "synthetic") -> Trace:
    """A synthetic trace: ids ``syn-0..``, arrivals, lengths and classes from their own streams."""
    times = arrival_times(arrivals, stream(seed, "arrivals"), n=n, duration_s=duration_s)
    m = len(times)
    if m == 0:
        raise ConfigError(f"no arrivals within --duration-s {duration_s:g}; raise the duration or the rate")
    pt, ot, src_cls = sample_lengths(lengths, stream(seed, "lengths"), m)
    if classes is None:
        acc = src_cls
    else:
        acc = assign_classes(classes, stream(seed, "classes"), m, src_cls)
    notes = [f"synthetic: {describe_arrivals(arrivals)}; {describe_lengths(lengths)}"
             + (f"; classes {describe_classes(classes)}" if classes is not None else "") + f"; seed {seed}"]
    width = len(str(m - 1))
    return Trace.from_columns(request_id=[f"syn-{i:0{width}d}" for i in range(m)], arrival_s=times,
                              prompt_tokens=pt, output_tokens=ot, acceptance_class=acc,
                              slo_class=None if not slo_class else np.full(m, slo_class, dtype=object),
                              source=source, notes=notes)


def empirical_from_path(path: str | Path) -> EmpiricalLengths:
    """Convenience: :class:`EmpiricalLengths` from a table or trace file / bundled name."""
    pt, ot, acc, label = _length_source(str(path))
    return EmpiricalLengths(pt, ot, acc, source=label)
