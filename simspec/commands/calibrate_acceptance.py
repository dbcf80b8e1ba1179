"""``simspec calibrate acceptance | adapter | import-acceptance``: measure acceptance with real
speculative decoding, train early-exit adapters, import acceptance logs made elsewhere.

``acceptance`` and ``adapter`` import torch (inside the command); ``import-acceptance`` needs only
numpy/scipy. See ``docs/acceptance.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import click

from simspec.errors import SimspecError

PROMPTS_HELP = "Prompt JSONL (Spec-Bench question.jsonl format). Default: the bundled Spec-Bench prompts."


def _echo_table(method: str, section: dict[str, dict[str, Any]]) -> None:
    from simspec.calibrate.acceptance import summary_row

    click.echo(f"acceptance.{method}:")
    click.echo(f"  {'class':<15}{'tau':>7}{'accept':>8}{'drafts':>8}{'reqs':>6}{'steps':>7}"
               f"{'held pred':>10}{'held meas':>10}{'err%':>7}")
    for cls, entry in section.items():
        r = summary_row(entry)

        def f(x: Any, w: int, d: int = 3) -> str:
            return f"{x:>{w}.{d}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
        click.echo(f"  {cls:<15}{f(r['tau'], 7)}{f(r['accept_rate'], 8)}{f(r['drafts_per_step'], 8, 2)}"
                   f"{r['n_requests']:>6}{r['n_steps']:>7}{f(r['heldout_pred'], 10)}{f(r['heldout_meas'], 10)}"
                   f"{f(r['heldout_err_pct'], 7, 1)}")


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    from simspec import __version__

    out["simspec"] = __version__
    return out


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


# ------------------------------------------------------------------------------------ acceptance


@click.command("acceptance")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Target model: bundled name, local HF directory or hub id.")
@click.option("--method", type=click.Choice(["draft", "kangaroo", "hispec"]), required=True,
              help="Speculation method to measure: a draft model, Kangaroo (one early exit) or HiSpec (two exits).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Profile JSON to create or update (acceptance[method] is replaced).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None, help=PROMPTS_HELP)
@click.option("--limit-per-category", type=int, default=8, show_default=True,
              help="Prompts per acceptance class (MT-Bench's categories interleaved); 0 = all.")
@click.option("--category", "categories", multiple=True, help="Only these classes (repeatable).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Tokens generated per prompt (greedy; EOS ignored).")
@click.option("--max-prompt-tokens", type=int, default=1024, show_default=True,
              help="Cut longer prompt messages at the end so the prompt fits.")
@click.option("--heldout-share", type=float, default=0.25, show_default=True,
              help="Share of each class's prompts held out to test the fit (every 1/share-th prompt).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Model dtype.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu | cuda | cuda:N.")
@click.option("--draft", "draft_spec", default=None, help="draft: a separate draft model (same tokenizer).")
@click.option("--draft-layers", type=int, default=None,
              help="draft: use the target's first L layers + LM head as the draft (default N/6).")
@click.option("--k", type=int, default=4, show_default=True, help="draft: drafts per step.")
@click.option("--adapter", "adapter_dir", type=click.Path(file_okay=False), default=None,
              help="kangaroo/hispec: adapter directory from `simspec calibrate adapter` (default: "
                   "the bundled adapters for the bundled model, else the untrained logit lens).")
@click.option("--no-adapter", is_flag=True, help="kangaroo/hispec: use the untrained logit lens.")
@click.option("--exit", "exit_layer", type=int, default=None, help="kangaroo: exit layer ℓ (default: the adapter's, else N/16).")
@click.option("--gamma", type=int, default=6, show_default=True, help="kangaroo: most drafts per step.")
@click.option("--eta", type=float, default=0.6, show_default=True, help="kangaroo: confidence stop threshold.")
@click.option("--draft-exit", type=int, default=None, help="hispec: draft exit L_d (default: adapter's lower, else N/8).")
@click.option("--inter-exit", type=int, default=None, help="hispec: intermediate exit L_i (default: adapter's upper, else N/4).")
@click.option("--nd", type=int, default=2, show_default=True, help="hispec: drafts per inner round.")
@click.option("--ni", type=int, default=4, show_default=True, help="hispec: buffer size that triggers full verification.")
@click.option("--log-steps", type=click.Path(dir_okay=False), default=None,
              help="Also write every request's per-step log to this JSONL file.")
@click.option("--check-lossless", type=int, default=0, show_default=True,
              help="Compare the first N requests' tokens with plain greedy decoding and report mismatches.")
@click.option("--min-exposure", type=int, default=10, show_default=True,
              help="Keep a draft position in position_conditional only if offered this often.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (model-loading bars included).")
def acceptance(model_spec: str, method: str, out_path: str, prompts_path: str | None, limit_per_category: int,
               categories: tuple[str, ...], max_new_tokens: int, max_prompt_tokens: int, heldout_share: float,
               dtype: str, device: str, draft_spec: str | None, draft_layers: int | None, k: int,
               adapter_dir: str | None, no_adapter: bool, exit_layer: int | None, gamma: int, eta: float,
               draft_exit: int | None, inter_exit: int | None, nd: int, ni: int, log_steps: str | None,
               check_lossless: int, min_exposure: int, threads: int | None, quiet: bool) -> None:
    """Run real speculative decoding over a categorised prompt set and write per-class acceptance."""
    from simspec.calibrate import prompts as P
    from simspec.calibrate.acceptance import fit_section, from_run, split_heldout
    from simspec.calibrate.profile_io import update_profile

    if not 0.0 <= heldout_share < 1.0:
        raise SimspecError(f"--heldout-share {heldout_share}: must be in [0, 1)")
    if max_new_tokens < 2:
        raise SimspecError(f"--max-new-tokens {max_new_tokens}: must be >= 2")
    # before any measuring: an existing --out must be a profile (it is updated) and writable
    from simspec.atomic import check_output_file
    from simspec.calibrate.profile_io import read_profile_doc

    check_output_file(out_path, force=True)
    read_profile_doc(out_path)
    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    if quiet:
        from simspec.calibrate.models import silence_progress_bars

        silence_progress_bars()
    prompt_file = Path(prompts_path) if prompts_path else P.bundled_prompts_path()
    chosen = P.select(P.load_prompts(prompt_file), limit_per_category or None, 0, list(categories) or None)

    import torch

    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model
    from simspec.calibrate.runners import GreedyRunner

    _set_threads(threads)
    loaded = load_model(model_spec, dtype, device)
    lm = LayeredLM(loaded.model)
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    runner, settings = _make_runner(method, lm, loaded, model_spec, dtype, device, draft_spec, draft_layers, k,
                                    adapter_dir, no_adapter, exit_layer, gamma, eta, draft_exit, inter_exit,
                                    nd, ni, eos)
    settings.update({"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                     "prompts": prompt_file.name,
                     "limit_per_category": limit_per_category, "heldout_share": heldout_share,
                     "model": loaded.model_id, "dtype": dtype, "device": device,
                     "date": _dt.date.today().isoformat(), "versions": _versions(),
                     "class_map": "MT-Bench categories (writing, roleplay, reasoning, math, coding, extraction, "
                                  "stem, humanities) -> mt_bench; other categories keep their name"})
    greedy = GreedyRunner(lm, eos) if check_lossless else None
    fit_logs: dict[str, list[Any]] = {}
    held_logs: dict[str, list[Any]] = {}
    step_lines: list[str] = []
    mismatches = checked = 0
    n_total = sum(len(v) for v in chosen.values())
    t0 = time.perf_counter()
    done = 0
    for cls, plist in chosen.items():
        fit_p, held_p = split_heldout(plist, heldout_share)
        for part, dest in ((fit_p, fit_logs), (held_p, held_logs)):
            for pr in part:
                ids = P.encode(tok, pr.text, max_prompt_tokens)
                res = runner.generate(ids, max_new_tokens)
                dest.setdefault(cls, []).append(from_run(cls, res, pr.question_id))
                done += 1
                if greedy is not None and checked < check_lossless:
                    ref = greedy.generate(ids, max_new_tokens).tokens
                    checked += 1
                    if ref != res.tokens:
                        mismatches += 1
                        first = next((i for i, (a, b) in enumerate(zip(ref, res.tokens)) if a != b),
                                     min(len(ref), len(res.tokens)))
                        say(f"  lossless check: request {pr.question_id} differs from plain greedy at "
                            f"token {first} (floating-point tie?)")
                if log_steps:
                    step_lines.append(json.dumps({"question_id": pr.question_id, "category": pr.category,
                                                  "class": cls, "heldout": dest is held_logs,
                                                  "prompt_tokens": res.prompt_tokens, "tokens": res.tokens,
                                                  "prefill_ms": round(res.prefill_ms, 3),
                                                  "total_ms": round(res.total_ms, 3), "stop": res.stop,
                                                  "steps": [s.as_dict() for s in res.steps]}))
                steps = res.steps
                tau = (sum(s.accepted for s in steps) + len(steps)) / max(len(steps), 1)
                say(f"[{done}/{n_total} {time.perf_counter() - t0:6.0f}s] {method} {cls} q{pr.question_id}: "
                    f"{len(res.tokens)} tokens, {len(steps)} steps, {tau:.2f} tokens/step")
    if check_lossless:
        settings["lossless_check"] = {"requests": checked, "mismatches": mismatches}
    settings["measure_s"] = round(time.perf_counter() - t0, 1)
    settings["threads"] = torch.get_num_threads()
    section = fit_section(method, fit_logs, settings, held_logs, min_exposure)
    if log_steps:
        from simspec.atomic import write_text

        write_text(log_steps, "\n".join(step_lines) + "\n")
    update_profile(out_path, acceptance={method: section})
    if not quiet:
        _echo_table(method, section)
    click.echo(f"wrote acceptance.{method} ({len(section)} classes) to {out_path}")


def _make_runner(method: str, lm: Any, loaded: Any, model_spec: str, dtype: str, device: str,
                 draft_spec: str | None, draft_layers: int | None, k: int, adapter_dir: str | None,
                 no_adapter: bool, exit_layer: int | None, gamma: int, eta: float, draft_exit: int | None,
                 inter_exit: int | None, nd: int, ni: int, eos: int | None) -> tuple[Any, dict[str, Any]]:
    from simspec.calibrate.adapter import load_adapters, read_adapter_info
    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model
    from simspec.calibrate.runners import DraftRunner, HiSpecRunner, KangarooRunner

    n = lm.num_layers
    if method == "draft":
        if draft_spec and draft_layers:
            raise SimspecError("--draft and --draft-layers: give one of them")
        if draft_spec:
            d = load_model(draft_spec, dtype, device)
            return (DraftRunner(lm, k, draft=LayeredLM(d.model), eos_token_id=eos),
                    {"k": k, "draft_model": d.model_id, "draft_layers": LayeredLM(d.model).num_layers})
        L = draft_layers or max(1, round(n / 6))
        return DraftRunner(lm, k, draft_layers=L, eos_token_id=eos), {"k": k, "draft_model": f"target layers 0..{L - 1} + LM head",
                                                                     "draft_layers": L}
    if adapter_dir and no_adapter:
        raise SimspecError("--adapter and --no-adapter: give one of them")
    if not adapter_dir and not no_adapter:
        adapter_dir = _bundled_adapter_dir(model_spec)
    have: list[int] = []
    if adapter_dir:
        have = sorted(int(e) for e in read_adapter_info(adapter_dir)["exits"])
    if method == "kangaroo":
        ex = exit_layer if exit_layer is not None else (have[0] if have else max(1, round(n / 16)))
        ad = load_adapters(adapter_dir, lm, [ex])[ex] if adapter_dir else None
        s = {"exit": ex, "gamma": gamma, "eta": eta, "adapter": _adapter_label(adapter_dir)}
        return KangarooRunner(lm, ex, ad, gamma=gamma, eta=eta, eos_token_id=eos), s
    ld = draft_exit if draft_exit is not None else (have[-2] if len(have) >= 2 else max(1, round(n / 8)))
    li = inter_exit if inter_exit is not None else (have[-1] if len(have) >= 2 else max(2, round(n / 4)))
    ads: dict[int, Any] = {}
    if adapter_dir:
        ads = load_adapters(adapter_dir, lm, [e for e in (ld, li) if e in have])
    s = {"draft_exit": ld, "inter_exit": li, "nd": nd, "ni": ni, "adapter": _adapter_label(adapter_dir),
         "adapter_exits": sorted(ads)}
    return HiSpecRunner(lm, ld, li, ads, n_draft=nd, n_inter=ni, eos_token_id=eos), s


def _bundled_adapter_dir(model_spec: str) -> str | None:
    from importlib import resources

    d = Path(str(resources.files("simspec") / "data" / "adapters" / model_spec))
    return str(d) if (d / "adapter.json").is_file() else None


def _adapter_label(adapter_dir: str | None) -> str:
    if not adapter_dir:
        return "none (logit lens)"
    p = Path(adapter_dir)
    if "site-packages" in p.parts or (p.parent.name == "adapters" and p.parent.parent.name == "data"):
        return f"bundled:{p.name}"
    return str(p)


# ------------------------------------------------------------------------------------ adapter


@click.command("adapter")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Model: bundled name, local Hugging Face directory or hub id.")
@click.option("--exit", "exits", type=int, multiple=True, required=True,
              help="Exit layer to train an adapter for (repeat for HiSpec's two exits).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Adapter directory to write (adapter.json and one exit<L>.safetensors per exit).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None, help=PROMPTS_HELP)
@click.option("--train-per-category", type=int, default=6, show_default=True,
              help="Training prompts per class.")
@click.option("--heldout-per-category", type=int, default=1, show_default=True,
              help="Held-out prompts per class, for the before/after agreement report.")
@click.option("--skip-per-category", type=int, default=16, show_default=True,
              help="Skip each class's first prompts (those `calibrate acceptance` uses by default).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Greedy continuation length per prompt (the model's own outputs).")
@click.option("--max-prompt-tokens", type=int, default=384, show_default=True,
              help="Cut longer prompt messages at the end so the prompt fits.")
@click.option("--steps", type=int, default=150, show_default=True, help="Optimiser steps per exit.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Optimiser (Adam) learning rate.")
@click.option("--tokens-per-step", type=int, default=256, show_default=True,
              help="Token positions per optimiser step (minibatch size).")
@click.option("--top-k", type=int, default=64, show_default=True, help="Teacher tokens kept per position.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the minibatch order and initialisation (>= 0).")
@click.option("--save-dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="dtype of the saved adapter weights.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (one simspec wrote).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (model-loading bars included).")
def adapter(model_spec: str, exits: tuple[int, ...], out_dir: str, prompts_path: str | None,
            train_per_category: int, heldout_per_category: int, skip_per_category: int, max_new_tokens: int,
            max_prompt_tokens: int, steps: int, lr: float, tokens_per_step: int, top_k: int, seed: int,
            save_dtype: str, threads: int | None, force: bool, quiet: bool) -> None:
    """Train Kangaroo/HiSpec exit adapters by self-distillation (fp32 training on the model's own
    greedy continuations); report top-1 agreement with the full model before/after on held-out prompts."""
    from simspec.atomic import atomic_dir
    from simspec.calibrate import prompts as P

    from simspec.atomic import check_output_dir

    check_output_dir(out_dir, "adapter", force=force)  # before any training
    if train_per_category < 1 or heldout_per_category < 1:
        raise SimspecError("--train-per-category and --heldout-per-category must be >= 1")
    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    if quiet:
        from simspec.calibrate.models import silence_progress_bars

        silence_progress_bars()
    prompt_file = Path(prompts_path) if prompts_path else P.bundled_prompts_path()
    allp = P.load_prompts(prompt_file)
    train_sel = P.select(allp, train_per_category, skip_per_category)
    held_sel = P.select(allp, heldout_per_category, skip_per_category + train_per_category)

    import torch

    from simspec.calibrate.adapter import save_adapters, train_adapters
    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model

    _set_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model_spec, "fp32", "cpu")
    lm = LayeredLM(loaded.model)
    for e in exits:
        if not 0 < e < lm.num_layers:
            raise SimspecError(f"--exit {e}: must be between 1 and {lm.num_layers - 1}")
    tok = loaded.tokenizer
    train_ids = [P.encode(tok, p.text, max_prompt_tokens) for g in train_sel.values() for p in g]
    held_ids = [P.encode(tok, p.text, max_prompt_tokens) for g in held_sel.values() for p in g]
    if not train_ids or not held_ids:
        raise SimspecError(f"prompts {prompt_file}: not enough prompts after skipping {skip_per_category} per class")
    adapters, reports, summary = train_adapters(
        lm, tok.eos_token_id, train_ids, held_ids, sorted(set(exits)), max_new_tokens=max_new_tokens,
        steps=steps, lr=lr, tokens_per_step=tokens_per_step, top_k=top_k, seed=seed, log=say)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    info = {"model": loaded.model_id, "model_spec": model_spec, "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size, "architecture": "attention block (copy of layer L's, o_proj zeroed "
            "at init) + input/output RMSNorm; target LM head shared and frozen",
            "training": {"objective": f"KL(full model top-{top_k} || exit) per position, self-distillation",
                         "prompts": prompt_file.name, "train_per_category": train_per_category,
                         "heldout_per_category": heldout_per_category, "skip_per_category": skip_per_category,
                         "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                         "steps": steps, "lr": lr, "tokens_per_step": tokens_per_step, "seed": seed,
                         "threads": torch.get_num_threads(), **summary},
            "date": _dt.date.today().isoformat(), "versions": _versions(),
            "exits": {str(e): {"agreement_before": round(r.agreement_before, 4),
                               "agreement_after": round(r.agreement_after, 4),
                               "loss_first": round(r.loss_first, 4), "loss_last": round(r.loss_last, 4),
                               "heldout_loss_before": round(r.heldout_loss_before, 4),
                               "heldout_loss_after": round(r.heldout_loss_after, 4),
                               "train_s": round(r.train_s, 1)} for e, r in reports.items()}}
    with atomic_dir(out_dir, overwrite=force, kind="adapter") as tmp:
        save_adapters(Path(tmp), adapters, info,
                      dtype=torch.bfloat16 if save_dtype == "bf16" else torch.float32)
    for e, r in sorted(reports.items()):
        click.echo(f"exit {e}: top-1 agreement with the full model on held-out prompts "
                   f"{r.agreement_before:.3f} (logit lens) -> {r.agreement_after:.3f}; "
                   f"KL {r.heldout_loss_before:.3f} -> {r.heldout_loss_after:.3f} nats; {r.train_s:.0f} s")
    click.echo(f"wrote {len(adapters)} adapter(s) to {out_dir} in {summary['wall_s']:.0f} s")


# ------------------------------------------------------------------------------------ import


@click.command("import-acceptance")
@click.argument("log_path", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Profile JSON to create or update (acceptance[method] is replaced).")
@click.option("--method", default="draft", show_default=True,
              help="Acceptance method the log measured (draft, kangaroo, ...).")
@click.option("--k", type=int, default=None,
              help="Tokens drafted per step (default: the largest accept length in the file minus 1).")
@click.option("--heldout-share", type=float, default=0.0, show_default=True,
              help="Share of each class's answers held out to test the fit.")
@click.option("--min-exposure", type=int, default=10, show_default=True,
              help="Keep a draft position in position_conditional only if offered this often.")
@click.option("--depth", type=click.IntRange(min=1), default=None,
              help="Tree methods (tree, eagle, eagle3, mtp, medusa, ngram): drafting depth the log was made at.")
@click.option("--topk", type=click.IntRange(min=1), default=1, show_default=True, help="Tree methods: branching.")
@click.option("--tokens", type=click.IntRange(min=2), default=None,
              help="Tree methods: tokens verified per request incl. the root [default: depth + 1 for a chain].")
@click.option("--rank-hazard", type=click.FloatRange(0, 1), default=None,
              help="Tree methods with --topk > 1: the rank hazard h (docs/methods.md).")
@click.option("--hit-probability", type=click.FloatRange(0, 1), default=None,
              help="ngram: the lookup's hit probability per step.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def import_acceptance(log_path: str, out_path: str, method: str, k: int | None, heldout_share: float,
                      min_exposure: int, depth: int | None, topk: int, tokens: int | None,
                      rank_hazard: float | None, hit_probability: float | None, quiet: bool) -> None:
    """Import Spec-Bench-style answer JSONL (choices[].accept_lengths per step, category) as acceptance.
    For a tree method (give --depth) each request's mean accept length is inverted through the tree
    model into its own per-token level (simspec.calibrate.tree_fit)."""
    from simspec.calibrate.importer import import_spec_bench
    from simspec.calibrate.profile_io import update_profile
    from simspec.calibrate.tree_fit import TREE_METHODS, import_spec_bench_tree

    if not 0.0 <= heldout_share < 1.0:
        raise SimspecError(f"--heldout-share {heldout_share}: must be in [0, 1)")
    if method in TREE_METHODS:
        if depth is None:
            raise SimspecError(f"--depth: needed to import a {method} log (the tree model's settings)")
        tokens = tokens if tokens is not None else (depth + 1 if topk == 1 else 1 + depth * topk)
        section = import_spec_bench_tree(log_path, method, depth, topk, tokens, rank_hazard, hit_probability)
        update_profile(out_path, acceptance={method: section})
        click.echo(f"wrote acceptance.{method} ({len(section)} classes) to {out_path}")
        return
    section = import_spec_bench(log_path, method=method, k=k, heldout_share=heldout_share,
                                min_exposure=min_exposure)
    update_profile(out_path, acceptance={method: section})
    if not quiet:
        _echo_table(method, section)
    click.echo(f"wrote acceptance.{method} ({len(section)} classes) to {out_path}")
