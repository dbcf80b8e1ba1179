"""``simspec profile analytic``: build a roofline (analytic) profile from a GPU datasheet and a model
config — for users without the hardware. The result is marked ``source: analytic`` everywhere."""

from __future__ import annotations

from pathlib import Path

import click

from simspec.errors import ConfigError


@click.command("analytic")
@click.option("--gpu", required=True, type=click.Choice(["a100-80gb", "h100-sxm", "h200"]),
              help="GPU kind (datasheet peaks: A100 80GB SXM 312 TFLOP/s, 2.039 TB/s; H100 SXM 989 TFLOP/s, "
                   "3.35 TB/s; H200 989 TFLOP/s, 4.8 TB/s).")
@click.option("--model", "model_name", required=True, metavar="NAME|CONFIG.JSON",
              help="Target model: a bundled name (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, vicuna-7b, "
                   "llama-68m) or a Hugging Face config.json (or a directory holding one).")
@click.option("--draft", "draft_name", default=None, metavar="NAME|CONFIG.JSON",
              help="Draft model for `--spec draft` (adds a draft_step stage; runs on one GPU).")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel degree of the target (GPUs per replica).")
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16"]),
              help="Weight and KV-cache dtype.")
@click.option("--compute-efficiency", default=0.65, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Achievable share of the dense tensor-core peak.")
@click.option("--bandwidth-efficiency", default=0.80, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Achievable share of the HBM bandwidth peak.")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="capacity.max_batch_size (and the largest batch on the grid).")
@click.option("--name", default=None, help="meta.name [default: <model>-<gpu>[-tpN]-analytic].")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Profile JSON to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def analytic(gpu, model_name, draft_name, tp, dtype, compute_efficiency, bandwidth_efficiency, max_batch, name,
             out_path, force):
    """Write an ANALYTIC profile: per-layer roofline latencies (layer, lm_head, embed, adapter, and
    draft_step with --draft) as grids over batch size x tokens per request x context, KV capacity
    from memory minus weights, and simspec's documented default acceptance for draft, kangaroo and
    hispec. It is an estimate from datasheet figures, not a measurement (docs/methods.md)."""
    from simspec.analytic import Efficiency, build_profile, load_model_config
    from simspec.atomic import write_json
    from simspec.profile import profile_from_doc

    if Path(out_path).exists() and not force:
        raise ConfigError(f"--out: {out_path} already exists (use --force to replace it)")
    model = load_model_config(model_name)
    draft = load_model_config(draft_name) if draft_name else None
    eff = Efficiency(compute=compute_efficiency, bandwidth=bandwidth_efficiency)
    doc = build_profile(gpu, model, draft=draft, tp=tp, dtype=dtype, eff=eff, name=name, max_batch=max_batch)
    profile_from_doc(doc, out_path)  # validate before writing
    write_json(out_path, doc)
    cap = doc["capacity"]
    click.echo(f"wrote {out_path}: {doc['meta']['description']} KV budget {cap['kv_budget_tokens']:,} tokens, "
               f"max batch {cap['max_batch_size']}. [source: analytic]")
