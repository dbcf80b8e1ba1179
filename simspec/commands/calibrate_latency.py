"""``simspec calibrate latency``: time a real model's stages on this machine and write (or update)
a measured profile. torch and transformers are imported only when the command runs."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from simspec.errors import SimspecError

DTYPES = ("bf16", "fp16", "fp32")


def _check_options(dtype: str, device: str, grid: str, threads: int | None, out: str) -> None:
    """Refuse bad options before anything heavy is imported (one-line errors)."""
    if dtype not in DTYPES:
        raise SimspecError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise SimspecError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if threads is not None and threads < 1:
        raise SimspecError(f"--threads {threads}: must be >= 1")
    p = Path(out)
    if p.exists() and p.is_dir():
        raise SimspecError(f"--out {out}: is a directory; give a .json file path")
    if p.suffix.lower() != ".json":
        raise SimspecError(f"--out {out}: a profile is a .json file")
    from simspec.atomic import check_output_file

    check_output_file(p, force=True)  # a location that cannot be written is found before measuring
    from simspec.calibrate.grids import GRID_NAMES

    if grid not in GRID_NAMES and not Path(grid).is_file():
        raise SimspecError(f"--grid {grid!r}: expected {', '.join(GRID_NAMES)} or an existing JSON/YAML file")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _scheduler() -> str | None:
    """The process's CPU scheduling policy (SCHED_OTHER, SCHED_FIFO, ...), where the OS says."""
    if not hasattr(os, "sched_getscheduler"):
        return None
    pol = os.sched_getscheduler(0)
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                         "SCHED_IDLE") if hasattr(os, n)}
    return names.get(pol, str(pol))


@click.command("latency")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Target model: the bundled smollm2-135m, a local HF checkpoint directory, or a HF id.")
@click.option("--draft", "draft_spec", default=None,
              help="Draft model (same forms as --model); adds the draft_step stage.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="bf16", show_default=True, help="bf16, fp16 or fp32.")
@click.option("--config", "config_spec", default=None, metavar="NAME|CONFIG.json",
              help="Build the target from a model config instead of --model: a bundled config name "
                   "(llama-2-7b, llama-3-8b, ... in simspec/data/models/), a config.json or a directory "
                   "holding one. Needs --random-weights.")
@click.option("--random-weights", is_flag=True,
              help="With --config: random weights in --dtype, built on --device (no network, no weight "
                   "files, no tokenizer; latency does not depend on the values).")
@click.option("--cuda-graphs", is_flag=True,
              help="CUDA only: time replays of captured CUDA graphs instead of eager calls (an engine "
                   "that launches steps from graphs); a stage that cannot be captured falls back to eager.")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
              help="Skip shapes with batch x tokens per request above this (not serving shapes); the "
                   "grid nodes are filled from the linear fit and listed in the profile.")
@click.option("--stages", "stages_csv", default=None, metavar="S1,S2,...",
              help="Measure only these stages (embed, layer, lm_head, adapter, draft_step) "
                   "[default: all that apply].")
@click.option("--max-wall-s", type=click.FloatRange(min=1), default=None,
              help="Stop measuring after this many seconds; remaining points are skipped and listed.")
@click.option("--grid", "grid_spec", default="quick", show_default=True,
              help="tiny (tests), quick (minutes on a CPU), full (GPU), serving (GPU: batch to 256, "
                   "tokens to 8192, context to 8192), h200-8min (the prepared GPU run), or a JSON/YAML file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Profile to write; an existing profile is updated (its acceptance section is kept).")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads on CPU [default: all CPUs this process may use].")
@click.option("--name", default=None, help="meta.name [default: the --out file stem].")
@click.option("--description", default=None, help="meta.description.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def latency(model_spec: str, draft_spec: str | None, device: str, dtype: str, grid_spec: str, out: str,
            threads: int | None, name: str | None, description: str | None, progress: bool,
            config_spec: str | None = None, random_weights: bool = False, cuda_graphs: bool = False,
            max_batched_tokens: int | None = None, max_wall_s: float | None = None,
            stages_csv: str | None = None) -> None:
    """Time one decoder layer, the LM head, the embedding, a Kangaroo-style adapter and (with
    --draft) the draft model's decode step over a grid of batch size x tokens per request x context
    length; fit per-stage latency models, score them on held-out shapes, and write the profile.

    Example: simspec calibrate latency --model smollm2-135m --device cpu --dtype bf16 --grid quick
    --out my-cpu.json
    """
    _check_options(dtype, device, grid_spec, threads, out)
    if random_weights and not config_spec:
        raise SimspecError("--random-weights: give the model's --config (a bundled name or a config.json)")
    if config_spec and not random_weights:
        raise SimspecError("--config: only with --random-weights (to load real weights use --model DIR)")
    if cuda_graphs and not device.startswith("cuda"):
        raise SimspecError("--cuda-graphs: needs --device cuda")
    stages = [x.strip() for x in stages_csv.split(",") if x.strip()] if stages_csv else None
    known = ("embed", "layer", "lm_head", "adapter", "draft_step")
    if stages is not None and (not stages or any(x not in known for x in stages)):
        raise SimspecError(f"--stages {stages_csv!r}: expected a comma-separated subset of {', '.join(known)}")
    if config_spec:
        from simspec.calibrate.models import resolve_config_path

        resolve_config_path(config_spec)  # a one-line error before torch is imported
    from simspec.calibrate.latency import calibrate_latency, load_grid
    from simspec.calibrate.models import check_device, load_model, random_model
    from simspec.calibrate.profile_io import read_profile_doc, update_profile

    out_path = Path(out)
    existing = read_profile_doc(out_path)  # refuse a non-profile file before measuring for minutes
    grid = load_grid(grid_spec)
    check_device(device)
    load_before = _loadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device == "cpu" and load_before and load_before[0] > 0.5 * cpus and _scheduler() in ("SCHED_OTHER", None):
        click.echo(f"simspec: warning: load average {load_before[0]} on {cpus} CPU(s): other processes "
                   "will distort the timings", err=True)
    if not progress:
        from simspec.calibrate.models import silence_progress_bars

        silence_progress_bars()
    target = random_model(config_spec, dtype, device) if config_spec else load_model(model_spec, dtype, device)
    draft = load_model(draft_spec, dtype, device) if draft_spec else None
    result = calibrate_latency(target, grid, draft=draft, threads=threads, progress=progress,
                               cuda_graphs=cuda_graphs, max_batched_tokens=max_batched_tokens,
                               max_wall_s=max_wall_s, stages=stages)

    meta = dict(result.meta)
    meta["name"] = name or out_path.stem
    meta["description"] = description or (
        f"Measured on {meta['device']} ({meta['dtype']}, {grid.name} grid): {target.model_id}"
        + (f" with draft {draft.model_id}" if draft else ""))
    meta["provenance"] = "simspec calibrate latency " + " ".join(shlex.quote(a) for a in sys.argv[3:]) \
        if len(sys.argv) > 2 and sys.argv[1:3] == ["calibrate", "latency"] else "simspec calibrate latency"
    meta["loadavg"] = {"before": load_before, "after": _loadavg(), "cpus": cpus,
                       "niceness": os.nice(0) if hasattr(os, "nice") else None,
                       "scheduler": _scheduler()}
    if existing is not None:
        old_target = existing.get("models", {}).get("target", {}).get("name")
        if existing.get("acceptance") and old_target and old_target != target.model_id:
            click.echo(f"simspec: warning: {out}: keeping its acceptance section, which was measured "
                       f"for {old_target}, not {target.model_id}", err=True)
    # models.draft from an earlier run (or from acceptance calibration) is kept when no --draft.
    doc = update_profile(out_path, latency=result.latency, models=result.models, meta_updates=meta,
                         capacity=result.capacity)
    stages = doc["latency"]["stages"]
    lc = meta["latency_calibration"]
    click.echo(f"wrote {out_path} ({', '.join(stages)}; {lc['wall_time_s']} s; mode {lc['mode'].split(' ')[0]}; "
               f"{lc['points_measured']} points measured, {lc['skipped']['n']} skipped)")
    for stage_name, why in lc.get("cuda_graphs_failed", {}).items():
        click.echo(f"  note: {stage_name}: CUDA graph capture failed, measured eager ({why})")
    for sname, sdoc in stages.items():
        fit = sdoc.get("fit", {})
        click.echo(f"  {sname:<10} {sdoc['kind']:<6} held-out error {fit.get('heldout_mape_pct')}% "
                   f"(n_train {fit.get('n_train')}, n_heldout {fit.get('n_heldout')})")
