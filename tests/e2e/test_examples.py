"""The example notebooks run top to bottom with nbclient in a "Python 3 (GPU: 0.5)" kernel on
a CPU agent, in single-user mode (``ELASTIC_GPU_AGENT``, no hub): what Binder does. And
README's ``jupyter-elastic-gpu run --gpu 0.5 --agent HOST:PORT -- python train.py`` works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from jupyter_elastic_gpu.provisioner.kernelspecs import ElasticGPUKernelSpecs
from tests.conftest import AgentProcess

from .support import EXAMPLES, text_of

NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


@pytest.fixture(scope="module")
def cpu_agent():
    a = AgentProcess("--session-grace", "2", device="cpu")
    yield a
    a.stop()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("prefix")
    app = ElasticGPUKernelSpecs()
    app.log_level = "ERROR"
    app.install([0.25, 0.5, 1], prefix=str(prefix))
    return prefix / "share" / "jupyter" / "kernels"


def test_there_are_examples():
    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-train-mnist-like.ipynb"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3-gpu-0.5"
        # shipped clean: no stale outputs
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_example_runs_on_a_cpu_agent(path, cpu_agent, kernels, monkeypatch):
    monkeypatch.setenv("ELASTIC_GPU_AGENT", cpu_agent.address)
    monkeypatch.delenv("ELASTIC_GPU_BROKER_URL", raising=False)
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(
        kernel_name=nb.metadata.kernelspec.name,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
    )
    NotebookClient(
        nb, km=km, timeout=180, resources={"metadata": {"path": str(EXAMPLES)}}
    ).execute()
    out = text_of(nb)
    assert "cuda:0" in out
    if "quickstart" in path.name:
        assert "CUDA available: True" in out and "device 0: CPU" in out
    else:
        assert "final test accuracy" in out


def test_run_command_from_the_readme(cpu_agent, tmp_path):
    train = tmp_path / "train.py"
    train.write_text(
        "import torch\n"
        "model = torch.nn.Linear(8, 1).cuda()\n"
        "opt = torch.optim.AdamW(model.parameters(), lr=0.1)\n"
        "x, y = torch.randn(64, 8, device='cuda'), torch.randn(64, 1, device='cuda')\n"
        "for _ in range(20):\n"
        "    loss = torch.nn.functional.mse_loss(model(x), y)\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
        "print('device', next(model.parameters()).device, 'loss', round(loss.item(), 3))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_")}
    r = subprocess.run(
        [sys.executable, "-m", "jupyter_elastic_gpu", "run", "--gpu", "0.5",
         "--agent", cpu_agent.address, "--", "python", str(train)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device cuda:0 loss" in r.stdout
