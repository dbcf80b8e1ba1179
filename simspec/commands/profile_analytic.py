"""``simspec profile analytic``: build a roofline (analytic) profile from a GPU datasheet and a model
config — for users without the hardware. The result is marked ``source: analytic`` everywhere."""

from __future__ import annotations

import json
from importlib import resources

import click

from simspec.errors import ConfigError


def _gpu_names() -> list[str]:
    doc = json.loads((resources.files("simspec") / "data" / "gpus.json").read_text(encoding="utf-8"))
    return list(doc["gpus"])


@click.command("analytic")
@click.option("--gpu", default=None, type=click.Choice(_gpu_names()),
              help="GPU kind from the bundled datasheet table (simspec/data/gpus.json: dense fp16/bf16/fp8 peaks, "
                   "memory bandwidth and size, interconnect, each with its vendor source).")
@click.option("--gpu-spec", "gpu_spec", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Any other GPU: a JSON object with the fields of one gpus.json entry (name, class, "
                   "peak_tflops_fp16, peak_tflops_bf16, peak_tflops_fp8, memory_bandwidth_tb_s, memory_gib, "
                   "interconnect_gb_s).")
@click.option("--model", "model_name", required=True, metavar="NAME|CONFIG.JSON",
              help="Target model: a bundled name (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, vicuna-7b, "
                   "llama-68m) or a Hugging Face config.json (or a directory holding one).")
@click.option("--draft", "draft_name", default=None, metavar="NAME|CONFIG.JSON",
              help="Draft model for `--spec draft` (adds a draft_step stage on the target's GPUs).")
@click.option("--eagle", "eagle_head", default=None, metavar="NAME|CONFIG.JSON",
              help="EAGLE head config (e.g. bundled eagle-vicuna-7b-v1.3): adds the eagle_head stage.")
@click.option("--eagle3", "eagle3_head", default=None, metavar="NAME|CONFIG.JSON",
              help="EAGLE-3 head config (e.g. bundled eagle3-llama3.1-8b; draft_vocab_size read): adds eagle3_head.")
@click.option("--medusa", "medusa_head", default=None, metavar="NAME|CONFIG.JSON",
              help="Medusa config with medusa_num_heads (e.g. bundled medusa-vicuna-7b-v1.3): adds medusa_heads.")
@click.option("--mtp", "mtp_head", is_flag=True,
              help="Add the mtp_head stage: one MTP module (a target decoder layer + eh_proj + shared head).")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel degree of the target (GPUs per replica).")
@click.option("--draft-tp", "draft_tp", default=None, type=click.IntRange(min=1), metavar="N",
              help="GPUs (of the target's) the draft is split over [default: the target's --tp].")
@click.option("--draft-parallel", "draft_parallel", default="tensor", show_default=True,
              type=click.Choice(["tensor", "pipeline"]),
              help="How the draft uses its --draft-tp GPUs: tensor parallel (all-reduces) or pipeline "
                   "(consecutive layer slices, one hop between GPUs).")
@click.option("--engine", default="cuda-graph", show_default=True, type=click.Choice(["cuda-graph", "eager"]),
              help="How the stack issues a forward: cuda-graph (a serving engine such as vLLM: fused kernels, one "
                   "graph replay) or eager (PyTorch + Hugging Face generate: ~36 kernels per layer issued from "
                   "Python). Sets kernels per layer, launch costs and the per-forward overhead (docs/methods.md).")
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp8"]),
              help="Weight and KV-cache dtype (fp8: the GPU's fp8 tensor peak, 1 byte per element).")
@click.option("--compute-efficiency", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Achievable share of the dense tensor-core peak [default: the GPU class's, gpus.json].")
@click.option("--bandwidth-efficiency", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Achievable share of the memory bandwidth peak [default: the GPU class's].")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="capacity.max_batch_size (and the largest batch on the grid).")
@click.option("--name", default=None, help="meta.name [default: <model>-<gpu>[-tpN][-eager]-analytic].")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Profile JSON to write (required unless --explain).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--explain", is_flag=True,
              help="Print the per-operator breakdown of one decode step (and, with --draft, of a speculative "
                   "step at --k) at --batch and --context.")
@click.option("--batch", "explain_batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="--explain: requests in the step.")
@click.option("--context", "explain_context", default=512, show_default=True, type=click.IntRange(min=0),
              help="--explain: cached tokens per request.")
@click.option("--k", "explain_k", default=4, show_default=True, type=click.IntRange(min=0),
              help="--explain: drafts per request in the speculative step.")
def analytic(gpu, gpu_spec, model_name, draft_name, eagle_head, eagle3_head, medusa_head, mtp_head, tp, draft_tp, draft_parallel, engine, dtype, compute_efficiency,
             bandwidth_efficiency, max_batch, name, out_path, force, explain, explain_batch, explain_context,
             explain_k):
    """Write an ANALYTIC profile: per-layer roofline latencies (layer, lm_head, embed, adapter, and
    draft_step with --draft) as grids over batch size x tokens per request x context, the engine's
    per-forward overhead, KV capacity from memory minus weights, and simspec's documented default
    acceptance for draft, kangaroo and hispec. It is an estimate from datasheet figures, not a
    measurement (docs/methods.md)."""
    from simspec.analytic import (Efficiency, Roofline, build_profile, check_placement, explain as explain_lines,
                                  load_gpu_spec, load_model_config, resolve_gpu)
    from simspec.atomic import check_output_file, write_json
    from simspec.profile import profile_from_doc

    if (gpu is None) == (gpu_spec is None):
        raise ConfigError("give one of --gpu NAME or --gpu-spec FILE")
    if out_path is None and not explain:
        raise ConfigError("--out: required (or --explain to print a breakdown only)")
    if out_path is not None:  # before any work: --force replaces only a file simspec wrote (a profile)
        check_output_file(out_path, force=force, simspec_json=True)
    spec = load_gpu_spec(gpu_spec) if gpu_spec else resolve_gpu(gpu)
    model = load_model_config(model_name)
    draft = load_model_config(draft_name) if draft_name else None
    eff = Efficiency.for_gpu(spec, compute=compute_efficiency, bandwidth=bandwidth_efficiency)
    if explain:
        dtp = check_placement(model, draft, tp, draft_tp, draft_parallel)
        rf = Roofline(spec, dtype, tp, eff, engine)
        for line in explain_lines(rf, model, draft=draft, batch=explain_batch, context=explain_context,
                                  k=explain_k, draft_tp=dtp, pipeline=draft_parallel == "pipeline"):
            click.echo(line)
        if out_path is None:
            return
    from simspec.analytic_heads import load_head

    heads = [load_head(kind, value, model) for kind, value in (("eagle", eagle_head), ("eagle3", eagle3_head),
                                                                ("medusa", medusa_head), ("mtp", mtp_head or None))
             if value]
    doc = build_profile(spec, model, draft=draft, tp=tp, dtype=dtype, eff=eff, name=name, max_batch=max_batch,
                        engine=engine, draft_tp=draft_tp, draft_parallel=draft_parallel, heads=heads)
    profile_from_doc(doc, out_path)  # validate before writing
    write_json(out_path, doc)
    cap = doc["capacity"]
    click.echo(f"wrote {out_path}: {doc['meta']['description']} KV budget {cap['kv_budget_tokens']:,} tokens, "
               f"max batch {cap['max_batch_size']}. [source: analytic]")
