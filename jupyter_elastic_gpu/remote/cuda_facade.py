"""Make the remote backend answer to the name "cuda": device arguments, ``torch.cuda``, autocast.

Users write ``device="cuda"``, ``.cuda()``, ``torch.cuda.synchronize()`` and
``torch.autocast("cuda")``; this module maps those names onto the ``egpu`` backend by
wrapping the few entry points that take a device (factories, ``Tensor.to``...) rather than
intercepting every op, so ops without device arguments pay nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import time
import types
from collections import namedtuple

import torch

from ..protocol import messages as wire
from ..protocol.fraction import GPUFraction
from ..protocol.values import tensor_from_buffer
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


# torch's autocast state functions: autocast("cuda") sets the backend's state (above), so
# code that reads or sets CUDA's (HF's maybe_autocast(x.device.type, enabled=False),
# torch.utils.checkpoint's recomputation, torch.amp.custom_fwd) must reach the backend's too,
# or it would see autocast off while ops are being cast.
_AUTOCAST_STATE = (
    "is_autocast_enabled",
    "get_autocast_dtype",
    "set_autocast_enabled",
    "set_autocast_dtype",
)


def _autocast_state(fn):
    cuda_by_default = fn.__name__ in ("is_autocast_enabled", "set_autocast_enabled")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device_type" in kwargs:
            if kwargs["device_type"] == "cuda":
                kwargs["device_type"] = BACKEND
        elif args and isinstance(args[0], str):
            if args[0] == "cuda":
                args = (BACKEND, *args[1:])
        elif cuda_by_default:  # the old forms without a device type mean CUDA
            args = (BACKEND, *args)
        return fn(*args, **kwargs)

    return wrapper


def _autocast_gpu_dtype(fn):
    # torch.get_autocast_gpu_dtype / set_autocast_gpu_dtype (deprecated): CUDA's, hence ours.
    getter = fn.__name__.startswith("get")

    @functools.wraps(fn)
    def wrapper(*args):
        if getter:
            return torch._C.get_autocast_dtype(BACKEND, *args)
        return torch._C.set_autocast_dtype(BACKEND, *args)

    return wrapper


def _compile(fn):
    # torch.compile captures here and compiles on the agent (see remote/compile.py).
    from .compile import make_compile

    return make_compile(fn)


# ---------------------------------------------------------------------------------------
# The torch.cuda facade. torch.cuda stays the real module; install() rebinds its names to
# the module-level functions and classes below, each of the same kind and signature as the
# name it replaces (libraries annotate with torch.cuda.Stream, subclass it, isinstance it).
# They ask the process's current session, so re-attaching needs no re-binding.

FACADE: dict = {}  # torch.cuda name -> what answers it remotely


def _cuda(obj):
    FACADE[obj.__name__] = obj
    return obj


def _sess():
    return backend.current_session()


def _info() -> dict:
    s = _sess()
    if not s.info:
        s.attach()
    return s.info


def _index(device=None, optional=True) -> int:
    """The session GPU ordinal a torch.cuda device argument names, validated."""
    if device is None:
        idx = 0
    elif type(device) is int:
        idx = device
    elif isinstance(device, (str, torch.device)):
        d = torch.device(map_device(device))
        if d.type != BACKEND:
            raise ValueError(f"Expected a cuda device, but got: {device}")
        idx = d.index or 0
    else:
        raise TypeError(f"expected a cuda device (int, str or torch.device), got {device!r}")
    n = device_count()
    if not 0 <= idx < n:
        raise RuntimeError(f"invalid device ordinal {idx}: this session has {n} remote GPU(s)")
    return idx


@_cuda
def is_available() -> bool:
    return True


@_cuda
def is_initialized() -> bool:
    return True


@_cuda
def init() -> None:
    pass


@_cuda
def _lazy_init() -> None:
    pass


@_cuda
def _is_in_bad_fork() -> bool:
    return getattr(backend._session, "forked", False)


@_cuda
def device_count() -> int:
    return GPUFraction(_sess().fraction).gpus


@_cuda
def current_device() -> int:
    return 0


@_cuda
def set_device(device) -> None:
    # Ops name their device (cuda:N); selecting one only validates it, as torch does.
    if device is not None and not (type(device) is int and device < 0):
        _index(device)


@_cuda
def get_device_name(device=None) -> str:
    _index(device)
    return _info()["name"]


_Props = namedtuple(
    "_CudaDeviceProperties",
    "name total_memory major minor multi_processor_count gpu_total_memory fraction is_remote",
)


@_cuda
def get_device_properties(device=None):
    _index(device)
    i = _info()
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


@_cuda
def get_device_capability(device=None) -> tuple[int, int]:
    _index(device)
    i = _info()
    return (i["major"], i["minor"])


@_cuda
def get_arch_list() -> list[str]:
    major, minor = get_device_capability()
    return [f"sm_{major}{minor}"]


@_cuda
def is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


@_cuda
def is_tf32_supported() -> bool:
    return get_device_capability()[0] >= 8


@_cuda
def synchronize(device=None) -> None:
    _index(device)
    _sess().synchronize()


def _memory() -> dict:
    reply, _ = _sess().request(wire.Memory().header())
    return reply["memory"]


@_cuda
def memory_allocated(device=None) -> int:
    _index(device)
    return _memory()["allocated"]


@_cuda
def max_memory_allocated(device=None) -> int:
    _index(device)
    return _memory()["max_allocated"]


@_cuda
def memory_reserved(device=None) -> int:
    _index(device)
    return _memory()["reserved"]


@_cuda
def max_memory_reserved(device=None) -> int:
    # The agent tracks the peak of allocations only; reserved memory is at least that.
    _index(device)
    m = _memory()
    return max(m["reserved"], m["max_allocated"])


@_cuda
def memory_cached(device=None) -> int:
    return memory_reserved(device)


@_cuda
def max_memory_cached(device=None) -> int:
    return max_memory_reserved(device)


@_cuda
def mem_get_info(device=None) -> tuple[int, int]:
    _index(device)
    m = _memory()
    return (max(0, m["cap"] - m["reserved"]), m["cap"])


@_cuda
def memory_stats(device=None) -> dict:
    """The keys of torch's allocator stats that tools read (Lightning, accelerate, HF)."""
    _index(device)
    m = _memory()
    stats = {}
    for kind, current, peak in (
        ("allocated_bytes", m["allocated"], m["max_allocated"]),
        ("reserved_bytes", m["reserved"], max(m["reserved"], m["max_allocated"])),
        ("active_bytes", m["allocated"], m["max_allocated"]),
    ):
        for pool in ("all", "large_pool", "small_pool"):
            value = (current, peak) if pool == "all" else (0, 0)
            stats[f"{kind}.{pool}.current"], stats[f"{kind}.{pool}.peak"] = value
    stats["num_ooms"] = 0
    return dict(sorted(stats.items()))


@_cuda
def memory_stats_as_nested_dict(device=None) -> dict:
    nested: dict = {}
    for key, value in memory_stats(device).items():
        *path, last = key.split(".")
        node = nested
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return nested


@_cuda
def memory_summary(device=None, abbreviated: bool = False) -> str:
    _index(device)
    m, i = _memory(), _info()
    mib = 1 << 20
    return (
        f"remote GPU slice ({i['name']}, {i['fraction']:g} of it): "
        f"allocated {m['allocated'] / mib:.1f} MiB, reserved {m['reserved'] / mib:.1f} MiB, "
        f"peak {m['max_allocated'] / mib:.1f} MiB, cap {m['cap'] / mib:.1f} MiB"
    )


@_cuda
def list_gpu_processes(device=None) -> str:
    return f"GPU:{_index(device)}\none remote session (this process): {memory_summary(device)}"


@_cuda
def get_per_process_memory_fraction(device=None) -> float:
    _index(device)
    return GPUFraction(_info()["fraction"]).per_gpu


@_cuda
def empty_cache() -> None:
    s = _sess()
    if s.attached:
        s.request(wire.EmptyCache().header())


# The agent keeps no resettable peak: resetting is accepted and leaves the figures as they are.
@_cuda
def reset_peak_memory_stats(device=None) -> None:
    _index(device)


@_cuda
def reset_max_memory_allocated(device=None) -> None:
    _index(device)


@_cuda
def reset_max_memory_cached(device=None) -> None:
    _index(device)


@_cuda
def reset_accumulated_memory_stats(device=None) -> None:
    _index(device)


@_cuda
def ipc_collect() -> None:
    pass


# -- RNG: the state lives on the agent. Checkpoints (get_rng_state_all), torch.utils.checkpoint's
# preserve_rng_state and torch.random.fork_rng save and restore it through these.


@_cuda
def manual_seed(seed: int) -> None:
    s = _sess()
    if s.forked:
        return  # as CUDA's lazy seeding in a forked child: queued, never run (DataLoader workers)
    s.request(wire.ManualSeed(seed=int(seed)).header())


@_cuda
def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


@_cuda
def seed() -> None:
    manual_seed(torch.initial_seed())


@_cuda
def seed_all() -> None:
    seed()


@_cuda
def initial_seed() -> int:
    return torch.initial_seed()


@_cuda
def get_rng_state(device="cuda") -> torch.Tensor:
    _, bufs = _sess().request(wire.GetRngState(device=_index(device)).header())
    return tensor_from_buffer({"dtype": "uint8", "shape": [len(bufs[0])]}, bufs[0]).clone()


@_cuda
def get_rng_state_all() -> list:
    return [get_rng_state(i) for i in range(device_count())]


@_cuda
def set_rng_state(new_state, device="cuda") -> None:
    state = new_state.detach().cpu().contiguous().view(torch.uint8).numpy()
    _sess().request(wire.SetRngState(device=_index(device)).header(), [state])


@_cuda
def set_rng_state_all(new_states) -> None:
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


# -- streams and events: a session has one in-order queue on the agent, so every stream is
# that queue. Cross-stream waits are already satisfied by the order; work is never reordered.


@_cuda
class Stream:
    """A CUDA stream of the remote GPU: every stream is the session's one in-order queue."""

    # Read-only data descriptors on the class, as on torch's stream type (torch 2.11 defines
    # them with getset descriptors): code that looks them up on the class finds them.
    device_index = property(lambda s: s._index)
    device_type = property(lambda s: 1)  # c10::DeviceType::CUDA
    stream_id = property(lambda s: 0)
    priority = property(lambda s: s._priority)

    def __init__(self, device=None, priority=0, **kwargs):
        self._index = _index(device)
        self._priority = priority

    @property
    def device(self):
        return torch.device("cuda", self.device_index)

    @property
    def cuda_stream(self) -> int:
        return 0  # the legacy default stream's handle: this process has no CUDA stream

    @property
    def native_handle(self) -> int:
        return 0

    @staticmethod
    def priority_range():
        return (0, 0)

    def query(self) -> bool:
        synchronize()
        return True

    def synchronize(self) -> None:
        synchronize()

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def is_capturing(self) -> bool:
        return False

    def __eq__(self, other):
        return isinstance(other, Stream) and other.device_index == self.device_index

    def __hash__(self):
        return hash(("egpu-stream", self.device_index))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self):
        return f"<torch.cuda.Stream device=cuda:{self.device_index} (the remote in-order queue)>"


def _no_local_gpu(feature: str) -> RuntimeError:
    return RuntimeError(
        f"{feature} is not available with a remote GPU (jupyter-elastic-gpu): it needs a "
        "CUDA device in this process, and this process's GPU work runs on the GPU agent"
    )


@_cuda
class ExternalStream(Stream):
    """A stream made from a raw CUDA stream pointer: there is no local CUDA to own one."""

    def __init__(self, stream_ptr, device=None, **kwargs):
        raise _no_local_gpu("torch.cuda.ExternalStream (a raw CUDA stream pointer)")


@_cuda
class Event:
    """A CUDA event: ``record`` is a sync point, so ``elapsed_time`` measures remote work done."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, external=False):
        if interprocess or external:
            raise _no_local_gpu("an interprocess CUDA event")
        self.enable_timing = enable_timing
        self._t = None
        self._device_index = 0

    @property
    def device(self):
        return torch.device("cuda", self._device_index) if self._t is not None else None

    @property
    def cuda_event(self) -> int:
        return 0

    @property
    def event_id(self) -> int:
        return id(self)

    @classmethod
    def from_ipc_handle(cls, device, handle):
        raise _no_local_gpu("torch.cuda.Event.from_ipc_handle")

    def ipc_handle(self):
        raise _no_local_gpu("torch.cuda.Event.ipc_handle")

    def record(self, stream=None) -> None:
        synchronize()
        self._device_index = stream.device_index if isinstance(stream, Stream) else 0
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        synchronize()

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        if self._t is None or end_event._t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self.enable_timing and end_event.enable_timing):
            raise ValueError("Both events must be created with argument 'enable_timing=True'.")
        return (end_event._t - self._t) * 1000.0

    def __repr__(self):
        return "<torch.cuda.Event (remote: recorded as a sync point)>"


@_cuda
def current_stream(device=None) -> Stream:
    return Stream(device)


@_cuda
def default_stream(device=None) -> Stream:
    return Stream(device)


@_cuda
def set_stream(stream) -> None:
    pass


@_cuda
class StreamContext:
    """``with torch.cuda.stream(s):``: work stays in the one in-order queue."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


@_cuda
def stream(stream) -> StreamContext:
    return StreamContext(stream)


@_cuda
class device:  # noqa: N801 - torch's name
    """``with torch.cuda.device(i):`` checks the ordinal; ops keep naming their device."""

    def __init__(self, device):
        self.idx = None if device is None or (type(device) is int and device < 0) else device
        self.prev_idx = -1

    def __enter__(self):
        if self.idx is not None:
            _index(self.idx)
        return self

    def __exit__(self, *exc):
        return False


@_cuda
class device_of(device):  # noqa: N801 - torch's name
    def __init__(self, obj):
        super().__init__(obj.get_device() if obj.is_cuda else -1)


# -- graphs: capture queries answer "not capturing" (always true here); capture itself
# (CUDAGraph, graph) raises: replay needs the captured kernels in this process.


@_cuda
def is_current_stream_capturing() -> bool:
    return False


@_cuda
def get_sync_debug_mode() -> int:
    return 0


@_cuda
def set_sync_debug_mode(debug_mode) -> None:
    if debug_mode not in (0, 1, 2, "default", "warn", "error"):
        raise RuntimeError(
            "invalid value of debug_mode, expected one of `default`, `warn`, `error`"
        )


@_cuda
def can_device_access_peer(device, peer_device) -> bool:
    # The agent copies between a session's GPUs itself.
    return _index(device) != _index(peer_device)


@_cuda
def make_graphed_callables(
    callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None
):
    # A graphed callable is an optimisation with eager semantics: run them eagerly.
    return callables


@_cuda
def graph_pool_handle():
    raise _no_local_gpu("CUDA graph capture (torch.cuda.graph_pool_handle)")


# nvtx markers annotate a local GPU's timeline: there is none.
def _nvtx_no_op(*args, **kwargs):
    return 0


def _nvtx_range(msg, *args, **kwargs):
    return contextlib.nullcontext()


_NVTX = {
    "range_push": _nvtx_no_op,
    "range_pop": _nvtx_no_op,
    "range_start": _nvtx_no_op,
    "range_end": _nvtx_no_op,
    "mark": _nvtx_no_op,
    "range": _nvtx_range,
}


def _unsupported(name: str, real):
    """A function with ``real``'s signature that says why it cannot run here."""

    @functools.wraps(real)
    def unsupported(*args, **kwargs):
        raise _no_local_gpu(f"torch.cuda.{name}")

    return unsupported


def _unsupported_class(name: str, real):
    """A class of ``real``'s public methods and properties whose construction says why not."""

    def __init__(self, *args, **kwargs):
        raise _no_local_gpu(f"torch.cuda.{name}")

    ns = {"__init__": __init__, "__doc__": f"torch.cuda.{name}: not available remotely."}
    for attr in dir(real):
        if not attr.startswith("_"):
            kind = _member_kind(inspect.getattr_static(real, attr))
            if kind == "property":
                ns[attr] = property(lambda self: None)
            elif kind == "routine":
                ns[attr] = lambda self, *a, **k: None
            else:
                ns[attr] = getattr(real, attr, None)
    cls = type(name, (), ns)
    cls.__module__ = "torch.cuda"
    return cls


def _member_kind(v) -> str:
    """How a class member behaves: "property" (data descriptor), "routine" or "value"."""
    if isinstance(v, (property, types.GetSetDescriptorType, types.MemberDescriptorType)):
        return "property"
    if isinstance(v, (staticmethod, classmethod)) or inspect.isroutine(v) or callable(v):
        return "routine"
    return "value"


# Errors, storage and legacy tensor types keep torch's own classes (isinstance of errors raised
# by the agent, the type names that code compares with).
def _keeps_real(name, value) -> bool:
    return (
        not (inspect.isclass(value) or inspect.isfunction(value))
        or not getattr(value, "__module__", "").startswith("torch.cuda")
        or (inspect.isclass(value) and issubclass(value, BaseException))
        or name.endswith(("Storage", "Tensor"))
    )




# Names that stay torch's own although defined in torch.cuda: constants and plain helpers.
_KEEP = frozenset({"cudaStatus"})

_plan: list | None = None  # (owner, name, replacement), computed once from the real torch.cuda


def _cuda_plan() -> list:
    """Every rebinding of torch.cuda and its submodules, derived from torch.cuda itself.

    Each public name defined by torch.cuda is answered remotely (FACADE), or made to say why
    it cannot be (a function or class of the same kind). Submodules holding the same object
    (torch.cuda.memory.memory_allocated, torch.cuda.streams.Stream...) get the same answer."""
    global _plan
    if _plan is not None:
        return _plan
    real = dict(vars(torch.cuda))
    top = {}
    for name, value in real.items():
        if name in FACADE:
            top[name] = FACADE[name]
        elif name.startswith("_") or name in _KEEP or _keeps_real(name, value):
            continue
        elif inspect.isclass(value):
            top[name] = _unsupported_class(name, value)
        else:
            top[name] = _unsupported(name, value)
    by_id = {id(real[n]): new for n, new in top.items() if n in real}
    plan = [(torch.cuda, n, new) for n, new in top.items()]
    for modname, mod in list(sys.modules.items()):
        if modname.startswith("torch.cuda.") and isinstance(mod, types.ModuleType):
            for n, v in list(vars(mod).items()):
                new = by_id.get(id(v))
                if new is not None and not n.startswith("__"):
                    plan.append((mod, n, new))
    plan += [(torch.cuda.nvtx, n, f) for n, f in _NVTX.items()]
    _plan = plan
    return plan


def _set(owner, name, value) -> None:
    _original.setdefault((owner, name), getattr(owner, name, None))
    setattr(owner, name, value)


# -- torch.accelerator: the current accelerator is "cuda" (code branches on device.type).


def current_accelerator(check_available=False):
    return torch.device("cuda")


def _accelerator_index() -> int:
    return 0


def _accelerator_set_index(device) -> None:
    set_device(device)


def _accelerator_memory(fn):
    def memory_fn(device_index=None):
        return fn(device_index)

    memory_fn.__name__ = fn.__name__
    return memory_fn


_ACCELERATOR = {
    "current_accelerator": current_accelerator,
    "is_available": is_available,
    "device_count": device_count,
    "synchronize": synchronize,
    "current_device_index": _accelerator_index,
    "current_device_idx": _accelerator_index,
    "set_device_index": _accelerator_set_index,
    "set_device_idx": _accelerator_set_index,
    "current_stream": current_stream,
    "set_stream": set_stream,
    "empty_cache": empty_cache,
    "get_memory_info": _accelerator_memory(mem_get_info),
    "memory_allocated": _accelerator_memory(memory_allocated),
    "max_memory_allocated": _accelerator_memory(max_memory_allocated),
    "memory_reserved": _accelerator_memory(memory_reserved),
    "max_memory_reserved": _accelerator_memory(max_memory_reserved),
    "memory_stats": _accelerator_memory(memory_stats),
    "reset_peak_memory_stats": _accelerator_memory(reset_peak_memory_stats),
    "reset_accumulated_memory_stats": _accelerator_memory(reset_accumulated_memory_stats),
}


def _install_accelerator() -> None:
    acc = getattr(torch, "accelerator", None)
    if acc is None:
        return
    mods = [acc] + [m for n, m in list(sys.modules.items()) if n.startswith("torch.accelerator.")]
    for mod in mods:
        for name, new in _ACCELERATOR.items():
            if name in vars(mod):
                _set(mod, name, new)


# -- torch.backends.cudnn: the agent's GPU has cuDNN. The flags (enabled, benchmark,
# deterministic, allow_tf32) are torch's own settable properties, kept in this process.


def _cudnn_is_available() -> bool:
    return True


def _cudnn_version():
    # The agent's cuDNN if it reported one; else this build's (CUDA wheels ship the same one
    # as the agent's); else that of the CUDA 12 wheels, so version checks pass.
    return _info().get("cudnn") or _REAL_CUDNN_VERSION() or 90100


def _REAL_CUDNN_VERSION():  # noqa: N802
    return _original.get((_cudnn_module(), "version"), lambda: None)()


def _cudnn_module():
    return sys.modules["torch.backends.cudnn"].__dict__.get("m") or sys.modules[
        "torch.backends.cudnn"
    ]


def _install_cudnn() -> None:
    import torch.backends.cudnn as cudnn

    real = _cudnn_module()
    for owner in {id(cudnn): cudnn, id(real): real}.values():
        _set(owner, "is_available", _cudnn_is_available)
        _set(owner, "version", _cudnn_version)


# -- the PrivateUse1 device module (torch.egpu): torch internals ask it by the backend's name.


def _device_module() -> types.ModuleType:
    mod = types.ModuleType(f"torch.{BACKEND}")
    for name, value in FACADE.items():
        setattr(mod, name, value)
    mod.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16, torch.float32]
    mod.is_autocast_enabled = lambda: torch.is_autocast_enabled(BACKEND)
    mod.get_autocast_dtype = lambda: torch.get_autocast_dtype(BACKEND)
    mod.set_autocast_enabled = lambda enabled: torch.set_autocast_enabled(BACKEND, enabled)
    mod.set_autocast_dtype = lambda dtype: torch.set_autocast_dtype(BACKEND, dtype)
    return mod


# -- children: what a remote tensor becomes when sent to a spawned process (DataLoader
# workers, multiprocessing). torch shares CPU storages through shared memory, which a
# temporary CPU copy does not outlive; send its bytes instead (a spawned child has no GPU).


def _rebuild_cpu(data: bytes, dtype: torch.dtype, shape, requires_grad: bool) -> torch.Tensor:
    t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return t.reshape(shape).requires_grad_(requires_grad)


def _reduce_for_child(t):
    local = t.detach().cpu().contiguous()
    raw = local.reshape(-1).view(torch.uint8).numpy().tobytes() if local.numel() else b""
    return (_rebuild_cpu, (raw, local.dtype, tuple(local.shape), t.requires_grad))


class _GeneratorKind(type(torch._C.Generator)):
    # Every generator torch makes (torch.default_generator, a DataLoader's) is a
    # torch._C.Generator: isinstance/issubclass against the replacement still say so.
    def __instancecheck__(cls, obj):
        return isinstance(obj, torch._C.Generator)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, torch._C.Generator)


class Generator(torch._C.Generator, metaclass=_GeneratorKind):
    """``torch.Generator``: CPU generators as ever; a CUDA one gets a plain error (torch's
    own would be about a missing ATen_cuda library)."""

    def __new__(cls, device="cpu"):
        if torch.device(device).type in ("cuda", BACKEND):
            raise RuntimeError(
                f"{_no_local_gpu('torch.Generator(device=' + repr(str(device)) + ')')}. Draw "
                "from a CPU generator and move the result (torch.randn(..., generator="
                "torch.Generator().manual_seed(0)).to('cuda')), or seed the GPU's own stream "
                "with torch.manual_seed / torch.cuda.manual_seed."
            )
        return super().__new__(cls, device)


def install(session) -> None:
    backend.register_backend(_device_module())
    _set(torch, "Generator", Generator)
    session.devices = [torch.device(BACKEND, i) for i in range(GPUFraction(session.fraction).gpus)]
    for owner, name, new in _cuda_plan():
        _set(owner, name, new)
    # torch.utils.checkpoint saves device RNG state only for an initialized device module.
    _set(torch.cuda, "_initialized", True)
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(backend.RemoteTensor, _reduce_for_child)
    _install_accelerator()
    _install_cudnn()
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
    for n in _AUTOCAST_STATE:
        _patch(torch, n, _autocast_state)
    for n in ("get_autocast_gpu_dtype", "set_autocast_gpu_dtype"):
        if hasattr(torch, n):
            _patch(torch, n, _autocast_gpu_dtype)
    from . import serialization

    serialization.install()  # torch.load/save of "cuda" tensors: see there
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
