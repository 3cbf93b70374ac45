"""Which ops an agent runs: aten, prims and torchvision's tensor kernels; nothing else."""

import importlib.util

import pytest
import torch

from jupyter_elastic_gpu.agent.executor import OpResolver

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def test_aten_ops_resolve_to_their_overloads():
    assert OpResolver()("aten::add.Tensor") is torch.ops.aten.add.Tensor


@pytest.mark.parametrize(
    "name",
    [
        "image::decode_png.default",
        "profiler::_record_function_enter.default",
        "c10d::broadcast_.default",
    ],
)
def test_other_namespaces_are_refused_by_name(name):
    with pytest.raises(PermissionError, match="outside the allowed namespaces"):
        OpResolver()(name)


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here")
def test_a_torchvision_op_on_an_agent_without_torchvision_says_so():
    with pytest.raises(NotImplementedError, match="needs torchvision on the GPU agent"):
        OpResolver()("torchvision::nms.default")


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed here")
def test_torchvision_ops_resolve_once_torchvision_is_imported_on_first_use():
    op = OpResolver()("torchvision::nms.default")
    assert op is torch.ops.torchvision.nms.default
