"""Write a run directory atomically: ``config.json``, ``requests.parquet``, ``steps.parquet``,
``summary.json``. The directory appears only when all four are complete. ``steps.parquet`` is always
written, with its columns, even when the run's ``steps_log`` mode (``sampled``, ``none``) keeps few
or no rows, so every reader finds the same four files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simspec.atomic import atomic_dir, json_safe, write_json
from simspec.simulator.run import RunResult


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Deterministic parquet: no pandas index metadata, fixed compression."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd", write_statistics=False)


def write_run(result: RunResult, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``result`` as a run directory at ``out_dir`` (atomic rename at the end)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, kind="run") as tmp:
        write_json(tmp / "config.json", {**result.config, "notes": result.notes})
        write_parquet(result.requests, tmp / "requests.parquet")
        write_parquet(result.steps, tmp / "steps.parquet")
        write_json(tmp / "summary.json", json_safe(result.summary))
    return out_dir


def read_run(run_dir: str | Path) -> dict:
    """Load a run directory: ``{"config", "summary", "requests", "steps", "steps_log"}``.

    ``steps_log`` is the run's ``--steps-log`` mode: ``full``, ``sampled`` (``steps`` holds every
    ``config["run"]["steps_log_every"]``-th step of each replica) or ``none`` (``steps`` has the
    columns and no rows). Runs written before the option read as ``full``."""
    import json

    from simspec.errors import SimspecError

    run_dir = Path(run_dir)
    need = ["config.json", "summary.json", "requests.parquet", "steps.parquet"]
    for n in need:
        if not (run_dir / n).is_file():
            raise SimspecError(f"{run_dir}: not a complete run directory (missing {n})")
    config = json.loads((run_dir / "config.json").read_text())
    return {
        "config": config,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "requests": pd.read_parquet(run_dir / "requests.parquet"),
        "steps": pd.read_parquet(run_dir / "steps.parquet"),
        "steps_log": (config.get("run") or {}).get("steps_log", "full"),
    }
