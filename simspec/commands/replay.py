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
    get_scheduler_class(sched.name)
    get_method_class(method.name)
    get_spec_len_class(slen.name)
    return RunConfig(scheduler=sched, method=method, spec_len=slen, replicas=replicas, router=router,
                     max_batch_size=max_batch, kv_budget_tokens=kv_budget_tokens,
                     max_batched_tokens=max_batched_tokens, preempt_mode=preempt,
                     seed=seed, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                     allow_extrapolation=allow_extrapolation, **(engine or {}))


ENGINE_KEYS = ("batching", "block_size", "chunked_prefill", "long_prefill_token_threshold", "window_steps")


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
        click.option("--window-steps", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Most decode-only steps advanced per simulation event when the batch is stable "
                          "(speed only: 1 gives byte-identical outputs, one step per event)."),
    ]
    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


def run_options(f):
    """Options shared by replay and compare."""
    opts = [
        click.option("--spec", default="none", show_default=True, metavar="METHOD[:k=v,...]",
                     help="Speculation method and its parameters: none | draft:k=4 | "
                          "kangaroo:exit=2,gamma=6,eta=0.6 | hispec:draft_exit=4,inter_exit=8,nd=2,ni=4."),
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
        click.option("--max-batch", type=click.IntRange(min=1), default=None,
                     help="Most requests per step per replica [default: the profile's capacity]."),
        click.option("--kv-budget-tokens", type=click.IntRange(min=1), default=None,
                     help="KV-cache capacity per replica, in tokens [default: the profile's capacity]."),
        click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
                     help="Most tokens fed per step per replica (prefill + k+1 per decode request) "
                          "[default: the profile's capacity, else unlimited]."),
        click.option("--preempt", default="recompute", show_default=True,
                     type=click.Choice(["recompute", "swap", "keep"]),
                     help="A preempted request's KV (freed when an allocation fails): recompute its context "
                          "on resume (vLLM V1), or swap it out and back without recompute (transfer time not "
                          "modelled; 'keep' is the old name of swap)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Run seed (all random streams)."),
        click.option("--slo-ttft-ms", type=float, default=None, help="TTFT SLO in ms (for attainment)."),
        click.option("--slo-tpot-ms", type=float, default=None, help="TPOT SLO in ms (for attainment)."),
        click.option("--allow-extrapolation", is_flag=True,
                     help="Allow latency lookups beyond the profile's measured range (reported)."),
    ]
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
    ("tokens / decode step", "mean_tokens_per_decode_step", 2), ("acceptance rate", "acceptance_rate", 3),
    ("pauses", "pauses", 0), ("preemptions", "preemptions", 0), ("recomputed tokens", "recomputed_tokens", 0),
    ("SLO attainment", "slo_attainment", 3),
]


def print_table(columns: list[tuple[str, dict]]) -> None:
    """Print summary metrics, one column per run."""
    rows = [["metric"] + [name for name, _ in columns]]
    for label, key, digits in SUMMARY_ROWS:
        if all(s.get(key) is None for _, s in columns):
            continue
        rows.append([label] + [_fmt(s.get(key), digits) for _, s in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


@click.command("replay")
@click.argument("trace", required=False, metavar="TRACE")
@click.option("--policy", default="fcfs", show_default=True, metavar="SCHEDULER[:k=v,...]",
              help="Request scheduler: fcfs | srpt[:predictor=oracle|lognormal|class-mean,sigma=0.5] | laps-sd | las.")
@run_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory to write (config.json, requests.parquet, steps.parquet, summary.json). "
                   "[default: runs/<trace>-<policy>-<spec>-s<seed>]")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@format_option
@transform_options
@engine_options
def replay(trace, policy, spec, spec_len, profile_name, replicas, router, max_batch, kv_budget_tokens,
           max_batched_tokens, preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation, out_dir, force, quiet,
           fmt, transforms, engine):
    """Replay TRACE through the simulated cluster and write a run directory.

    TRACE is a file in any supported format (canonical CSV, Azure, …; auto-detected) or a bundled
    trace name [default: azure_code_2023, the Azure LLM coding trace, 8,819 requests]. Times are
    simulated; the same options and seed always give byte-identical outputs.
    """
    from simspec.profile import DEFAULT_PROFILE, load_profile
    from simspec.simulator.output import write_run
    from simspec.simulator.run import simulate
    config = build_config(policy, spec, spec_len, replicas, router, max_batch, kv_budget_tokens, preempt, seed,
                          slo_ttft_ms, slo_tpot_ms, allow_extrapolation, max_batched_tokens, engine)
    profile = load_profile(profile_name or DEFAULT_PROFILE)
    tr = load_trace_arg(trace, fmt, seed, transforms)
    if out_dir is None:
        stem = Path(trace).stem if trace else "azure_code_2023"
        safe = lambda s: "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in s)
        out_dir = str(Path("runs") / safe(f"{stem}-{policy}-{spec}-s{seed}"))
    if Path(out_dir).exists() and not force:
        raise ConfigError(f"--out: {out_dir} already exists (use --force to replace it)")
    t0 = time.perf_counter()
    result = simulate(config, tr, profile, progress=not quiet)
    wall = time.perf_counter() - t0
    write_run(result, out_dir, overwrite=force)
    if not quiet:
        for n in result.notes:
            click.echo(f"note: {n}", err=True)
        print_table([(f"{policy} / {spec}", result.summary)])
        click.echo(f"\n{len(tr)} requests, {result.summary['request_steps']:,} request-steps in {wall:.2f} s wall; "
                   f"wrote {out_dir}")


@click.command("compare")
@click.argument("trace", required=False, metavar="TRACE")
@click.option("--policies", default=None, metavar="P1,P2,...",
              help="Schedulers to compare [default: every registered scheduler].")
@run_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for one run directory per scheduler [default: none written].")
@click.option("--force", is_flag=True, help="Replace run directories that exist.")
@format_option
@transform_options
@engine_options
def compare(trace, policies, spec, spec_len, profile_name, replicas, router, max_batch, kv_budget_tokens,
            max_batched_tokens, preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation, out_dir, force,
            fmt, transforms, engine):
    """Replay TRACE (default: the bundled Azure coding trace) under several schedulers and print
    the comparison. This is the quickstart's main job."""
    from simspec.policies import SCHEDULERS
    from simspec.profile import DEFAULT_PROFILE, load_profile
    from simspec.simulator.output import write_run
    from simspec.simulator.run import simulate

    names = [p.strip() for p in policies.split(",")] if policies else sorted(SCHEDULERS)
    profile = load_profile(profile_name or DEFAULT_PROFILE)
    tr = load_trace_arg(trace, fmt, seed, transforms)
    click.echo(f"trace: {tr.source} ({len(tr)} requests); profile: {profile.name} [{profile.source}]; "
               f"spec: {spec}; spec-len: {spec_len}; replicas: {replicas}; seed: {seed}")
    cols = []
    for name in names:
        config = build_config(name, spec, spec_len, replicas, router, max_batch, kv_budget_tokens, preempt, seed,
                              slo_ttft_ms, slo_tpot_ms, allow_extrapolation, max_batched_tokens, engine)
        t0 = time.perf_counter()
        result = simulate(config, tr, profile, progress=True)
        click.echo(f"  {name}: {time.perf_counter() - t0:.2f} s wall", err=True)
        if out_dir:
            write_run(result, Path(out_dir) / name, overwrite=force)
        cols.append((name, result.summary))
    click.echo()
    print_table(cols)
