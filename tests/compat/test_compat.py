"""Ordinary programs run unchanged on the remote GPU and give the answers they give natively.

Each program in ``programs/`` is run twice, as a user would run it: plainly (``python
prog.py``: the CPU here, the GPU on a GPU machine) and through ``jupyter-elastic-gpu run
--gpu 1 --agent ...`` against the test agent, with CUDA hidden from the process as on a CPU
node. Both print one ``COMPAT-RESULT`` line; the values must agree (floats within the
program's tolerance, widened when a real GPU is on one side), and what the program reports as
its device must be ``cuda`` in the remote run.

A program whose library is not installed (or does not import, as PyPI's CUDA torchvision on a
CPU torch) is skipped naming it; the libraries CI installs are in the ``test`` extra.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import AGENT_DEVICE

PROGRAMS = Path(__file__).parent / "programs"
NATIVE_GPU = AGENT_DEVICE == "cuda"  # on a GPU machine "natively" means on its GPU
WIDEN = 20.0 if NATIVE_GPU else 1.0  # the GPU's kernels differ from the CPU agent's
TIMEOUT = 600


def _programs():
    found = sorted(p for p in PROGRAMS.glob("*.py") if not p.name.startswith("_"))
    return found + [PROGRAMS / "multifile" / "train.py"]


def _third_party_imports(path: Path) -> set[str]:
    """Top-level modules the program imports that are neither stdlib, torch, nor its own."""
    tree = ast.parse(path.read_text())
    own = {p.stem for p in path.parent.glob("*.py")} | {"_compat", "_tiny_tokenizer"}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "torch"} - own


@functools.cache
def _import_error(module: str) -> str | None:
    """Why ``module`` cannot be imported by a program here (in a fresh interpreter: a broken
    install such as a CUDA-only torchvision must not take this process down), or None."""
    r = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        if not NATIVE_GPU
        else None,
    )
    if r.returncode == 0:
        return None
    lines = (r.stderr or "").strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def _env(hide_cuda: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU_")}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # programs build models from configs, never download
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _result(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPAT-RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"{what} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("COMPAT-RESULT ") :])


def _start(cmd: list[str], cwd: Path, hide_cuda: bool) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(hide_cuda), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += f"\n[timed out after {TIMEOUT} s]"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _compare(native, remote, *, rtol, atol, unchecked, path="values"):
    """Assert ``remote`` matches ``native``; returns nothing, names the first difference."""
    key = path.rsplit(".", 1)[-1]
    if key in unchecked:  # drawn from a device's own generator: same kind and shape only
        assert type(native) is type(remote), path
        if isinstance(native, list):
            assert _shape(native) == _shape(remote), path
        return
    if key.endswith("device") and isinstance(native, str):
        assert remote.startswith("cuda"), f"{path}: the remote run reported {remote!r}"
        assert native.startswith("cuda" if NATIVE_GPU else "cpu"), f"{path}: native {native!r}"
        return
    if isinstance(native, dict):
        assert isinstance(remote, dict) and native.keys() == remote.keys(), (
            f"{path}: keys {sorted(native)} vs {sorted(remote)}"
        )
        for k in native:
            _compare(
                native[k], remote[k], rtol=rtol, atol=atol, unchecked=unchecked, path=f"{path}.{k}"
            )
    elif isinstance(native, list):
        assert isinstance(remote, list) and len(native) == len(remote), (
            f"{path}: {native!r} vs {remote!r}"
        )
        for i, (a, b) in enumerate(zip(native, remote, strict=True)):
            _compare(a, b, rtol=rtol, atol=atol, unchecked=unchecked, path=f"{path}[{i}]")
    elif isinstance(native, float) and not isinstance(native, bool):
        assert isinstance(remote, (int, float)), f"{path}: {remote!r}"
        assert math.isclose(native, remote, rel_tol=rtol, abs_tol=atol) or (
            math.isnan(native) and math.isnan(remote)
        ), f"{path}: native {native!r} vs remote {remote!r} (rtol {rtol}, atol {atol})"
    else:
        assert native == remote, f"{path}: native {native!r} vs remote {remote!r}"


def _shape(x):
    return [len(x), *(_shape(x[0]) if x and isinstance(x[0], list) else [])]


@pytest.mark.parametrize(
    "program", _programs(), ids=lambda p: str(p.relative_to(PROGRAMS)).removesuffix(".py")
)
def test_program_runs_unchanged(program: Path, agent):
    missing = {m: e for m in sorted(_third_party_imports(program)) if (e := _import_error(m))}
    if missing:
        pytest.skip("; ".join(f"{m} does not import here ({e})" for m, e in missing.items()))
    py = [sys.executable, program.name]
    native = _start(py, program.parent, hide_cuda=not NATIVE_GPU)
    remote = _start(
        [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu",
            "run",
            "--gpu",
            "1",
            "--agent",
            agent.address,
            "--",
            *py,
        ],
        program.parent,
        hide_cuda=True,
    )
    native_result = _result(_finish(native), "native")
    remote_result = _result(_finish(remote), "remote")
    _compare(
        native_result["values"],
        remote_result["values"],
        rtol=native_result["rtol"] * WIDEN,
        atol=native_result["atol"] * WIDEN,
        unchecked=set(native_result["unchecked"]),
    )
