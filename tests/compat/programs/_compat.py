"""What every compat program shares: its device, and one JSON line of results.

Programs are written the way users write them (``device = "cuda" if available``); the
runner (``tests/compat/test_compat.py``) runs each on the CPU and through
``jupyter-elastic-gpu run`` and compares the ``COMPAT-RESULT`` lines. Nothing here may
import Jupyter: the lead runs these on a GPU machine that has only torch and the libraries.
"""

from __future__ import annotations

import json

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def seed(n: int = 0) -> None:
    """Seed the CPU generator: models are initialised and data drawn on the CPU, before
    ``.to(DEVICE)``, so both runs start from the same numbers (the remote GPU's generator is
    not the client's CPU generator)."""
    torch.manual_seed(n)


def checksum(model: torch.nn.Module) -> float:
    """One number that moves when any parameter does."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().cpu() for p in model.parameters()))


def report(values: dict, *, rtol: float = 1e-4, atol: float = 1e-5, unchecked=()) -> None:
    """Print the results the runner compares.

    ``rtol``/``atol``: for floats, CPU vs a CPU agent (same kernels, different op order);
    the runner widens them when a real GPU is on one side. ``unchecked``: keys whose values
    come from a device's own random generator, compared by type and shape only."""
    print(
        "COMPAT-RESULT "
        + json.dumps(
            {"values": values, "rtol": rtol, "atol": atol, "unchecked": sorted(unchecked)}
        ),
        flush=True,
    )
