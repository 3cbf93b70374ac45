"""An additive attention bias that trains (T5's relative position bias) gets its gradient.

Regression: the agent's fused-attention backward returned an empty tensor for the bias
gradient, so the next op on it (T5's ``WhereBackward0``) failed with "size of tensor a (8)
must match the size of tensor b (0) at non-singleton dimension 3".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import AGENT_DEVICE

TOL = dict(rtol=1e-4, atol=1e-5) if AGENT_DEVICE == "cpu" else dict(rtol=2e-3, atol=2e-4)


def _grads(device, q, k, v, bias):
    leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v, bias)]
    out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
    (out * torch.arange(out.numel(), device=device).view_as(out).sin()).sum().backward()
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("bias_shape", [(1, 4, 6, 8), (2, 4, 6, 8), (6, 8)])
def test_a_broadcast_bias_gets_the_same_gradient_as_locally(remote, bias_shape):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    bias = torch.randn(bias_shape)
    local = _grads("cpu", q, k, v, bias)
    on_gpu = _grads("cuda", q, k, v, bias)
    for name, a, b in zip(["out", "q", "k", "v", "bias"], local, on_gpu, strict=True):
        assert b.shape == a.shape, name
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_a_bias_that_does_not_train_costs_no_gradient(remote):
    q = torch.randn(1, 2, 4, 8, device="cuda", requires_grad=True)
    bias = torch.randn(1, 2, 4, 4, device="cuda")
    F.scaled_dot_product_attention(q, q, q, attn_mask=bias).sum().backward()
    assert q.grad.shape == q.shape and bias.grad is None
