"""PyTorch's OpInfo database, run through the remote device, keeps its recorded pass rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import AGENT_DEVICE

HERE = Path(__file__).parent


def test_opinfo_float32_pass_rate_holds_the_baseline(agent, tmp_path):
    out = tmp_path / "sweep.json"
    md = tmp_path / "opinfo-coverage.md"
    p = subprocess.run(
        [
            sys.executable,
            str(HERE / "opinfo_sweep.py"),
            agent.address,
            str(out),
            "--markdown",
            str(md),
            "--agent-device",
            AGENT_DEVICE,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    baselines = json.loads((HERE / "opinfo_baseline.json").read_text())
    # A CUDA agent is compared with the CPU reference too: CUDA-vs-CPU semantics (no CUDA
    # histogram, fused attention's rounding, eval-mode batch-norm statistics) cost it a little.
    baseline = baselines.get(f"float32-{AGENT_DEVICE}", baselines["float32"])["pass_rate"]
    artifacts = Path(os.environ.get("ELASTIC_GPU_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(exist_ok=True)
    (artifacts / f"opinfo-coverage-{AGENT_DEVICE}.md").write_text(md.read_text())
    assert summary["passed"] > 1500, summary
    assert summary["pass_rate"] >= baseline, f"OpInfo pass rate fell below the baseline: {summary}"
