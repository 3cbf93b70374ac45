"""Make the remote backend answer to the name "cuda": device arguments, ``torch.cuda``, autocast.

Users write ``device="cuda"``, ``.cuda()``, ``torch.cuda.synchronize()`` and
``torch.autocast("cuda")``; this module maps those names onto the ``egpu`` backend by
wrapping the few entry points that take a device (factories, ``Tensor.to``...) rather than
intercepting every op, so ops without device arguments pay nothing.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections import namedtuple

import torch

from ..protocol import messages as wire
from . import backend
from .backend import BACKEND

_FACTORIES = [
    "empty",
    "empty_like",
    "empty_strided",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "arange",
    "range",
    "linspace",
    "logspace",
    "eye",
    "tensor",
    "as_tensor",
    "asarray",
    "scalar_tensor",
    "tril_indices",
    "triu_indices",
    "empty_permuted",
    "normal",
    "bernoulli",
]
_FROM_DATA = {"tensor", "as_tensor", "asarray", "scalar_tensor"}
_TENSOR_METHODS_WITH_DEVICE = [
    "new_empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
    "new_empty_strided",
]

_original: dict = {}


def map_device(d):
    """'cuda', 'cuda:1', torch.device('cuda', 1) -> the egpu device; anything else unchanged."""
    if isinstance(d, str):
        if d == "cuda" or d.startswith("cuda:"):
            return BACKEND + d[4:]
        return d
    if type(d) is torch.device and d.type == "cuda":
        return torch.device(BACKEND, d.index or 0)
    return d


def _patch(owner, name, make):
    key = (owner, name)
    if key not in _original:
        _original[key] = getattr(owner, name)
        setattr(owner, name, make(_original[key]))


def _with_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        d = kwargs.get("device")
        if d is not None:
            kwargs["device"] = map_device(d)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # see _pin_memory
        return fn(*args, **kwargs)

    return wrapper


def _pin_memory(fn):
    # Pinned host memory serves a local GPU's DMA; this process's GPU is remote (its data
    # goes through a socket), so pinning is what it is for an unpinned tensor: a copy, here
    # into ordinary memory. DataLoader(pin_memory=True) in notebooks then just works.
    @functools.wraps(fn)
    def pin_memory(self, *args, **kwargs):
        return self if isinstance(self, backend.RemoteTensor) else self.clone()

    return pin_memory


def _is_pinned(fn):
    @functools.wraps(fn)
    def is_pinned(self, *args, **kwargs):
        return False

    return is_pinned


def _from_data(fn):
    # Building straight onto the backend trips an internal assert in torch's data-to-tensor
    # path; build on the CPU and copy, which is what that path does for CUDA anyway.
    @functools.wraps(fn)
    def wrapper(data, *args, **kwargs):
        d = kwargs.pop("device", None)
        d = map_device(d) if d is not None else None
        if d is not None and torch.device(d).type == BACKEND:
            t = fn(data, *args, **kwargs)
            return t.to(d)
        if d is not None:
            kwargs["device"] = d
        return fn(data, *args, **kwargs)

    return wrapper


def _tensor_to(fn):
    @functools.wraps(fn)
    def to(self, *args, **kwargs):
        if args:
            a0 = args[0]
            if isinstance(a0, (str, torch.device)):
                args = (map_device(a0), *args[1:])
            elif type(a0) is int and not isinstance(a0, bool):
                args = (torch.device(BACKEND, a0), *args[1:])
        d = kwargs.get("device")
        if d is not None:
            kwargs["device"] = map_device(d) if not isinstance(d, int) else torch.device(BACKEND, d)
        return fn(self, *args, **kwargs)

    return to


def _tensor_cuda(_fn):
    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        idx = (
            device
            if isinstance(device, int)
            else (torch.device(device).index if device is not None else 0)
        )
        return self.to(
            torch.device(BACKEND, idx or 0), non_blocking=non_blocking, memory_format=memory_format
        )

    return cuda


def _autocast_init(fn):
    @functools.wraps(fn)
    def __init__(self, device_type, *args, **kwargs):
        if device_type == "cuda":
            device_type = BACKEND
        return fn(self, device_type, *args, **kwargs)

    return __init__


def _load(fn):
    @functools.wraps(fn)
    def load(f, map_location=None, *args, **kwargs):
        target = map_location
        if isinstance(target, (str, torch.device)) and str(target).startswith("cuda"):
            obj = fn(f, *args, map_location="cpu", **kwargs)
            return _tree_to(obj, map_device(target))
        return fn(f, *args, map_location=map_location, **kwargs)

    return load


def _compile(fn):
    # torch.compile generates kernels for a local device (and asks the CUDA runtime this
    # process does not have); "cuda" here is remote and runs eager ops, batched to the agent.
    # Skipping the compile, loudly, keeps unchanged notebooks running.
    @functools.wraps(fn)
    def compile(model=None, **kwargs):
        warnings.warn(
            "torch.compile is skipped in a remote-GPU process: the model runs eagerly "
            "(its ops are batched to the GPU agent)",
            stacklevel=2,
        )
        return (lambda m: m) if model is None else model

    return compile


def _tree_to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _tree_to(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_tree_to(v, device) for v in obj)
    return obj


class RemoteStream:
    """The one in-order queue a session has: stream APIs that code calls keep working."""

    def __init__(self, facade):
        self._facade = facade

    def synchronize(self):
        self._facade.synchronize()

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def query(self):
        return False

    def is_capturing(self):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class RemoteEvent:
    """Timing events: ``record`` is a sync point, so ``elapsed_time`` measures remote work done."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, facade=None):
        self._facade, self._t = facade, None

    def record(self, stream=None):
        import time

        self._facade.synchronize()
        self._t = time.perf_counter()

    def synchronize(self):
        self._facade.synchronize()

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end._t - self._t) * 1000.0


class _DeviceContext:
    """``with torch.cuda.device(i):``: checks the ordinal; ops keep naming their device."""

    def __init__(self, facade, device):
        self.idx = None if device is None or (isinstance(device, int) and device < 0) else device
        self.facade = facade

    def __enter__(self):
        if self.idx is not None:
            self.facade._index(self.idx)
        return self

    def __exit__(self, *exc):
        return False


def _no_op(*args, **kwargs):
    return 0


_Props = namedtuple(
    "_CudaDeviceProperties",
    "name total_memory major minor multi_processor_count gpu_total_memory fraction is_remote",
)


class CudaFacade:
    """The functions of ``torch.cuda`` that user code calls, answered by the remote GPU."""

    def __init__(self, session):
        self.session = session

    def _info(self):
        s = self.session
        if not s.info:
            s.attach()
        return s.info

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def init(self):
        pass

    def device_count(self):
        return max(1, int(self.session.fraction)) if self.session.fraction > 1 else 1

    def current_device(self):
        return 0

    def set_device(self, device):
        idx = device if isinstance(device, int) else torch.device(map_device(device)).index or 0
        if not 0 <= idx < self.device_count():
            raise RuntimeError(
                f"invalid device ordinal {idx}: this session has {self.device_count()} remote GPU(s)"
            )

    def get_device_name(self, device=None):
        return self._info()["name"]

    def get_device_properties(self, device=None):
        i = self._info()
        return _Props(
            i["name"],
            i["cap_bytes"],
            i["major"],
            i["minor"],
            i["multi_processor_count"],
            i["total_memory"],
            i["fraction"],
            True,
        )

    def get_device_capability(self, device=None):
        i = self._info()
        return (i["major"], i["minor"])

    def is_bf16_supported(self, including_emulation=True):
        return True

    def synchronize(self, device=None):
        self.session.synchronize()

    def _memory(self):
        reply, _ = self.session.request(wire.Memory().header())
        return reply["memory"]

    def memory_allocated(self, device=None):
        return self._memory()["allocated"]

    def max_memory_allocated(self, device=None):
        return self._memory()["max_allocated"]

    def memory_reserved(self, device=None):
        return self._memory()["reserved"]

    def mem_get_info(self, device=None):
        m = self._memory()
        return (max(0, m["cap"] - m["reserved"]), m["cap"])

    def empty_cache(self):
        if self.session.attached:
            self.session.request(wire.EmptyCache().header())

    def reset_peak_memory_stats(self, device=None):
        pass

    def manual_seed(self, seed):
        self.session.request(wire.ManualSeed(seed=int(seed)).header())

    manual_seed_all = manual_seed

    def _index(self, device) -> int:
        if device is None or isinstance(device, int):
            idx = device or 0
        else:
            idx = torch.device(map_device(device)).index or 0
        self.set_device(idx)  # validates it
        return idx

    # RNG state lives on the agent: checkpoints (get_rng_state_all), torch.utils.checkpoint's
    # preserve_rng_state and torch.random.fork_rng save and restore it through these.
    def get_rng_state(self, device="cuda"):
        _, bufs = self.session.request(wire.GetRngState(device=self._index(device)).header())
        return torch.frombuffer(bufs[0], dtype=torch.uint8).clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.device_count())]

    def set_rng_state(self, new_state, device="cuda"):
        state = new_state.detach().cpu().contiguous().view(torch.uint8).numpy()
        self.session.request(wire.SetRngState(device=self._index(device)).header(), [state])

    def set_rng_state_all(self, new_states):
        for i, state in enumerate(new_states):
            self.set_rng_state(state, i)

    def memory_summary(self, device=None, abbreviated=False):
        m = self._memory()
        mib = 1 << 20
        return (
            f"remote GPU slice ({self._info()['name']}, {self._info()['fraction']:g} of it): "
            f"allocated {m['allocated'] / mib:.1f} MiB, reserved {m['reserved'] / mib:.1f} MiB, "
            f"peak {m['max_allocated'] / mib:.1f} MiB, cap {m['cap'] / mib:.1f} MiB"
        )

    def ipc_collect(self):
        pass

    def device(self, device):
        return _DeviceContext(self, device)

    def _is_in_bad_fork(self):
        return False

    def is_current_stream_capturing(self):
        return False

    def current_stream(self, device=None):
        return RemoteStream(self)

    default_stream = current_stream

    def Stream(self, device=None, priority=0, **kwargs):  # noqa: N802 - mirrors torch.cuda.Stream
        return RemoteStream(self)

    def stream(self, stream=None):
        return stream if stream is not None else RemoteStream(self)

    def Event(self, enable_timing=False, blocking=False, interprocess=False):  # noqa: N802
        return RemoteEvent(enable_timing, blocking, interprocess, facade=self)

    def _lazy_init(self):
        pass

    # What the PrivateUse1 device module must also answer (autocast, RNG plumbing).
    def get_amp_supported_dtype(self):
        return [torch.float16, torch.bfloat16, torch.float32]

    def is_autocast_enabled(self):
        return torch.is_autocast_enabled(BACKEND)

    def get_autocast_dtype(self):
        return torch.get_autocast_dtype(BACKEND)

    def set_autocast_enabled(self, enabled):
        torch.set_autocast_enabled(BACKEND, enabled)

    def set_autocast_dtype(self, dtype):
        torch.set_autocast_dtype(BACKEND, dtype)


_FACADE_NAMES = [
    "is_available",
    "is_initialized",
    "init",
    "device_count",
    "current_device",
    "set_device",
    "get_device_name",
    "get_device_properties",
    "get_device_capability",
    "is_bf16_supported",
    "synchronize",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "mem_get_info",
    "empty_cache",
    "reset_peak_memory_stats",
    "manual_seed",
    "manual_seed_all",
    "get_rng_state",
    "get_rng_state_all",
    "set_rng_state",
    "set_rng_state_all",
    "memory_summary",
    "ipc_collect",
    "device",
    "_is_in_bad_fork",
    "_lazy_init",
    "is_current_stream_capturing",
    "current_stream",
    "default_stream",
    "Stream",
    "stream",
    "Event",
]


def install(session) -> None:
    facade = CudaFacade(session)
    module = types.SimpleNamespace(
        **{n: getattr(facade, n) for n in dir(facade) if not n.startswith("__")}
    )
    backend.register_backend(module)
    session.devices = [torch.device(BACKEND, i) for i in range(facade.device_count())]
    # torch._register_device_module keeps the first module: point it at this session.
    dev_mod = getattr(torch, BACKEND)
    for n in dir(facade):
        if not n.startswith("__"):
            setattr(dev_mod, n, getattr(facade, n))
    for n in _FACADE_NAMES:  # rebound on every install: each session has its own facade
        _original.setdefault((torch.cuda, n), getattr(torch.cuda, n, None))
        setattr(torch.cuda, n, getattr(facade, n))
    # torch.utils.checkpoint saves device RNG state only for an initialized device module.
    _original.setdefault((torch.cuda, "_initialized"), torch.cuda._initialized)
    torch.cuda._initialized = True
    import torch.cuda.random as cuda_random

    for n in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        _original.setdefault((cuda_random, n), getattr(cuda_random, n))
        setattr(cuda_random, n, getattr(facade, n))
    # Profiling markers have no local GPU to annotate.
    for n in ("range_push", "range_pop", "range_start", "range_end", "mark"):
        _original.setdefault((torch.cuda.nvtx, n), getattr(torch.cuda.nvtx, n))
        setattr(torch.cuda.nvtx, n, _no_op)
    _original.setdefault((torch.cuda.nvtx, "range"), torch.cuda.nvtx.range)
    torch.cuda.nvtx.range = contextlib.nullcontext
    # CUDA builds ask the graphs module directly (optimizers' capture health check).
    import torch.cuda.graphs as graphs

    _original.setdefault(
        (graphs, "is_current_stream_capturing"), graphs.is_current_stream_capturing
    )
    graphs.is_current_stream_capturing = facade.is_current_stream_capturing
    for n in _FACTORIES:
        if hasattr(torch, n):
            _patch(torch, n, _from_data if n in _FROM_DATA else _with_device_kwarg)
    for n in _TENSOR_METHODS_WITH_DEVICE:
        _patch(torch.Tensor, n, _with_device_kwarg)
    _patch(torch.Tensor, "to", _tensor_to)
    _patch(torch.Tensor, "pin_memory", _pin_memory)
    _patch(torch.Tensor, "is_pinned", _is_pinned)
    _patch(torch.Tensor, "cuda", _tensor_cuda)
    _patch(torch.amp.autocast_mode.autocast, "__init__", _autocast_init)
    _patch(torch, "load", _load)
    _patch(torch, "compile", _compile)
    from . import autocast, sdpa

    autocast.register()
    sdpa.register()


def uninstall() -> None:
    for (owner, name), fn in _original.items():
        if fn is None:
            delattr(owner, name)
        else:
            setattr(owner, name, fn)
    _original.clear()
