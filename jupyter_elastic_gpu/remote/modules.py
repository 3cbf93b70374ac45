"""``Module.to("cuda")`` keeps parameter identity, as it does on a real GPU.

On CUDA, ``Module._apply`` moves a parameter with ``param.data = moved`` (CPU and CUDA
tensors are shallow-copy compatible), so the ``Parameter`` object survives the move:
optimizers built before ``.cuda()`` keep updating the model's weights and tied weights stay
one object. A wrapper subclass cannot take that route (``.data =`` would copy the C++
metadata but not the Python attributes naming the agent's tensor), and torch would make a
new ``Parameter``, silently breaking both. ``torch.utils.swap_tensors`` keeps the object
while changing everything else, so moves onto, off or within the remote backend run with
torch's own swap path (``torch.__future__.set_swap_module_params_on_conversion``) turned on
for just those modules. Buffers are replaced by new tensors, as ``_apply`` does on CUDA.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

_original_apply = nn.Module._apply


def _is_remote(t) -> bool:
    from .backend import RemoteTensor

    return isinstance(t, RemoteTensor)


@functools.wraps(_original_apply)
def _apply(self, fn, recurse=True):
    if recurse:
        for module in self.children():
            module._apply(fn)
    params = [p for p in self._parameters.values() if p is not None]
    if not params:
        return _original_apply(self, fn, recurse=False)
    # Convert the module's own parameters once, here, to see whether the move touches the
    # remote backend; torch's _apply then gets those results instead of converting again.
    with torch.no_grad():
        applied = [fn(p) for p in params]
    swap = any(
        new is not p and (_is_remote(p) or _is_remote(new)) for p, new in zip(params, applied, strict=True)
    )
    if swap and any(weakref.getweakrefs(p) or p._use_count() > 1 for p in params):
        # swap_tensors refuses weakly referenced tensors and ones a live autograd graph holds
        # (an output of the model not yet backwarded): a new Parameter, as torch makes for
        # tensor types it cannot swap, is the next best thing.
        swap = False
    done = {id(p): new for p, new in zip(params, applied, strict=True)}
    del applied

    def convert(t):
        new = done.pop(id(t), None)
        return fn(t) if new is None else new

    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(previous or swap)
    try:
        return _original_apply(self, convert, recurse=False)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def _scatter(original):
    # nn.DataParallel scatters its inputs even onto one device; torch's scatter is a CUDA
    # kernel (torch._C._scatter) this client does not have, and for one device a copy is all
    # it does.
    @functools.wraps(original)
    def scatter(tensor, devices=None, chunk_sizes=None, dim=0, streams=None, *, out=None):
        if not _is_remote(tensor) and not (devices and out is None):
            return original(tensor, devices, chunk_sizes, dim, streams, out=out)
        devices = [torch.device(d).index or 0 if not isinstance(d, int) else d for d in devices]
        if len(devices) != 1 or out is not None:
            raise RuntimeError(
                f"nn.DataParallel over {len(devices)} devices {devices} is not supported on the "
                "remote GPU: use one device (device_ids=[0]) or DistributedDataParallel"
            )
        return (tensor.to(torch.device("cuda", devices[0])),)

    return scatter


def install() -> None:
    nn.Module._apply = _apply
    from torch.nn.parallel import comm

    comm.scatter = _scatter(comm.scatter)
