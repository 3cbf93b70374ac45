"""``torch.autocast("cuda")`` for the remote backend: CUDA's cast policy, registered in Python.

PyTorch ships autocast kernels for CUDA and CPU but none for PrivateUse1, so without these
an op under autocast on a remote tensor has no kernel at all. The op lists follow
``aten/src/ATen/autocast_mode.cpp``: matmul-like ops run in the autocast dtype, numerically
sensitive ones in float32, and multi-input ops promote to the widest input type. The casts
happen above autograd, so backward sees them exactly as on a real GPU.
"""

from __future__ import annotations

import torch

from .backend import BACKEND

LOWER_PRECISION = [
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "einsum",
    "mm",
    "mv",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "_convolution",
    "convolution",
    "prelu",
    "conv_tbc",
    "scaled_dot_product_attention",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
]
FLOAT32 = [
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "group_norm",
    "frobenius_norm",
    "nuclear_norm",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "softmax",
    "log_softmax",
    "cross_entropy_loss",
    "cumsum",
    "cumprod",
    "prod",
    "sum",
    "norm",
]
PROMOTE = [
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "grid_sampler",
    "index_put",
    "scatter_add",
    "tensordot",
    "stack",
    "cat",
    "index_copy",
]

_KEY = "AutocastPrivateUse1"
_lib = None


def _is_castable(t):
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type in (BACKEND, "cuda")
    )


def _cast(v, dtype):
    if _is_castable(v):
        return v.to(dtype) if v.dtype != dtype else v
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(x, dtype) for x in v)
    return v


def _widest(v, best=None):
    if _is_castable(v):
        return v.dtype if best is None else torch.promote_types(best, v.dtype)
    if isinstance(v, (list, tuple)):
        for x in v:
            best = _widest(x, best)
    return best


def _kernel(op, policy):
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    def autocast_kernel(*args, **kwargs):
        if policy == "lower":
            dtype = torch._C.get_autocast_dtype(BACKEND)  # torch's own, not the facade's
        elif policy == "fp32":
            dtype = torch.float32
        else:
            dtype = _widest((args, list(kwargs.values())))
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            if dtype is not None:
                args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
            return op(*args, **kwargs)

    return autocast_kernel


def register() -> None:
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("aten", "IMPL")
    for names, policy in ((LOWER_PRECISION, "lower"), (FLOAT32, "fp32"), (PROMOTE, "promote")):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is None:
                continue
            for overload in packet.overloads():
                if "out" in overload:
                    continue
                op = getattr(packet, overload)
                try:
                    _lib.impl(
                        op._schema.name.split("::")[1]
                        + ("." + overload if overload != "default" else ""),
                        _kernel(op, policy),
                        _KEY,
                    )
                except RuntimeError:  # already has a kernel for this key
                    pass
    fallthrough = torch.library.Library("_", "IMPL")
    fallthrough.fallback(torch.library.fallthrough_kernel, _KEY)
    register._fallthrough = fallthrough
