"""Tensor layouts on the agent are the layouts the client believes in.

The client gives queued ops' outputs the strides meta inference computes; where a real kernel
lays its output out differently, anything that reads strides (``as_strided``, a kernel that
checks its input's memory format) would see one tensor on the client and another on the GPU.
"""

import torch
import torch.nn.functional as F

CL = torch.channels_last


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """The elements in the order they lie in memory, read through the tensor's own strides."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def test_a_convolution_of_a_channels_last_input_is_channels_last_as_with_cudnn(remote):
    x = torch.randn(2, 16, 8, 8).to(memory_format=CL)
    w = torch.randn(32, 16, 3, 3)
    y = F.conv2d(x.cuda(), w.cuda(), padding=1)
    assert y.is_contiguous(memory_format=CL)
    local = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(y.cpu(), local, rtol=1e-4, atol=1e-4)
    # The agent's bytes are in the order the client's strides say.
    as_client_sees = torch.empty_strided(y.shape, y.stride()).copy_(local)
    torch.testing.assert_close(
        _storage_order(y).cpu(), _storage_order(as_client_sees), rtol=1e-4, atol=1e-4
    )


def test_a_contiguous_convolution_stays_contiguous(remote):
    x, w = torch.randn(2, 16, 8, 8), torch.randn(32, 16, 3, 3)
    y = F.conv2d(x.cuda(), w.cuda(), padding=1)
    assert y.is_contiguous()
    torch.testing.assert_close(
        _storage_order(y).cpu(), F.conv2d(x, w, padding=1).flatten(), rtol=1e-4, atol=1e-4
    )


def test_group_norm_of_a_batch_of_one_in_channels_last_after_an_elementwise_op(remote):
    # diffusers' attention block: a transposed view reshaped to NCHW (channels_last strides),
    # then a residual add and a rescale; batch 1 leaves the batch stride to each kernel's taste.
    seq = torch.randn(1, 64, 32)
    res = torch.randn(1, 32, 8, 8)
    gn = torch.nn.GroupNorm(8, 32)

    def block(seq, res, gn):
        h = seq.transpose(-1, -2).reshape(1, 32, 8, 8)
        return gn((h + res) / 1.0)

    out = block(seq.cuda(), res.cuda(), gn.cuda())
    torch.testing.assert_close(out.cpu(), block(seq, res, gn.cpu()), rtol=1e-4, atol=1e-5)
