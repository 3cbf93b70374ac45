"""The GPU fraction a session asks for (``0.5``, ``1``, ``2``), checked in one place.

A fraction is either a share of one GPU (``0 < f <= 1``) or a whole number of GPUs (``2``,
``4``, ...); nothing else fits a GPU. Broker, provisioner, kernelspecs, remote client and agent
all build one with ``GPUFraction(value)`` where a value enters from outside (config, a request
body, an environment variable, a lease token), and read its geometry from it, so the rules and
the float tolerance exist once.
"""

from __future__ import annotations

import math

# Tolerance of fraction arithmetic: sums of shares such as 0.1 + 0.2 must still fit 0.3.
EPS = 1e-9


class GPUFraction(float):
    """A valid GPU fraction; a ``float``, so it is stored, compared and sent as one."""

    def __new__(cls, value, what: str = "GPU fraction"):
        if isinstance(value, GPUFraction):
            return value
        # bool is an int to Python, and "gpu": true in a kernelspec is no fraction.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{what} must be a number, not {type(value).__name__} {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{what} must be a number, not {value!r}") from None
        if not (math.isfinite(f) and f > 0 and (f <= 1 + EPS or abs(f - round(f)) < EPS)):
            raise ValueError(
                f"{what} {f:g} fits no GPU: use a share of one GPU (0 < f <= 1) "
                "or a whole number of GPUs (2, 4, ...)"
            )
        return super().__new__(cls, round(f) if f > 1 + EPS else min(f, 1.0))

    @property
    def gpus(self) -> int:
        """How many GPUs it spans: one for a share, else the whole number."""
        return 1 if self <= 1 else int(self)

    @property
    def per_gpu(self) -> float:
        """Its share of each GPU it spans (memory cap, MPS percentage, pool occupancy)."""
        return min(float(self), 1.0)

    def fits(self, room: float) -> bool:
        """Whether it fits within ``room`` GPUs (a limit, a GPU's free share), within EPS."""
        return self <= room + EPS

    def same(self, other: float) -> bool:
        return abs(self - other) < EPS


def occupancy(shares) -> float:
    """How much of one GPU the given fractions held on it take (at most all of it)."""
    return min(1.0, sum(min(float(f), 1.0) for f in shares))
