"""The committed study outputs: the acceptance-aware study names its batching mode in every file
name and in the plot's title; --replot redraws from the saved data."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.mark.parametrize("mode", ["vllm", "preemptive"])
def test_acceptance_aware_replot_names_the_batching_mode(tmp_path, monkeypatch, mode):
    from matplotlib.figure import Figure

    sys.path.insert(0, str(STUDIES.parents[1] / "benchmarks"))
    from study_acceptance_aware import main

    for suffix in ("_summary.csv", ".json"):
        shutil.copy(STUDIES / f"acceptance_aware_{mode}{suffix}", tmp_path)
    titles = []
    save = Figure.savefig

    def spy(self, *a, **k):
        titles.append(self._suptitle.get_text())
        return save(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    assert main(["--batching", mode, "--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"acceptance_aware_{mode}.png").stat().st_size > 10_000
    assert titles and f"{mode} batching" in titles[0]
    other = "preemptive" if mode == "vllm" else "vllm"
    assert main(["--batching", other, "--replot", "--out", str(tmp_path)]) == 2  # its data is not there
    assert not (tmp_path / f"acceptance_aware_{other}.png").exists()
    for name in ("csv", "json", "png"):  # the committed outputs carry the mode in their names
        assert (STUDIES / f"acceptance_aware_{mode}.{name}").is_file()
