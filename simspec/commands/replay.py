"""``simspec replay`` and ``simspec compare``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from simspec.errors import ConfigError
from simspec.traces.transforms import format_option, transform_options


def load_trace_arg(trace: str | None, fmt: str | None, seed: int, transforms: dict):
    """TRACE argument (a file or a bundled name; default: the bundled Azure trace) → transformed trace."""
    from simspec.traces.formats import DEFAULT_TRACE, resolve_trace_arg
    from simspec.traces.transforms import load_and_transform

    return load_and_transform(resolve_trace_arg(trace or DEFAULT_TRACE), fmt, seed=seed, **transforms)


def trace_record(trace_arg: str | None, fmt: str | None, seed: int, transforms: dict, tr) -> dict:
    """What ``config.json`` records about the trace so that the run can be repeated exactly: the
    absolute path, its sha256, the format and every transform as a structured field."""
    from simspec.sweep import _sha256_file
    from simspec.traces.formats import DEFAULT_TRACE, resolve_trace_arg

    path = Path(resolve_trace_arg(trace_arg or DEFAULT_TRACE)).resolve()
    tf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transforms.items()}
    return {"source": tr.source, "n_requests": len(tr), "arg": trace_arg or DEFAULT_TRACE, "path": str(path),
            "sha256": _sha256_file(path), "format": fmt, "transforms": tf, "transform_seed": seed}


def default_run_name(trace: str | None, policy: str, spec: str, spec_len: str, replicas: int, profile_name: str,
                     seed: int, identity: dict) -> str:
    """``runs/<trace>-<policy>-<spec>[-<spec_len>]-r<replicas>-<profile>-s<seed>-<hash>``: readable, and
    different for any two runs that differ in anything (the hash covers every option and transform)."""
    import hashlib

    from simspec.atomic import dumps_json

    stem = Path(trace).name.split(".")[0] if trace else "azure_code_2023"
    parts = [stem, policy, spec] + ([spec_len] if spec_len != "fixed" else []) + [f"r{replicas}", profile_name,
                                                                                  f"s{seed}"]
    h = hashlib.sha256(dumps_json(identity).encode()).hexdigest()[:8]
    clean = lambda t: "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in t.replace("=", ""))
    return str(Path("runs") / "-".join(clean(Path(p).name if "/" in p else p)[:40] for p in parts + [h]))


def _choices(kind: str) -> str:
    from simspec.policies import SCHEDULERS, SPEC_LEN_POLICIES
    from simspec.simulator.methods import METHODS

    return ", ".join(sorted({"policy": SCHEDULERS, "spec": METHODS, "spec-len": SPEC_LEN_POLICIES}[kind]))


def build_config(policy, spec, spec_len, replicas, router, max_batch, kv_budget_tokens, preempt, seed,
                 slo_ttft_ms, slo_tpot_ms, allow_extrapolation, max_batched_tokens=None, engine=None):
    from simspec.policies import get_scheduler_class, get_spec_len_class
    from simspec.simulator.config import ComponentSpec, RunConfig
    from simspec.simulator.methods import get_method_class

    sched = ComponentSpec.parse(policy, "--policy")
    method = ComponentSpec.parse(spec, "--spec")
    slen = ComponentSpec.parse(spec_len, "--spec-len")
    get_scheduler_class(sched.name).check_param_names(dict(sched.params))
    get_method_class(method.name)
    get_spec_len_class(slen.name).check_param_names(dict(slen.params))
    return RunConfig(scheduler=sched, method=method, spec_len=slen, replicas=replicas, router=router,
                     max_batch_size=max_batch, kv_budget_tokens=kv_budget_tokens,
                     max_batched_tokens=max_batched_tokens, preempt_mode=preempt,
                     seed=seed, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                     allow_extrapolation=allow_extrapolation, **(engine or {}))


ENGINE_KEYS = ("batching", "block_size", "chunked_prefill", "long_prefill_token_threshold", "window_steps",
               "gpu_memory_utilization", "max_concurrency", "steps_log", "steps_log_every")


def engine_options(f):
    """Engine semantics options (vLLM's names), gathered into one ``engine`` dict argument."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, **kw):
        engine = {k: kw.pop(k) for k in ENGINE_KEYS}
        return f(*args, engine=engine, **kw)

    opts = [
        click.option("--batching", default="vllm", show_default=True, type=click.Choice(["vllm", "preemptive"]),
                     help="Batch formation. vllm: vLLM V1's scheduler (running requests first, waiting ones "
                          "admitted in the scheduler's priority order into the room left, preemption only "
                          "when a KV allocation fails). preemptive: the scheduler picks the batch every step "
                          "(paper-style SRPT/LAS/LAPS-SD); pushed-out requests keep their KV while it fits."),
        click.option("--block-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="KV-cache block size in tokens (vLLM's --block-size)."),
        click.option("--chunked-prefill/--no-chunked-prefill", default=True, show_default=True,
                     help="Split long prompts over steps within --max-batched-tokens (vLLM's default)."),
        click.option("--long-prefill-token-threshold", type=click.IntRange(min=1), default=None,
                     help="Most prompt tokens one request feeds per step [default: no cap]."),
        click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Share of GPU memory the engine may use (vLLM's option): derive the KV budget from "
                          "the profile's memory figures (analytic profiles) instead of its kv_budget_tokens."),
        click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
                     help="Most requests in flight at once (vllm bench serve's option): a request due while "
                          "that many are unfinished is held and sent when one completes; its latency counts "
                          "from the send time [default: open loop, the trace's arrival times]."),
        click.option("--steps-log", default="full", show_default=True, type=click.Choice(["full", "sampled", "none"]),
                     help="What steps.parquet keeps: every step (full), the steps of each replica whose index "
                          "is a multiple of --steps-log-every (sampled), or no rows (none: the file has its "
                          "columns and no rows). The summary counts every step either way; for long runs."),
        click.option("--steps-log-every", default=100, show_default=True, type=click.IntRange(min=1),
                     help="With --steps-log sampled: keep one step in this many (steps 0, N, 2N, ... of each "
                          "replica)."),
        click.option("--window-steps", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Most decode-only steps advanced per simulation event when the batch is stable "
                          "(speed only: 1 gives byte-identical outputs, one step per event)."),
    ]
    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


SPEC_HELP = ("Speculation method and its parameters (counts are tokens or layers): none | draft:k=4 (k drafts per "
             "step; draft_layers=L: the target's first L layers as the draft) | "
             "kangaroo:exit=2,gamma=6,eta=0.6 (exit layer, most drafts, confidence 0..1) | "
             "hispec:draft_exit=4,inter_exit=8,nd=2,ni=4 (exit layers; drafts per inner round, buffer tokens) | "
             "tree:depth=4,topk=1,tokens=5 (a draft-model tree: depth drafting passes, topk branches per node, "
             "tokens verified per request incl. the root; rank_hazard=0..1, acceptance=SECTION) | "
             "eagle:depth=3,topk=1,tokens=4,head_layers=1 (one-layer head on the target's hidden states; "
             "chain, or a tree as SGLang's --speculative-eagle-topk/--speculative-num-draft-tokens) | "
             "eagle3:...,draft_vocab=V (tokens of the head's own vocabulary) | "
             "mtp:depth=1 (the target's MTP module, run depth times) | "
             "medusa:depth=4,topk=4,tokens=17 (depth heads in one pass, static tree) | "
             "ngram:depth=4,hit_probability=P (prompt lookup: no draft compute; P = chance a lookup matches, "
             "default the profile's). Tree methods read acceptance.<method> of the profile "
             "(acceptance=SECTION reads another). See docs/methods.md.")


def run_options(f):
    """Options shared by replay and compare (``--speculative-config`` becomes ``spec``)."""
    import functools

    inner = f

    @functools.wraps(f)
    def with_vllm_spec(*args, speculative_config=None, **kw):
        if speculative_config is not None:
            if kw.get("spec", "none") != "none":
                raise ConfigError("--speculative-config: give it or --spec, not both")
            from simspec.speculative_config import spec_from_speculative_config

            kw["spec"] = spec_from_speculative_config(speculative_config)
        return inner(*args, **kw)

    opts = [
        click.option("--spec", default="none", show_default=True, metavar="METHOD[:k=v,...]", help=SPEC_HELP),
        click.option("--speculative-config", "speculative_config", default=None, metavar="JSON",
                     help="vLLM's speculative config instead of --spec, e.g. '{\"method\": \"eagle3\", "
                          "\"num_speculative_tokens\": 3}': method (eagle, eagle3, medusa, ngram, mtp, "
                          "deepseek_mtp, draft_model), num_speculative_tokens, model (the drafter is the "
                          "profile's), and SGLang's speculative_eagle_topk / speculative_num_draft_tokens; "
                          "other fields are refused."),
        click.option("--spec-len", default="fixed", show_default=True, metavar="POLICY[:k=v,...]",
                     help="Speculation-length policy: fixed (the method's k) | smartspec | smartspec-per-request."),
        click.option("--profile", "profile_name", default=None, metavar="NAME|PATH",
                     help="Profile: a bundled name (see `simspec profiles`) or a JSON file. "
                          "[default: llama70b-4xh100-smartspec]"),
        click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Number of model replicas behind the router."),
        click.option("--router", default="round-robin", show_default=True,
                     type=click.Choice(["round-robin", "least-outstanding"]),
                     help="How arrivals are spread over replicas (least-outstanding: fewest outstanding tokens)."),
        click.option("--max-batch", "--max-num-seqs", "max_batch", type=click.IntRange(min=1), default=None,
                     help="Most requests per step per replica [default: the profile's capacity]. "
                          "--max-num-seqs is vLLM's name for it."),
        click.option("--kv-budget-tokens", type=click.IntRange(min=1), default=None,
                     help="KV-cache capacity per replica, in tokens [default: the profile's capacity]."),
        click.option("--max-batched-tokens", "--max-num-batched-tokens", "max_batched_tokens",
                     type=click.IntRange(min=1), default=None,
                     help="Most tokens fed per step per replica (prefill + k+1 per decode request) "
                          "[default: the profile's capacity, else unlimited]. --max-num-batched-tokens is "
                          "vLLM's name for it."),
        click.option("--preempt", default="recompute", show_default=True,
                     type=click.Choice(["recompute", "swap", "keep"]),
                     help="A preempted request's KV (freed when an allocation fails): recompute its context "
                          "on resume (vLLM V1), or swap it out and back without recompute (transfer time not "
                          "modelled; 'keep' is the old name of swap)."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Run seed, >= 0 (all random streams)."),
        click.option("--slo-ttft-ms", type=float, default=None, help="TTFT SLO in ms (for attainment)."),
        click.option("--slo-tpot-ms", type=float, default=None, help="TPOT SLO in ms (for attainment)."),
        click.option("--allow-extrapolation", is_flag=True,
                     help="Allow latency lookups beyond the profile's measured range (reported)."),
        click.option("--goodput", "goodput", multiple=True, metavar="'ttft:MS tpot:MS e2el:MS'",
                     help="vLLM's goodput: requests/s that meet every given bound (ms), reported as "
                          "request_goodput (as `vllm bench serve --goodput`)."),
    ]
    f = with_vllm_spec
    for o in reversed(opts):
        f = o(f)
    return f


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


SUMMARY_ROWS = [
    ("requests", "n_requests", 0), ("mean latency (ms)", "latency_ms_mean", 1), ("p50 latency (ms)", "latency_ms_p50", 1),
    ("p99 latency (ms)", "latency_ms_p99", 1), ("mean TTFT (ms)", "ttft_ms_mean", 1), ("p99 TTFT (ms)", "ttft_ms_p99", 1),
    ("mean TPOT (ms)", "tpot_ms_mean", 2), ("throughput (tok/s)", "throughput_tokens_per_s", 1),
    ("tokens / decode step (mean over steps)", "mean_tokens_per_decode_step", 2),
    ("draft acceptance rate", "draft_acceptance_rate", 3),
    ("pauses", "pauses", 0), ("preemptions", "preemptions", 0), ("recomputed tokens", "recomputed_tokens", 0),
    ("SLO attainment", "slo_attainment", 3), ("SLO goodput (req/s)", "slo_goodput_requests_per_s", 3),
]
# the same run as `vllm bench serve` prints it (its metric names)
VLLM_ROWS = [
    ("request_throughput (req/s)", "request_throughput", 3), ("output_throughput (tok/s)", "output_throughput", 1),
    ("request_goodput (req/s)", "request_goodput", 3),
] + [(f"{stat}_{m}_ms", f"{stat}_{m}_ms", 2) for m in ("ttft", "tpot", "itl", "e2el")
     for stat in ("mean", "median", "p90", "p95", "p99")]


def print_table(columns: list[tuple[str, dict]]) -> None:
    """Print summary metrics, one column per run: simspec's, then `vllm bench serve`'s names."""
    rows = [["metric"] + [name for name, _ in columns]]
    for label, key, digits in SUMMARY_ROWS + [("-- as vllm bench serve --", None, 0)] + VLLM_ROWS:
        if key is None:
            rows.append([label] + [""] * len(columns))
            continue
        if all(s.get(key) is None for _, s in columns):
            continue
        rows.append([label] + [_fmt(s.get(key), digits) for _, s in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


def _finish_result(result, goodput_slo, trace_rec: dict) -> None:
    """Add vLLM's goodput (``--goodput``) and the rerun record of the trace to a run's result."""
    from simspec.vllm_metrics import vllm_goodput

    if goodput_slo is not None:
        result.summary.update(vllm_goodput(result.requests, result.summary["makespan_s"], goodput_slo))
        result.config["vllm_goodput_slo_ms"] = goodput_slo.to_dict()
    result.config["trace"] = {**result.config.get("trace", {}), **trace_rec}


@click.command("replay")
@click.argument("trace", required=False, metavar="[TRACE]")
@click.option("--policy", default="fcfs", show_default=True, metavar="SCHEDULER[:k=v,...]",
              help="Request scheduler: fcfs | srpt[:predictor=oracle|lognormal|class-mean,sigma=0.5] | laps-sd | las.")
@run_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory to write (config.json, requests.parquet, steps.parquet, summary.json). "
                   "[default: runs/<trace>-<policy>-<spec>-r<replicas>-<profile>-s<seed>-<hash of all options>]")
@click.option("--force", is_flag=True, help="Replace --out if it is a simspec output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table (the run directory is still printed).")
@format_option
@transform_options
@engine_options
def replay(trace, policy, spec, spec_len, profile_name, replicas, router, max_batch, kv_budget_tokens,
           max_batched_tokens, preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation, goodput, out_dir, force,
           quiet, fmt, transforms, engine):
    """Replay TRACE through the simulated cluster and write a run directory.

    TRACE is a file in any supported format (canonical CSV, Azure, …; auto-detected; .gz read
    as gzip) or a bundled trace name [default: azure_code_2023, the Azure LLM coding trace, 8,819
    requests]. Times are simulated; the same options and seed always give byte-identical outputs.
    """
    from simspec.atomic import check_output_dir
    from simspec.profile import DEFAULT_PROFILE, load_profile
    from simspec.simulator.output import write_run
    from simspec.simulator.run import simulate
    from simspec.vllm_metrics import GoodputSLO

    config = build_config(policy, spec, spec_len, replicas, router, max_batch, kv_budget_tokens, preempt, seed,
                          slo_ttft_ms, slo_tpot_ms, allow_extrapolation, max_batched_tokens, engine)
    goodput_slo = GoodputSLO.parse(goodput)
    if out_dir is not None:
        check_output_dir(out_dir, "run", force=force)
    profile = load_profile(profile_name or DEFAULT_PROFILE)
    tr = load_trace_arg(trace, fmt, seed, transforms)
    trace_rec = trace_record(trace, fmt, seed, transforms, tr)
    if out_dir is None:
        out_dir = default_run_name(trace, policy, spec, spec_len, replicas, profile.name, seed,
                                   {"run": config.identity_dict(), "profile": profile.sha256, "trace": trace_rec,
                                    "goodput": goodput_slo.to_dict() if goodput_slo else None})
        check_output_dir(out_dir, "run", force=force)
    t0 = time.perf_counter()
    result = simulate(config, tr, profile, progress=not quiet)
    wall = time.perf_counter() - t0
    _finish_result(result, goodput_slo, trace_rec)
    write_run(result, out_dir, overwrite=force)
    if not quiet:
        for n in result.notes:
            click.echo(f"note: {n}", err=True)
        print_table([(f"{policy} / {spec}", result.summary)])
        click.echo(f"\n{len(tr)} requests, {result.summary['request_steps']:,} request-steps in {wall:.2f} s wall; "
                   f"wrote {out_dir}")
    else:
        click.echo(f"wrote {out_dir}")


@click.command("compare")
@click.argument("trace", required=False, metavar="[TRACE]")
@click.option("--policies", default=None, metavar="P1,P2,...",
              help="Schedulers to compare [default: every registered scheduler].")
@run_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for one run directory per scheduler [default: none written].")
@click.option("--force", is_flag=True, help="Replace run directories that exist (simspec outputs only).")
@format_option
@transform_options
@engine_options
def compare(trace, policies, spec, spec_len, profile_name, replicas, router, max_batch, kv_budget_tokens,
            max_batched_tokens, preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation, goodput, out_dir, force,
            fmt, transforms, engine):
    """Replay TRACE (default: the bundled Azure coding trace) under several schedulers and print
    the comparison. This is the quickstart's main job."""
    from simspec.atomic import check_output_dir
    from simspec.policies import SCHEDULERS
    from simspec.profile import DEFAULT_PROFILE, load_profile
    from simspec.simulator.output import write_run
    from simspec.simulator.run import simulate
    from simspec.vllm_metrics import GoodputSLO

    names = [p.strip() for p in policies.split(",")] if policies else sorted(SCHEDULERS)
    # everything is checked before the first simulation: names, duplicates, outputs
    if not all(names):
        raise ConfigError(f"--policies {policies!r}: empty name in the list")
    configs = {}
    for name in names:
        if name in configs:
            raise ConfigError(f"--policies: {name!r} given twice")
        try:
            configs[name] = build_config(name, spec, spec_len, replicas, router, max_batch, kv_budget_tokens,
                                         preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation,
                                         max_batched_tokens, engine)
        except ConfigError as exc:  # name the option the user gave
            msg = str(exc)
            raise ConfigError("--policies" + msg[len("--policy"):] if msg.startswith("--policy ") or
                              msg.startswith("--policy:") else msg) from None
    canon = {}
    for name, cfg in configs.items():
        key = str(cfg.scheduler)
        if key in canon:
            raise ConfigError(f"--policies: {canon[key]!r} and {name!r} are the same scheduler")
        canon[key] = name
    goodput_slo = GoodputSLO.parse(goodput)
    dirs = {}
    if out_dir:
        check_output_dir(out_dir, "compare", force=force, resume=True) if Path(out_dir).exists() else \
            check_output_dir(out_dir, "compare")
        for name in names:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.replace("=", ""))
            dirs[name] = Path(out_dir) / safe
            check_output_dir(dirs[name], "run", force=force, what="--out run")
        if len(set(dirs.values())) < len(dirs):
            raise ConfigError("--policies: two schedulers map to the same run directory name")
    profile = load_profile(profile_name or DEFAULT_PROFILE)
    tr = load_trace_arg(trace, fmt, seed, transforms)
    trace_rec = trace_record(trace, fmt, seed, transforms, tr) if out_dir else {}
    click.echo(f"trace: {tr.source} ({len(tr)} requests); profile: {profile.name} [{profile.source}]; "
               f"spec: {spec}; spec-len: {spec_len}; replicas: {replicas}; seed: {seed}")
    cols = []
    for name in names:
        t0 = time.perf_counter()
        result = simulate(configs[name], tr, profile, progress=True)
        click.echo(f"  {name}: {time.perf_counter() - t0:.2f} s wall", err=True)
        _finish_result(result, goodput_slo, trace_rec)
        if out_dir:
            from simspec.atomic import MARKER, write_marker

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            if not (Path(out_dir) / MARKER).is_file():
                write_marker(out_dir, "compare")
            write_run(result, dirs[name], overwrite=force)
        cols.append((name, result.summary))
    click.echo()
    print_table(cols)
    if out_dir:
        click.echo(f"\nwrote {len(cols)} run directories under {out_dir}")
