"""``simspec profile show`` and ``simspec profile diff``: read profiles (bundled names or paths) and
print them. Standard library + click only: never imports torch."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import click

from simspec.errors import SimspecError
from simspec.profile import Profile, alpha_mean, load_profile
from simspec.simulator.latency_models import compile_stage

# (label, B, tokens per request, context tokens per request): the shapes `diff` and `show` evaluate.
STANDARD_SHAPES: list[tuple[str, int, int, int]] = [
    ("decode B=1 C=128", 1, 1, 128),
    ("decode B=1 C=1024", 1, 1, 1024),
    ("decode B=8 C=512", 8, 1, 512),
    ("decode B=32 C=1024", 32, 1, 1024),
    ("verify k=4 B=1 C=512", 1, 5, 512),
    ("verify k=4 B=8 C=512", 8, 5, 512),
    ("verify k=8 B=1 C=512", 1, 9, 512),
    ("prefill 128 B=1", 1, 128, 0),
    ("prefill 512 B=4", 4, 512, 0),
]


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def step_fn(p: Profile) -> Callable[[float, float, float], float] | None:
    """One full target forward (ms, without overhead): ``target_step``, or
    ``embed + num_layers * layer + lm_head`` for layer-level profiles."""
    stages = p.stages
    if "target_step" in stages:
        return compile_stage(stages["target_step"], stages, name="target_step")
    n_layers = p.models.get("target", {}).get("num_layers")
    if "layer" not in stages or "lm_head" not in stages or not n_layers:
        return None
    layer = compile_stage(stages["layer"], stages, name="layer")
    head = compile_stage(stages["lm_head"], stages, name="lm_head")
    embed = compile_stage(stages["embed"], stages, name="embed") if "embed" in stages else None
    n = int(n_layers)

    def step(b: float, bt: float, kv: float) -> float:
        ms = n * layer(b, bt, kv) + head(b, bt, kv)
        return ms + embed(b, bt, kv) if embed else ms

    return step


def _stage_line(doc: dict[str, Any]) -> str:
    kind = doc.get("kind")
    if kind == "linear":
        c = doc["coef"]
        terms = ", ".join(f"{k}={c[k]:.6g}" for k in ("c0", "c_b", "c_t", "c_kv", "c_spec") if k in c)
        return f"linear ({terms})"
    if kind == "scaled":
        return f"scaled ({doc['factor']:g} x {doc['of']})"
    ax = doc["axes"]
    return (f"grid {len(ax['batch_size'])}x{len(ax['tokens_per_request'])}x{len(ax['context_tokens'])} "
            f"(B {_axis(ax['batch_size'])}; tokens/request {_axis(ax['tokens_per_request'])}; "
            f"context {_axis(ax['context_tokens'])})")


def _axis(vals: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in vals)


def _fit_line(fit: dict[str, Any] | None) -> str:
    if not fit:
        return "fit: (none recorded)"
    err = fit.get("heldout_mape_pct")
    parts = [f"held-out error {err}%" if err is not None else "held-out error: not reported"]
    if fit.get("heldout_max_ape_pct") is not None:
        parts.append(f"max {fit['heldout_max_ape_pct']}%")
    for k in ("n_train", "n_heldout"):
        if k in fit:
            parts.append(f"{k} {fit[k]}")
    if fit.get("note"):
        parts.append(str(fit["note"]))
    return "fit: " + ", ".join(parts)


def _valid_line(valid: dict[str, Any] | None) -> str | None:
    if not valid:
        return None
    return "valid: " + "; ".join(f"{k} {v[0]}..{v[1]}" if isinstance(v, list) and len(v) == 2 else f"{k} {v}"
                                 for k, v in valid.items())


def _load(name: str) -> Profile:
    return load_profile(name)


@click.command("show")
@click.argument("profile_name", metavar="FILE_OR_NAME")
@click.option("--samples", "samples_opt", default="4", show_default=True, metavar="N|all",
              help="Raw sample points to print per stage (all: every measured and held-out point).")
@click.option("--stage", "only_stage", default=None, help="Print only this latency stage.")
@click.option("--at", "at_shapes", multiple=True, metavar="B,T,C",
              help="Also evaluate each stage at these shapes (batch, tokens per request, context per "
                   "request). Repeatable.")
def show(profile_name: str, samples_opt: str, only_stage: str | None, at_shapes: tuple[str, ...]) -> None:
    """Print a profile: meta (source first), models, capacity, every latency stage (kind, fit
    error, valid ranges, sample points, values at standard shapes) and the acceptance classes."""
    if samples_opt == "all":
        n_samples = -1
    else:
        try:
            n_samples = int(samples_opt)
        except ValueError:
            raise SimspecError(f"--samples {samples_opt!r}: expected a number or 'all'") from None
    extra = [_parse_shape(s) for s in at_shapes]
    p = _load(profile_name)
    if only_stage is not None and only_stage not in p.stages:
        raise SimspecError(f"--stage {only_stage!r}: profile {p.name} has stages {', '.join(p.stages)}")
    meta = p.meta
    echo = click.echo
    echo(f"profile {p.name}  ({p.path})")
    echo(f"  source       {str(p.source).upper()}")
    for key in ("description", "device", "dtype", "threads", "date"):
        if meta.get(key) is not None:
            echo(f"  {key:<12} {meta[key]}")
    if meta.get("versions"):
        echo("  versions     " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())))
    if meta.get("model_ids"):
        echo("  model ids    " + ", ".join(f"{k}: {v}" for k, v in meta["model_ids"].items()))
    cal = meta.get("latency_calibration") or {}
    if cal:
        echo(f"  calibration  {cal.get('wall_time_s')} s wall, {cal.get('points_measured')} points, "
             f"timer {cal.get('timer')}")
    if meta.get("grid"):
        g = meta["grid"]
        echo(f"  grid         {g.get('name')}: B {_axis(g.get('batch_sizes', []))}; tokens/request "
             f"{_axis(g.get('tokens_per_request', []))}; context {_axis(g.get('context_tokens', []))}; "
             f"{len(g.get('heldout', []))} held-out shapes")
    comp = meta.get("composition_check")
    if comp:
        echo(f"  composed vs whole forward: error {comp.get('mape_pct')}% (max {comp.get('max_ape_pct')}%) "
             f"over {len(comp.get('points', []))} shapes")
    if meta.get("provenance"):
        echo(f"  provenance   {meta['provenance']}")
    echo(f"  sha256       {p.sha256}")

    echo("models")
    for role, m in p.models.items():
        keys = ("name", "num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "params", "kv_bytes_per_token", "dtype")
        echo(f"  {role}: " + ", ".join(f"{k}={m[k]}" for k in keys if k in m))
    echo("capacity")
    echo("  " + (", ".join(f"{k}={v}" for k, v in p.capacity.items()) or "(none)"))
    if meta.get("capacity_note"):
        echo(f"  ({meta['capacity_note']})")

    ov = p.overhead
    echo(f"latency (ms; overhead fraction {ov['fraction']:g}, fixed {ov['fixed_ms']:g} ms)")
    fo = p.forward_overhead
    if any(fo.values()):
        src = (p.doc["latency"].get("forward_overhead") or {}).get("source")
        echo(f"  per-forward overhead (ms): target {fo['target']:g}, draft {fo['draft']:g}, "
             f"early exit {fo['early_exit']:g}" + (f" ({src})" if src else ""))
    stages = p.stages
    for name, doc in stages.items():
        if only_stage is not None and name != only_stage:
            continue
        echo(f"  {name}: {_stage_line(doc)}")
        if doc.get("measures"):
            echo(f"      measures: {doc['measures']}")
        echo(f"      {_fit_line(doc.get('fit'))}")
        v = _valid_line(doc.get("valid"))
        if v:
            echo(f"      {v}")
        samples = doc.get("samples") or []
        if samples and n_samples < 0:
            echo("      measured points (B, batched_tokens, kv_tokens -> median ms, spread ms):")
            for label, rows in (("grid", samples), ("held-out", doc.get("heldout_samples") or [])):
                for srow in rows:
                    echo(f"        {label:<8} {int(srow[0]):>4} {int(srow[1]):>6} {int(srow[2]):>7}  "
                         f"{_fmt_ms(float(srow[3])):>9}" + (f"  ±{_fmt_ms(float(srow[4]))}" if len(srow) > 4 else ""))
        elif samples and n_samples > 0:
            pick = samples if len(samples) <= n_samples else \
                [samples[round(i * (len(samples) - 1) / (n_samples - 1))] for i in range(n_samples)] \
                if n_samples > 1 else samples[:1]
            echo(f"      samples ({len(samples)}; B, batched_tokens, kv_tokens -> ms): " +
                 "; ".join(f"{int(s[0])},{int(s[1])},{int(s[2])} -> {_fmt_ms(float(s[3]))}"
                           + (f" ±{_fmt_ms(float(s[4]))}" if len(s) > 4 else "") for s in pick))
        fn = compile_stage(doc, stages, name=name)
        echo("      at: " + "; ".join(f"{label}: {_fmt_ms(fn(b, b * t, b * c))}"
                                      for label, b, t, c in STANDARD_SHAPES[:3] + STANDARD_SHAPES[4:5]))
        for label, b, t, c in extra:
            echo(f"      at {label}: {_fmt_ms(fn(b, b * t, b * c))} ms")
    step = step_fn(p)
    if step is not None and "target_step" not in stages and only_stage is None:
        echo("  target step (composed: embed + num_layers x layer + lm_head): " +
             "; ".join(f"{label}: {_fmt_ms(step(b, b * t, b * c))}"
                       for label, b, t, c in STANDARD_SHAPES[:3] + STANDARD_SHAPES[4:5]))

    if only_stage is not None:
        return
    echo("acceptance")
    if not p.acceptance:
        echo("  (none: run `simspec calibrate acceptance --out FILE` to add it)")
    for method, classes in p.acceptance.items():
        for cls, entry in classes.items():
            parts = [f"mean alpha {alpha_mean(entry['alpha']):.3f} ({entry['alpha']['kind']})"]
            if "mean_tokens_per_step" in entry:
                parts.append(f"mean tokens/step {entry['mean_tokens_per_step']:.3f}")
            pc = entry.get("position_conditional")
            if pc:
                shown = ", ".join(f"{x:.2f}" for x in pc[:6]) + (", ..." if len(pc) > 6 else "")
                parts.append(f"position_conditional [{shown}]")
            for k in ("n_requests", "n_tokens"):
                if k in entry:
                    parts.append(f"{k} {entry[k]}")
            if "confidence" in entry:
                parts.append("confidence bins")
            if "draft_vs_inter" in entry:
                parts.append(f"draft_vs_inter mean alpha {alpha_mean(entry['draft_vs_inter']['alpha']):.3f}")
            echo(f"  {method}/{cls}: " + ", ".join(parts))


def _parse_shape(text: str) -> tuple[str, int, int, int]:
    try:
        b, t, c = (int(x) for x in text.split(","))
    except ValueError:
        raise SimspecError(f"--shape {text!r}: expected B,T,C (batch, tokens per request, context per request)") from None
    if b < 1 or t < 1 or c < 0:
        raise SimspecError(f"--shape {text!r}: need B >= 1, T >= 1, C >= 0")
    return (f"B={b} T={t} C={c}", b, t, c)


_META_SKIP = {"model_configs", "grid", "description", "provenance", "composition_check"}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = d
    return out


@click.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--shape", "shapes", multiple=True, metavar="B,T,C",
              help="Evaluate at these shapes (batch, tokens per request, context per request) instead "
                   "of the standard set. Repeatable.")
def diff(a: str, b: str, shapes: tuple[str, ...]) -> None:
    """Compare two profiles: every stage both have (and the full target step), evaluated at a
    standard set of shapes, with the ratio B/A; then the meta, model and capacity differences."""
    pa, pb = _load(a), _load(b)
    echo = click.echo
    echo(f"A: {pa.name} ({pa.source}, {pa.meta.get('device', '?')}, {pa.meta.get('dtype', '?')})")
    echo(f"B: {pb.name} ({pb.source}, {pb.meta.get('device', '?')}, {pb.meta.get('dtype', '?')})")
    pts = [_parse_shape(s) for s in shapes] if shapes else STANDARD_SHAPES
    fns: list[tuple[str, Callable | None, Callable | None]] = []
    for name in list(dict.fromkeys(list(pa.stages) + list(pb.stages))):
        fa = compile_stage(pa.stages[name], pa.stages, name=name) if name in pa.stages else None
        fb = compile_stage(pb.stages[name], pb.stages, name=name) if name in pb.stages else None
        fns.append((name, fa, fb))
    if not ("target_step" in pa.stages and "target_step" in pb.stages):
        fns.append(("target step (composed)", step_fn(pa), step_fn(pb)))
    lw = max(len(p[0]) for p in pts)
    for name, fa, fb in fns:
        if fa is None or fb is None:
            echo(f"\n{name}: only in {'A' if fa else 'B'}")
            continue
        echo(f"\n{name} (ms)")
        echo(f"  {'shape':<{lw}}  {'A':>10}  {'B':>10}  {'B/A':>7}")
        for label, bb, t, c in pts:
            va, vb = fa(bb, bb * t, bb * c), fb(bb, bb * t, bb * c)
            ratio = f"{vb / va:.3f}" if va > 0 else "-"
            echo(f"  {label:<{lw}}  {_fmt_ms(va):>10}  {_fmt_ms(vb):>10}  {ratio:>7}")
        for side, prof in (("A", pa), ("B", pb)):
            if name in prof.stages:
                err = (prof.stages[name].get("fit") or {}).get("heldout_mape_pct")
                if err is not None:
                    echo(f"  ({side} held-out error {err}%)")
    echo("\ndifferences (A -> B)")
    n = 0
    for section, da, db in (("meta", {k: v for k, v in pa.meta.items() if k not in _META_SKIP},
                             {k: v for k, v in pb.meta.items() if k not in _META_SKIP}),
                            ("models", pa.models, pb.models), ("capacity", pa.capacity, pb.capacity)):
        fa_, fb_ = _flat(da), _flat(db)
        for key in sorted(set(fa_) | set(fb_)):
            va, vb = fa_.get(key, "(absent)"), fb_.get(key, "(absent)")
            if va != vb:
                n += 1
                echo(f"  {section}.{key}: {json.dumps(va, default=str)} -> {json.dumps(vb, default=str)}")
    ma, mb = set(pa.acceptance), set(pb.acceptance)
    if ma != mb:
        n += 1
        echo(f"  acceptance methods: {sorted(ma)} -> {sorted(mb)}")
    if not n:
        echo("  (none)")
