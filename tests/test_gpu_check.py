"""scripts/gpu-check.sh --cpu-dry-run: the whole GPU check, end to end on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "QCACHE_GPU_BUDGET_S": "280"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--cpu-dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=340,
    )
    log = (out / "figures.log").read_text() if (out / "figures.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "env.txt", "figures.json", "figures.log", "figures.md", "pytest.log", "summary.json", "summary.md",
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and all(s["status"] == "passed" for s in summary["steps"]), summary
    assert "skipped" in summary["pytest"] and "failed" not in summary["pytest"]  # collected, no CUDA here
    figures = {f["figure"]: f for f in json.loads((out / "figures.json").read_text())}
    assert sorted(figures) == ["extract-16", "extract-4", "ig-16", "model", "writer"]
    assert all(f["ok"] for f in figures.values()), figures
    for bits, cls in ((16, "Linear"), (4, "Linear4bit")):
        f = figures[f"extract-{bits}"]
        assert cls in f["linear_classes"] and f["tokens"] > 0 and f["overhead"] > 0
        assert f["not_on_node_imported"] == []  # the GPU node has no duckdb, gguf or datasets
    # qcache's IG against plain Captum on the same model: the figure also checks agreement
    assert figures["ig-16"]["max_rel_diff_vs_captum"] < 1e-2
    md = (out / "figures.md").read_text()
    assert "## Extraction" in md and "## Integrated Gradients" in md and "## Store writer alone" in md
