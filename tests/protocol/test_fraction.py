"""GPUFraction: the one definition of a GPU fraction that broker, provisioner, client and agent use."""

import json
import math

import pytest

from jupyter_elastic_gpu.protocol.fraction import GPUFraction, occupancy


@pytest.mark.parametrize(
    "value, gpus, per_gpu",
    [(0.25, 1, 0.25), ("0.5", 1, 0.5), (1, 1, 1.0), (2, 2, 1.0), (4.0, 4, 1.0), (0.1 + 0.2, 1, 0.3)],
)
def test_shares_and_whole_gpus_are_fractions(value, gpus, per_gpu):
    f = GPUFraction(value)
    assert isinstance(f, float) and f.gpus == gpus and math.isclose(f.per_gpu, per_gpu)
    assert json.loads(json.dumps({"f": f})) == {"f": float(f)}  # sent as a plain number
    assert f"{f:g}" == f"{float(f):g}" and f"{f}" == f"{float(f)}"


@pytest.mark.parametrize(
    "value, words",
    [
        (0, "fits no GPU"),
        (-0.5, "fits no GPU"),
        (1.5, "fits no GPU"),
        (float("nan"), "fits no GPU"),
        (float("inf"), "fits no GPU"),
        ("half", "must be a number"),
        (True, "must be a number"),
        (None, "must be a number"),
        ([0.5], "must be a number"),
    ],
)
def test_anything_else_is_refused_naming_the_value(value, words):
    with pytest.raises(ValueError, match=words):
        GPUFraction(value, "gpu")


def test_comparisons_tolerate_float_sums():
    assert GPUFraction(0.3).fits(0.1 + 0.2) and GPUFraction(0.3).same(0.1 + 0.2)
    assert not GPUFraction(0.5).fits(0.25)
    assert occupancy([0.5, 0.25]) == 0.75 and occupancy([2, 0.5]) == 1.0
