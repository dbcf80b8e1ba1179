"""Trace transformations: pure functions ``Trace -> Trace`` and the click options that expose them.

Each function returns a new trace (the input is not modified) and appends what it did to
``Trace.notes``. :func:`apply_transforms` applies the option set in a fixed order:

1. ``--window START:END`` — keep requests with START <= arrival_s < END (either side may be
   omitted), then shift times so that START becomes 0.
2. ``--only-class NAME`` (repeatable) — keep requests whose acceptance class is one of them.
3. ``--first N`` — keep the first N requests (by arrival).
4. ``--rate R`` (target mean rate, req/s, as ``simspec trace stats`` measures it: (n−1)/span) or
   ``--rate-scale X`` (X times the rate) — arrival times are multiplied by a constant, so order is
   kept and the span is divided by the rate factor. With ``--burstiness B`` (as ``vllm bench
   serve``) the trace's own arrival times are replaced instead: requests, in order, arrive with
   Gamma-distributed gaps of shape B and mean 1/R (CV = 1/sqrt(B); B = 1 is Poisson), drawn from
   ``simspec.rng.stream(seed, "arrivals")``; the first request arrives at 0.
5. ``--max-prompt-tokens N``, ``--max-output-tokens N`` — clip lengths to at most N (counted).
6. ``--relabel-classes SPEC`` — a class mixture ``code:0.3,chat:0.7``, one name, or a mapping
   ``map:default=chat,*=code`` (see :mod:`simspec.traces.synthetic`).

For use in a command::

    @click.command()
    @transform_options
    def cmd(..., transforms):
        trace = apply_transforms(load_trace(path), seed=seed, **transforms)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import click
import numpy as np

from simspec.errors import ConfigError
from simspec.trace import Trace
from simspec.traces.stats import mean_rate_rps

TRANSFORM_KEYS = ("window", "only_class", "first", "rate", "rate_scale", "max_prompt_tokens",
                  "max_output_tokens", "relabel_classes", "burstiness")


def _with(trace: Trace, note: str, **cols) -> Trace:
    notes = list(trace.notes) + [note]
    return dataclasses.replace(trace, notes=notes, **cols)


def _subset(trace: Trace, idx: np.ndarray, note: str) -> Trace:
    t = trace.subset(idx)
    t.notes.append(note)
    return t


def rescale_rate(trace: Trace, *, rate: float | None = None, scale: float | None = None) -> Trace:
    """Multiply arrival times by ``1 / factor`` where factor = ``scale``, or ``rate`` / current mean
    rate. Order is kept; the span is divided by the factor; the mean rate is multiplied by it."""
    if (rate is None) == (scale is None):
        raise ConfigError("give one of --rate R or --rate-scale X")
    if rate is not None:
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate must be a finite number > 0, got {rate!r}")
        cur = mean_rate_rps(trace.arrival_s)
        if cur is None:
            raise ConfigError(f"--rate: the trace's mean rate is undefined ({len(trace)} request(s), "
                              f"span {float(np.ptp(trace.arrival_s)):g} s); use --rate-scale")
        factor = rate / cur
        note = f"rescaled arrival times by 1/{factor:.6g} to a mean rate of {rate:g} req/s (was {cur:.6g})"
    else:
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"--rate-scale must be a finite number > 0, got {scale!r}")
        factor = scale
        note = f"rescaled the arrival rate by {scale:g}x (arrival times divided by {scale:g})"
    return _with(trace, note, arrival_s=trace.arrival_s / factor)


def check_burstiness(burstiness: float | None, rate: float | None) -> None:
    """``--burstiness`` must be a finite number > 0 and goes with ``--rate``/``--request-rate``."""
    if burstiness is None:
        return
    if isinstance(burstiness, bool) or not isinstance(burstiness, (int, float)) or not (
            math.isfinite(burstiness) and burstiness > 0):
        raise ConfigError(f"--burstiness must be a finite number > 0, got {burstiness!r}")
    if rate is None:
        raise ConfigError("--burstiness B needs --rate/--request-rate R (Gamma arrivals of shape B at R req/s)")


def gamma_burst_arrivals(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Arrival times of ``n`` requests as ``vllm bench serve --request-rate R --burstiness B`` sends
    them: the first at 0, then Gamma gaps of shape B and scale 1/(R*B) (mean 1/R, CV 1/sqrt(B))."""
    from simspec.rng import stream

    gaps = stream(seed, "arrivals").gamma(float(burstiness), 1.0 / (float(rate) * float(burstiness)), size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


def burst_arrivals(trace: Trace, *, rate: float, burstiness: float, seed: int = 0) -> Trace:
    """Replace the trace's arrival times by :func:`gamma_burst_arrivals` (request order kept)."""
    check_burstiness(burstiness, rate)
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"--rate must be a finite number > 0, got {rate!r}")
    t = gamma_burst_arrivals(len(trace), rate, burstiness, seed)
    return _with(trace, f"arrival times replaced by Gamma arrivals at {rate:g} req/s, burstiness {burstiness:g} "
                        f"(CV {1 / math.sqrt(burstiness):.3g}), seed {seed}", arrival_s=t)


def parse_window(text: str) -> tuple[float | None, float | None]:
    """``START:END`` seconds, either side optional (``600:``, ``:1800``)."""
    start, colon, end = str(text).partition(":")
    if not colon:
        raise ConfigError(f"--window {text!r}: expected START:END in seconds (e.g. 0:600 or 600:)")
    try:
        s = float(start) if start.strip() else None
        e = float(end) if end.strip() else None
    except ValueError:
        raise ConfigError(f"--window {text!r}: START and END must be numbers of seconds") from None
    for v in (s, e):
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"--window {text!r}: START and END must be finite")
    if s is not None and e is not None and e <= s:
        raise ConfigError(f"--window {text!r}: END must be greater than START")
    return s, e


def time_window(trace: Trace, start_s: float | None = None, end_s: float | None = None) -> Trace:
    """Requests with ``start_s <= arrival_s < end_s``, times shifted so ``start_s`` is 0."""
    a = trace.arrival_s
    keep = np.ones(len(a), dtype=bool)
    if start_s is not None:
        keep &= a >= start_s
    if end_s is not None:
        keep &= a < end_s
    idx = np.flatnonzero(keep)
    desc = f"[{'' if start_s is None else f'{start_s:g}'}, {'' if end_s is None else f'{end_s:g}'}) s"
    if idx.size == 0:
        raise ConfigError(f"--window {desc} contains no requests (the trace's arrivals span "
                          f"{float(a.min()):g}..{float(a.max()):g} s)")
    shift = start_s if start_s is not None and start_s > 0 else 0.0
    t = _subset(trace, idx, f"window {desc}: kept {idx.size} of {len(a)} requests"
                + (f", times shifted by -{shift:g} s" if shift else ""))
    if shift:
        t.arrival_s = t.arrival_s - shift
    return t


def first_n(trace: Trace, n: int) -> Trace:
    """The first ``n`` requests by arrival (all of them, noted, if the trace is shorter)."""
    if int(n) != n or n < 1:
        raise ConfigError(f"--first must be an integer >= 1, got {n!r}")
    if n >= len(trace):
        return _with(trace, f"--first {n}: the trace has only {len(trace)} requests; kept all")
    return _subset(trace, np.arange(int(n)), f"kept the first {n} of {len(trace)} requests")


def cap_lengths(trace: Trace, *, max_prompt_tokens: int | None = None,
                max_output_tokens: int | None = None) -> Trace:
    """Clip prompt/output lengths to at most the given number of tokens (counts in notes)."""
    out = trace
    for col, cap, opt in (("prompt_tokens", max_prompt_tokens, "--max-prompt-tokens"),
                          ("output_tokens", max_output_tokens, "--max-output-tokens")):
        if cap is None:
            continue
        if int(cap) != cap or cap < 1:
            raise ConfigError(f"{opt} must be an integer >= 1, got {cap!r}")
        x = getattr(out, col)
        n = int((x > cap).sum())
        out = _with(out, f"capped {col} at {int(cap)} for {n} of {len(x)} request(s)",
                    **{col: np.minimum(x, int(cap)).astype(np.int64)})
    return out


def filter_classes(trace: Trace, classes) -> Trace:
    """Requests whose acceptance class is in ``classes``."""
    want = {str(c) for c in classes}
    keep = np.flatnonzero(np.isin(trace.acceptance_class.astype(str), list(want)))
    if keep.size == 0:
        have = sorted({str(c) for c in trace.acceptance_class})
        raise ConfigError(f"--only-class {','.join(sorted(want))}: no request has that class "
                          f"(the trace has: {', '.join(have)})")
    return _subset(trace, keep, f"kept {keep.size} of {len(trace)} requests of class(es) {','.join(sorted(want))}")


def set_classes(trace: Trace, spec: str, *, seed: int = 0) -> Trace:
    """Set acceptance classes from a mixture/name/mapping spec, using stream ``"classes"``."""
    from simspec.rng import stream
    from simspec.traces.synthetic import assign_classes, describe_classes, parse_classes

    cs = parse_classes(spec)
    acc = assign_classes(cs, stream(seed, "classes"), len(trace), trace.acceptance_class)
    return _with(trace, f"acceptance classes set to {describe_classes(cs)} (seed {seed})", acceptance_class=acc)


def apply_transforms(trace: Trace, *, seed: int = 0, window=None, only_class=(), first=None, rate=None,
                     rate_scale=None, max_prompt_tokens=None, max_output_tokens=None,
                     relabel_classes: str | None = None, burstiness: float | None = None) -> Trace:
    """Apply the transform options in the documented order; options left at None/empty do nothing."""
    if rate is not None and rate_scale is not None:
        raise ConfigError("give --rate or --rate-scale, not both")
    check_burstiness(burstiness, rate)
    t = trace
    if window is not None:
        s, e = parse_window(window) if isinstance(window, str) else window
        t = time_window(t, s, e)
    if only_class:
        t = filter_classes(t, only_class)
    if first is not None:
        t = first_n(t, first)
    if burstiness is not None:
        t = burst_arrivals(t, rate=rate, burstiness=burstiness, seed=seed)
    elif rate is not None or rate_scale is not None:
        t = rescale_rate(t, rate=rate, scale=rate_scale)
    if max_prompt_tokens is not None or max_output_tokens is not None:
        t = cap_lengths(t, max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens)
    if relabel_classes:
        t = set_classes(t, relabel_classes, seed=seed)
    return t


def load_and_transform(path: str | Path, fmt: str | None = None, *, seed: int = 0, **transforms) -> Trace:
    """Load any trace and apply ``transforms``. A length-only table gets Poisson arrivals at
    ``rate`` req/s (seeded) instead of a rescale; without ``rate`` it is refused."""
    from simspec.traces.formats import LENGTH_FORMATS, detect_format, length_table_refusal, load_trace
    from simspec.traces.synthetic import PoissonArrivals

    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt in LENGTH_FORMATS:
        rate = transforms.get("rate")
        if rate is None:
            raise ConfigError(length_table_refusal(path))
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate must be a finite number > 0, got {rate!r}")
        burstiness = transforms.get("burstiness")
        check_burstiness(burstiness, rate)
        trace = load_trace(path, fmt, arrivals=PoissonArrivals(float(rate)), seed=seed)
        if burstiness is not None:
            trace = burst_arrivals(trace, rate=float(rate), burstiness=float(burstiness), seed=seed)
        transforms = {**transforms, "rate": None, "burstiness": None}
    else:
        trace = load_trace(path, fmt)
    return apply_transforms(trace, seed=seed, **transforms)


def transform_options(fn):
    """Click decorator adding the transform options; the command receives them as one ``transforms``
    dict keyword argument, ready for ``apply_transforms(trace, **transforms)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        transforms = {k: kwargs.pop(k) for k in TRANSFORM_KEYS}
        transforms["only_class"] = tuple(transforms["only_class"] or ())
        return fn(*args, transforms=transforms, **kwargs)

    wrapper.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    options = [
        click.option("--rate", "--request-rate", "rate", type=float, default=None, metavar="R",
                     help="Rescale arrival times to a mean rate of R req/s (a length-only table gets "
                          "Poisson arrivals at R). --request-rate is vLLM's name for it."),
        click.option("--burstiness", type=float, default=None, metavar="B",
                     help="With --rate R: replace the arrival times by Gamma arrivals of shape B at R req/s "
                          "(CV 1/sqrt(B); 1 = Poisson), as `vllm bench serve --burstiness`; seeded by --seed."),
        click.option("--rate-scale", type=float, default=None, metavar="X",
                     help="Multiply the arrival rate by X (arrival times divided by X)."),
        click.option("--window", default=None, metavar="START:END",
                     help="Keep requests arriving in [START, END) s, shifted to start at 0."),
        click.option("--first", type=int, default=None, metavar="N", help="Keep the first N requests."),
        click.option("--max-prompt-tokens", type=int, default=None, metavar="N",
                     help="Clip prompt lengths to at most N tokens."),
        click.option("--max-output-tokens", type=int, default=None, metavar="N",
                     help="Clip output lengths to at most N tokens."),
        click.option("--only-class", multiple=True, metavar="NAME",
                     help="Keep requests of this acceptance class (repeatable)."),
        click.option("--relabel-classes", default=None, metavar="SPEC",
                     help="Set acceptance classes: NAME, a mixture code:0.3,chat:0.7, or map:SRC=DST,...,*=DST."),
    ]
    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


def format_option(fn):
    """Click decorator adding ``--format F`` (passed as ``fmt``; auto-detected when omitted)."""
    from simspec.traces.formats import FORMATS

    return click.option("--format", "fmt", default=None, metavar="F",
                        help=f"Trace format (default: detect). One of: {', '.join(sorted(FORMATS))}.")(fn)
