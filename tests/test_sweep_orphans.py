"""A killed ``simspec sweep`` leaves no process behind (SIGTERM and SIGKILL of the driver)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

GRID = "base:\n  spec: 'draft:k=4'\naxes:\n  policy: [fcfs, srpt, las, laps-sd]\n  seed: [1, 2]\n"


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            kids.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_sweep_leaves_no_orphans(tmp_path, sig):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    p = subprocess.Popen([sys.executable, "-m", "simspec.cli", "sweep", str(grid), "--out", str(tmp_path / "out"),
                          "--workers", "2", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 60 and len(descendants(p.pid)) < 4:  # fork server, tracker, 2 workers
            time.sleep(0.1)
        time.sleep(0.3)
        procs = descendants(p.pid)
        assert len(procs) >= 3, procs
        os.kill(p.pid, sig)
        # the pipes reach EOF only when no descendant holds them: a reader must not hang
        _, err = p.communicate(timeout=15)
        if sig == signal.SIGTERM:
            assert p.returncode == 130, err
            assert "interrupted" in err
        t1 = time.time()
        while time.time() - t1 < 5 and any(alive(x) for x in procs):
            time.sleep(0.1)
        assert not [x for x in procs if alive(x)], "orphaned sweep processes"
    finally:
        for x in [p.pid] + descendants(p.pid):
            try:
                os.kill(x, signal.SIGKILL)
            except OSError:
                pass
