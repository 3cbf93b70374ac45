"""Checkpoints of remote tensors are CUDA checkpoints: saved as ``cuda:N``, loaded back there.

A file saved from the remote GPU is the file a real GPU would write: its storages carry the
location tag ``cuda:N``, so it loads as CUDA tensors on a CUDA machine and fails on a
CPU-only one as any CUDA checkpoint does (until ``map_location="cpu"``). In a process
attached to a remote GPU, ``torch.load`` restores ``cuda`` storages onto it, whatever
``map_location`` said to get there (none, ``"cuda:0"``, a dict, a callable that returns
``None``), with ``weights_only`` too.

Both halves are torch's own extension points: a location tagger/deserializer pair
(``torch.serialization.register_package``) and the tensor rebuild function the pickle names,
``torch._utils._rebuild_tensor_v2``; files stay plain torch files that name nothing of ours.
"""

from __future__ import annotations

import collections
import functools

import torch
import torch._utils
import torch.serialization

from . import backend

# Set on the CPU storages that carry remote data through a save or a load.
_LOCATION = "_egpu_location"  # save: the tag to write ("cuda:0")
_INDEX = "_egpu_index"  # load: which of the session's GPUs the storage goes to
_BASE = "_egpu_base"  # load: the storage, uploaded once, that its tensors view

_original_rebuild = torch._utils._rebuild_tensor_v2


def reduce_remote(t):
    """Pickle a remote tensor as torch pickles a CUDA one: its whole storage, tagged cuda:N."""
    hooks = collections.OrderedDict()  # never saved (torch's Note [Don't serialize hooks])
    if getattr(t, "_is_param", False):
        return (torch._utils._rebuild_parameter, (t.detach(), t.requires_grad, hooks))
    n = t._nbytes // t.element_size() if t.element_size() else 0
    with torch.no_grad():
        local = t.detach().as_strided((n,), (1,), 0).cpu()
    storage = local.untyped_storage()
    setattr(storage, _LOCATION, f"cuda:{t._idx}")
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=t.dtype, _internal=True)
    args = (typed, t.storage_offset(), tuple(t.size()), t.stride(), t.requires_grad, hooks)
    return (_rebuild_tensor_v2, args)


def _tag(storage):
    return getattr(storage, _LOCATION, None)


def _deserialize(storage, location):
    """Keep a ``cuda`` storage on the CPU, marked for the remote GPU, while attached."""
    if backend._session is None or not location.startswith("cuda"):
        return None  # torch's own CUDA deserializer says what it says on a CPU-only machine
    index = torch.device(location).index or 0
    count = len(backend._session.devices)
    if index >= count:
        raise RuntimeError(
            f"Attempting to deserialize object on CUDA device {index} but this session has "
            f"{count} remote GPU(s). Please use torch.load with map_location to map your "
            "storages to an existing device."
        )
    setattr(storage, _INDEX, index)
    return storage


@functools.wraps(_original_rebuild)
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, *rest, **kw):
    untyped = getattr(storage, "_untyped_storage", storage)
    index = getattr(untyped, _INDEX, None)
    if index is None:
        return _original_rebuild(storage, storage_offset, size, stride, requires_grad, *rest, **kw)
    # One upload per storage: tensors that shared it on the GPU share it again.
    base = getattr(untyped, _BASE, None)
    if base is None or base.dtype != storage.dtype:
        local = torch.empty(0, dtype=storage.dtype).set_(untyped)
        base = local.to(torch.device(backend.BACKEND, index))
        setattr(untyped, _BASE, base)
    with torch.no_grad():
        tensor = base.as_strided(size, stride, storage_offset)
    return tensor.requires_grad_(requires_grad)


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    # Before torch's own cuda entry (20) and the CPU one (10).
    torch.serialization.register_package(0, _tag, _deserialize)
    torch._utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    # weights_only loads resolve rebuild functions through a cached table of torch's.
    from torch import _weights_only_unpickler

    _weights_only_unpickler._get_allowed_globals.cache_clear()
    _installed = True
