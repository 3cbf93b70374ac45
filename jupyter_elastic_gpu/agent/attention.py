"""The agent's kernels for the fused-attention op pair the client sends (``remote/sdpa.py``).

On CUDA: flash attention for half precision without a bias, memory-efficient attention
otherwise; on the CPU: PyTorch's CPU flash kernels. The same rule picks the kernel for the
forward and the backward, so the saved state (logsumexp, RNG state) always matches.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
_lib = None


def _flash(q, bias):
    return (
        (bias is None or bias.numel() == 0)
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.size(-1) <= 256
        and q.size(-1) % 8 == 0
    )


def _none_if_empty(bias):
    return None if bias is None or bias.numel() == 0 else bias


def _aligned(bias, q, k):
    """The memory-efficient kernel wants a bias of the full (B, H, L, S) shape whose rows
    start 16-element aligned ("attn_bias: wrong shape (batch dimension)" otherwise): expand,
    pad and slice back as PyTorch's own ``preprocess_mask`` does (same values)."""
    if bias is None:
        return bias
    bias = bias.expand(q.size(0), q.size(1), q.size(2), k.size(2))
    if bias.size(-1) % 16 == 0:
        return bias
    n = bias.size(-1)
    return torch.nn.functional.pad(bias, (0, 16 - n % 16))[..., :n]


def _bias_grad(grad_out, q, k, v, bias, out, is_causal, scale):
    """The gradient of an additive attention bias (T5's learned position bias), in ``bias``'s
    own (often broadcast) shape.

    The fused kernels either cannot give it (CPU flash) or give it only for biases of the full
    (B, H, L, S) shape with aligned strides (CUDA memory-efficient): recompute the softmax
    instead. Only models that train their bias pay this O(L*S) memory, once per backward."""
    f = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf, kf, vf, g, o = (t.to(f) for t in (q, k, v, grad_out, out))
    scale = q.size(-1) ** -0.5 if scale is None else scale
    s = qf @ kf.transpose(-2, -1) * scale + bias.to(f)
    if is_causal:
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    ds = p * (g @ vf.transpose(-2, -1) - (g * o).sum(-1, keepdim=True))
    return ds.sum_to_size(bias.shape).to(bias.dtype)


def cuda_forward(
    q, k, v, attn_bias=None, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None
):
    if _flash(q, attn_bias):
        out, lse, _, _, mq, mk, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )
        return out, lse, None, None, mq, mk, rng, unused, None
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, _aligned(_none_if_empty(attn_bias), q, k), True, dropout_p, is_causal, scale=scale
    )
    return out, lse, None, None, q.size(2), k.size(2), seed, offset, None


def cuda_backward(
    grad_out,
    q,
    k,
    v,
    attn_bias,
    grad_input_mask,
    out,
    lse,
    cum_q,
    cum_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    seed,
    offset,
    *,
    scale=None,
):
    bias = _none_if_empty(attn_bias)
    if _flash(q, bias):
        gq, gk, gv = aten._scaled_dot_product_flash_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            cum_q,
            cum_k,
            max_q,
            max_k,
            dropout_p,
            is_causal,
            seed,
            offset,
            scale=scale,
        )
        return gq, gk, gv, q.new_empty(0)
    gq, gk, gv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad_out,
        q,
        k,
        v,
        _aligned(bias, q, k),
        out,
        lse,
        seed,
        offset,
        dropout_p,
        [*grad_input_mask[:3], False],
        is_causal,
        scale=scale,
    )
    return (
        gq,
        gk,
        gv,
        _wanted_bias_grad(grad_out, q, k, v, bias, out, grad_input_mask, is_causal, scale),
    )


def _wanted_bias_grad(grad_out, q, k, v, bias, out, grad_input_mask, is_causal, scale):
    if bias is None or not grad_input_mask[3]:
        return q.new_empty(0)
    return _bias_grad(grad_out, q, k, v, bias, out, is_causal, scale)


def cpu_forward(
    q, k, v, attn_bias=None, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None
):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_bias, scale=scale
    )
    empty = q.new_empty(0)
    return out, lse, None, None, q.size(2), k.size(2), empty, empty, None


def cpu_backward(
    grad_out,
    q,
    k,
    v,
    attn_bias,
    grad_input_mask,
    out,
    lse,
    cum_q,
    cum_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    seed,
    offset,
    *,
    scale=None,
):
    gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        dropout_p,
        is_causal,
        attn_mask=_none_if_empty(attn_bias),
        scale=scale,
    )
    bias = _none_if_empty(attn_bias)
    return (
        gq,
        gk,
        gv,
        _wanted_bias_grad(grad_out, q, k, v, bias, out, grad_input_mask, is_causal, scale),
    )


def register(device_kind: str) -> None:
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("aten", "IMPL")
    key = "CUDA" if device_kind == "cuda" else "CPU"
    fwd, bwd = (cuda_forward, cuda_backward) if key == "CUDA" else (cpu_forward, cpu_backward)
    _lib.impl("_scaled_dot_product_fused_attention_overrideable", fwd, key)
    _lib.impl("_scaled_dot_product_fused_attention_overrideable_backward", bwd, key)
