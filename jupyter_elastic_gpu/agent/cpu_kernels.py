"""CPU kernels for the few CUDA-only ops a client may send, so ``--device cpu`` runs the same streams.

The client takes the paths a non-CPU device takes (e.g. the fused LSTM cell), so a CPU agent
must answer ops that stock PyTorch implements only for CUDA. Formulas follow the CUDA kernels
in ``aten/src/ATen/native/cuda/RNN.cu``.
"""

from __future__ import annotations

import torch

_lib = None


def _fused_lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    gates = input_gates + hidden_gates
    if input_bias is not None:
        gates = gates + input_bias + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], 1)


def _fused_lstm_cell_backward_impl(grad_hy, grad_cy, cx, cy, workspace, has_bias):
    i, f, g, o = workspace.chunk(4, 1)
    tanh_cy = cy.tanh()
    gcy = grad_cy if grad_cy is not None else torch.zeros_like(cy)
    go = torch.zeros_like(o)
    if grad_hy is not None:
        gcy = gcy + grad_hy * o * (1 - tanh_cy * tanh_cy)
        go = grad_hy * tanh_cy
    grad_gates = torch.cat(
        [gcy * g * i * (1 - i), gcy * cx * f * (1 - f), gcy * i * (1 - g * g), go * o * (1 - o)], 1
    )
    grad_bias = grad_gates.sum(0) if has_bias else None
    return grad_gates, gcy * f, grad_bias


def _fused_gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    if input_bias is not None:
        input_gates, hidden_gates = input_gates + input_bias, hidden_gates + hidden_bias
    ir, ii, in_ = input_gates.chunk(3, 1)
    hr, hi, hn = hidden_gates.chunk(3, 1)
    r, z = (ir + hr).sigmoid(), (ii + hi).sigmoid()
    n = (in_ + r * hn).tanh()
    hy = n + z * (hx - n)
    return hy, torch.cat([r, z, n, hx, hn], 1)


def _fused_gru_cell_backward(grad_hy, workspace, has_bias):
    r, z, n, hx, hn = workspace.chunk(5, 1)
    gn = grad_hy * (1 - z) * (1 - n * n)
    gz = grad_hy * (hx - n) * z * (1 - z)
    gr = gn * hn * r * (1 - r)
    grad_input_gates = torch.cat([gr, gz, gn], 1)
    grad_hidden_gates = torch.cat([gr, gz, gn * r], 1)
    grad_hx = grad_hy * z
    gib = grad_input_gates.sum(0) if has_bias else None
    ghb = grad_hidden_gates.sum(0) if has_bias else None
    return grad_input_gates, grad_hidden_gates, grad_hx, gib, ghb


def register() -> None:
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("aten", "IMPL")
    _lib.impl("_thnn_fused_lstm_cell", _fused_lstm_cell, "CPU")
    _lib.impl("_thnn_fused_lstm_cell_backward_impl", _fused_lstm_cell_backward_impl, "CPU")
    _lib.impl("_thnn_fused_gru_cell", _fused_gru_cell, "CPU")
    _lib.impl("_thnn_fused_gru_cell_backward", _fused_gru_cell_backward, "CPU")
