"""Python's own protocols on remote tensors behave as on CUDA tensors."""

from __future__ import annotations

import pytest
import torch


def test_scalars_format_like_numbers(remote):
    loss = torch.tensor(1.23456, device="cuda")
    assert f"{loss:.3f}" == "1.235"
    assert format(loss, ".2e") == "1.23e+00"
    assert "{:>8.2f}".format(loss) == "    1.23"  # noqa: UP032 - the spelling under test
    assert "%.2f" % loss == "1.23"  # noqa: UP031 - the spelling under test
    assert f"{torch.tensor(7, device='cuda'):03d}" == "007"
    assert f"{loss}" == f"{torch.tensor(1.23456)}" == str(loss.item())  # as torch does


def test_tensors_with_dimensions_format_as_torch_does_on_the_cpu(remote):
    for shape in ((3,), (1,), (2, 2)):
        cpu = torch.ones(shape)
        with pytest.raises(TypeError) as cpu_error:
            format(cpu, ".3f")
        with pytest.raises(TypeError) as remote_error:
            format(cpu.cuda(), ".3f")
        assert str(remote_error.value) == str(cpu_error.value)
    x = torch.ones(2, device="cuda")
    assert f"{x}" == str(x) == "tensor([1., 1.], device='cuda:0')"
