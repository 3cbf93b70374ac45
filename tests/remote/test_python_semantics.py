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


def test_data_parallel_on_the_one_gpu_trains(remote):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    for device_ids in (None, [0]):
        dp = torch.nn.DataParallel(model.cuda(), device_ids=device_ids)
        x = torch.randn(4, 3)
        y = dp(x.cuda())
        assert y.is_cuda and torch.allclose(y.cpu(), reference(x), atol=1e-6)
        y.sum().backward()
        assert model.weight.grad.is_cuda


def test_data_parallel_over_more_gpus_than_the_session_has_is_a_clear_error(remote):
    model = torch.nn.Linear(3, 2).cuda()
    # DataParallel asks for device 1's properties before scattering: either answer names it.
    with pytest.raises(RuntimeError, match=r"invalid device ordinal 1|DataParallel over 2 devices"):
        dp = torch.nn.DataParallel(model, device_ids=[0, 1])
        dp(torch.randn(4, 3, device="cuda"))


def test_a_cuda_generator_is_a_plain_error_and_cpu_generators_are_unchanged(remote):
    with pytest.raises(RuntimeError, match=r"torch.Generator\(device='cuda'\) is not available"):
        torch.Generator(device="cuda")
    g = torch.Generator().manual_seed(3)
    assert isinstance(g, torch.Generator) and isinstance(torch.default_generator, torch.Generator)
    assert torch.equal(
        torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(3))
    )
    x = torch.randn(4, generator=torch.Generator("cpu").manual_seed(0)).to("cuda")
    assert x.is_cuda
