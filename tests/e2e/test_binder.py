"""binder/: the environment pins the CPU torch, postBuild installs the package and kernels,
and ``start`` brings up a CPU agent that ``ELASTIC_GPU_AGENT`` points at before the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import yaml

from .support import REPO, free_port

BINDER = REPO / "binder"


def test_environment_pins_cpu_torch():
    env = yaml.safe_load((BINDER / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    (pip,) = [d["pip"] for d in deps if isinstance(d, dict)]
    assert "torch==2.13.0+cpu" in pip
    assert any("download.pytorch.org/whl/cpu" in p for p in pip)


def test_post_build_and_start_are_executable_scripts():
    for name in ("postBuild", "start"):
        path = BINDER / name
        assert os.access(path, os.X_OK), f"binder/{name} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash")
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    post = (BINDER / "postBuild").read_text()
    assert "pip install" in post and "kernelspecs install" in post


def test_start_runs_a_cpu_agent_then_the_command(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    probe = (
        "import os; from jupyter_elastic_gpu.protocol.client import query_inventory; "
        "inv = query_inventory(os.environ['ELASTIC_GPU_AGENT']); print('agent', inv['agent']['device'])"
    )
    env = dict(os.environ, ELASTIC_GPU_AGENT=address, ELASTIC_GPU_AGENT_LOG=str(tmp_path / "a.log"))
    proc = subprocess.Popen(
        [str(BINDER / "start"), sys.executable, "-c", probe],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the agent start left running
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out
    assert "agent cpu" in out, out + (tmp_path / "a.log").read_text()
