"""Output layouts that meta inference cannot know, decided once for client and agent.

The client gives every queued op's output the strides its meta kernel infers, and later ops
(and views of the bytes) rely on them. Meta kernels leave convolution outputs contiguous
because they have no device to ask, while cuDNN returns channels_last when an operand is
channels_last and oneDNN (a CPU agent) sometimes does even when none is. A kernel that checks
its input's layout (``native_group_norm``'s "Expected X.is_contiguous") then fails on the
agent only. So both ends apply :func:`conv_output_format`: the client to its meta result, the
agent by converting a real output that disagrees (on a GPU that is the rare case).

Strides of size-1 dimensions differ too: TensorIterator (the agent's real kernels) and the
Python reference rules behind many meta kernels lay a batch of one out differently. They
address the same bytes, but ``suggest_memory_format`` reads them, and a kernel that asserts
its input is contiguous in the suggested format (``native_group_norm``) refuses on the agent
what the client's meta tensor passed (and a CUDA agent may hold channels_last where the
client's meta tensor was contiguous). :func:`dense_input` gives such kernels the layout the
client's check accepted.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
CONVOLUTIONS = frozenset({aten.convolution.default, aten._convolution.default})
LAYOUT_CHECKED = frozenset({aten.native_group_norm.default})
# Kernels that read two tensors as if laid out alike and do not check it: the CPU kernel of
# native_group_norm_backward walks dy with x's memory format, so a channels_last dy beside a
# contiguous x gives a wrong gradient, silently. Autograd asks for both ``.contiguous()`` on
# a device other than the CPU (the client's remote device), a no-op by the client's meta
# strides; the agent's dy may still be channels_last (oneDNN's convolution_backward returns
# it so), so the agent makes both contiguous for real.
BOTH_CONTIGUOUS = frozenset({aten.native_group_norm_backward.default})


def conv_output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """cuDNN's rule: channels_last when the input or the weight is laid out that way."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is None:
        return torch.contiguous_format
    for t in (x, weight):
        if t.dim() == x.dim() and not t.is_contiguous() and t.is_contiguous(memory_format=cl):
            return cl
    return torch.contiguous_format


def conform(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out`` with exactly the strides the rule gives for its shape (a copy only if needed)."""
    fmt = conv_output_format(x, weight)
    want = torch.empty(out.shape, device="meta", memory_format=fmt).stride()
    if out.stride() == want:
        return out
    return torch.empty_strided(out.shape, want, dtype=out.dtype, device=out.device).copy_(out)


def dense_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` restrided (same bytes, no copy) so that a channels_last-dense tensor also has
    channels_last strides in its size-1 dimensions, which is what the client's meta tensor had
    when it decided that ``x`` needed no ``.contiguous()`` first."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.is_contiguous():
        return x
    if x.device.type != "cpu":
        # The CUDA kernel wants the standard layout (the client's composite thought its meta
        # tensor had it); a copy when the agent's elementwise kernels chose channels_last.
        return x.contiguous()
    cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if not x.is_contiguous(memory_format=cl):
        return x
    want = torch.empty(x.shape, device="meta", memory_format=cl).stride()
    return x.as_strided(x.shape, want, x.storage_offset())
