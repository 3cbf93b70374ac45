"""Send ``scaled_dot_product_attention`` to the agent as one fused op, forward and backward.

PyTorch picks fused attention kernels only for devices it knows; for the remote backend it
would decompose attention into matmuls and a softmax (many ops, O(L^2) memory). This
registers an autograd-level kernel that instead ships PyTorch's backend-neutral
``_scaled_dot_product_fused_attention_overrideable`` op pair, which the agent runs with
flash / memory-efficient attention (see ``agent/attention.py``).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
_lib = None


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, is_causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = (
            aten._scaled_dot_product_fused_attention_overrideable(
                q, k, v, bias, 0.0, is_causal, False, scale=scale
            )
        )
        ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
        ctx.meta = (mq, mk, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
        mq, mk, is_causal, scale = ctx.meta
        want_bias = bias is not None and ctx.needs_input_grad[3]
        gq, gk, gv, gb = aten._scaled_dot_product_fused_attention_overrideable_backward(
            grad.contiguous(),
            q,
            k,
            v,
            bias if bias is not None else q.new_empty(0),
            [True, True, True, want_bias],
            out,
            lse,
            None,
            None,
            mq,
            mk,
            0.0,
            is_causal,
            seed,
            offset,
            scale=scale,
        )
        return gq, gk, gv, gb if want_bias else None, None, None


def _attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    fusable = (
        dropout_p == 0.0
        and not enable_gqa
        and query.dim() == 4
        and key.dim() == 4
        and (attn_mask is None or attn_mask.dtype == query.dtype)
        and query.dtype == key.dtype == value.dtype
    )
    if not fusable:  # rare paths keep PyTorch's own decomposition
        return aten.scaled_dot_product_attention.default.decompose(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return _FusedAttention.apply(query, key, value, attn_mask, is_causal, scale)


def _backward_meta(grad_out, q, k, v, attn_bias, grad_input_mask, *rest, scale=None):
    gb = torch.empty_like(attn_bias) if grad_input_mask[3] else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), gb


def register() -> None:
    global _lib
    if _lib is None:
        _lib = torch.library.Library("aten", "IMPL")
        _lib.impl("scaled_dot_product_attention", _attention, "AutogradPrivateUse1")
        # Some torch releases (2.11) lack a meta kernel for the backward: without one, the
        # client would have to wait for the agent on every attention backward.
        name = "aten::_scaled_dot_product_fused_attention_overrideable_backward"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
            _lib.impl(name.split("::")[1], _backward_meta, "Meta")
