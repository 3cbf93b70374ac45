"""The value codec of the data plane, both directions: the one torch-aware module of ``protocol``.

Op arguments and results are JSON scalars and lists plus tagged objects, each with exactly one
tag key from the schema below (no guessing from what keys happen to be there):

    {"t": id}                       a tensor of this session (argument, or a result that is one
                                    of the op's inputs)
    {"new": id, "size", "stride",   a tensor an agent-run op made (``call`` results): the agent
     "offset", "dtype", "nbytes",   numbers these below zero, so they never meet client ids
     "dev"}
    {"cpu": k, "dtype", "shape"}    a CPU tensor whose bytes are buffer ``k`` (past the op's base)
    {"dt": "float32"}   dtype       {"dev": "cuda"|"cpu", "i": n}  device (n: the session's nth)
    {"mf": name}  memory format     {"ly": "strided"}  layout      {"c": [re, im]}  complex
    {"tuple": [...]}                a tuple result (lists are lists)
    {"hole": "t"}  {"hole": "f"}    in a signature's template only (``messages.SigDef``): a
                                    tensor, a float, whose values each use record carries

The client's encoder and result decoder and the agent's argument decoder and result encoder
all live here, so the schema changes in one place. Only processes that hold tensors import
this module (torch-free processes use ``messages`` and ``frames``).
"""

from __future__ import annotations

import math

import torch

from .messages import HOLE_FLOAT, HOLE_TENSOR, ProtocolError

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex32,
    )
}
DTYPE_NAMES = {d: n for n, d in DTYPES.items()}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
MEMORY_FORMAT_NAMES = {v: k for k, v in MEMORY_FORMATS.items()}
_SCALARS = (int, float, bool, str, type(None))
_CPU = torch.device("cpu")


def tensor_from_buffer(meta: dict, buf) -> torch.Tensor:
    """Rebuild a CPU tensor from a described raw buffer, validating every claim."""
    if not isinstance(meta, dict):
        raise ProtocolError("tensor description must be an object")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ProtocolError(f"unknown dtype {str(meta.get('dtype'))[:60]!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ProtocolError(f"bad tensor shape {str(shape)[:100]!r}")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = dtype.itemsize
    nbytes = buf.nbytes if isinstance(buf, torch.Tensor) else len(buf)
    if numel * itemsize != nbytes:
        raise ProtocolError(
            f"tensor of shape {shape} and dtype {meta['dtype']} needs {numel * itemsize} bytes, "
            f"buffer has {nbytes}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(buf, torch.Tensor):  # host_buffer's: a view keeps its (pinned) storage
        return buf.view(dtype).view(shape)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


_MADV_HUGEPAGE = 14
_HUGE = 2 << 20
_libc = None


# The caching host allocator rounds a pinned block up to a power of two and keeps it for the
# process's life: a 9 GiB upload would lock 16 GiB of the node's memory for good. Payloads
# above this go pageable (their copy to the GPU is then synchronous, still at PCIe speed).
PIN_MAX_BYTES = 1 << 30


def host_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``torch.empty`` in host memory, page-locked if ``pin`` and the size allows it, else (or
    when page-locked memory has run out) pageable."""
    if pin and math.prod(shape) * dtype.itemsize <= PIN_MAX_BYTES:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # page-locked memory exhausted: pageable does, only slower
            pass
    return torch.empty(shape, dtype=dtype)


def host_buffer(nbytes: int, pin: bool = False):
    """Memory for a received payload, as ``FrameReader``'s ``alloc``: a uint8 tensor and a
    writable view of it.

    Pinned memory (a CUDA worker) comes from torch's caching host allocator: reused across
    frames, and a non-blocking copy out of it keeps its block until the GPU has read it.
    Pageable memory is fresh from the kernel, and faulting it in 4 KiB pages costs more than
    the copy off the socket: transparent huge pages are asked for, where the system offers
    them on request, so a large payload takes a few hundred faults, not tens of thousands."""
    t = host_empty((nbytes,), torch.uint8, pin)
    if nbytes >= 2 * _HUGE and not t.is_pinned():
        _advise_huge(t.data_ptr(), nbytes)
    return t, t.numpy()


def _advise_huge(ptr: int, nbytes: int) -> None:
    global _libc
    if _libc is False:
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        start = -(-ptr // _HUGE) * _HUGE  # whole huge pages inside the allocation only
        end = (ptr + nbytes) // _HUGE * _HUGE
        if end > start:
            _libc.madvise(start, end - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        _libc = False  # no libc madvise here: plain pages, as before


def as_buffer(t: torch.Tensor):
    """The raw bytes of a dense CPU tensor, for a frame (an empty tensor has none)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


# -- client: arguments out, results in --------------------------------------------------------


def argument_encoder(remote_type: type, remote_ref, float_key=None):
    """The client's per-op encoder: one pass builds the wire form, the meta-inference cache
    key ``sig`` and the CPU tensors to upload (``bufs``).

    ``remote_ref(v, sig, inputs)`` turns a ``remote_type`` tensor into its id (checking it
    belongs to the live session, recording it in ``sig`` and ``inputs``). ``float_key(v)``,
    if given, is what a float stands for in ``sig`` (else its type and value). A closure, not
    a class: this runs for every argument of every op, and cell lookups are the cheapest."""

    def encode(v, sig, bufs, inputs):
        t = type(v)
        if t is remote_type or isinstance(v, remote_type):
            return {"t": remote_ref(v, sig, inputs)}
        if t is float and float_key is not None:
            sig.append(float_key(v))
            return v
        if t in _SCALARS:
            sig.append((t, v))
            return v
        if t is list or t is tuple or t is torch.Size:
            sig.append(len(v))
            out = []
            for x in v:  # tensor lists (foreach ops, cat) are the long ones: tensors inline
                if type(x) is remote_type:
                    out.append({"t": remote_ref(x, sig, inputs)})
                else:
                    out.append(encode(x, sig, bufs, inputs))
            return out
        if t is torch.dtype:
            sig.append(v)
            return {"dt": DTYPE_NAMES[v]}
        if t is torch.device:
            sig.append(v)
            return {"dev": v.type if v.type == "cpu" else "cuda", "i": v.index or 0}
        if isinstance(v, torch.Tensor):  # a CPU tensor argument (uploads, 0-dim scalars)
            if v.device.type != "cpu":
                raise RuntimeError(f"cannot mix tensors on {v.device} with remote GPU tensors")
            sig.append(("cpu", v.dtype, v.shape, v.stride()))
            bufs.append(v.detach().resolve_conj().resolve_neg().contiguous())
            return {"cpu": len(bufs) - 1, "dtype": DTYPE_NAMES[v.dtype], "shape": list(v.shape)}
        if t is torch.memory_format:
            sig.append(v)
            return {"mf": MEMORY_FORMAT_NAMES[v]}
        if t is torch.layout:
            sig.append(v)
            if v is not torch.strided:
                raise NotImplementedError(f"layout {v} is not supported on the remote GPU")
            return {"ly": "strided"}
        if t is complex:
            sig.append((t, v))
            return {"c": [v.real, v.imag]}
        if t is torch.Generator:
            raise NotImplementedError(
                "explicit torch.Generator objects are not supported on the remote GPU; "
                "seed with torch.manual_seed / torch.cuda.manual_seed instead"
            )
        raise NotImplementedError(
            f"cannot send an argument of type {t.__name__} to the remote GPU"
        )

    return encode


# What a ``float_key`` answers for a float whose value leaves the output metadata alone.
ANY_FLOAT = (float,)


def signature_encoder(remote_type: type, remote_ref, float_key=None):
    """The client's per-op pass for signature records: appends the meta-inference cache key's
    parts to ``sig``, the values of the template's holes to ``holes`` (tensor ids and every
    float) and CPU tensors to ``bufs`` as they are (an op with any goes as a ``Run``, encoded
    again by ``argument_encoder``). ``float_key(v)``, if given, is what a float stands for in
    the key (else its type and value).

    Floats are always holes: a key that stands for many values (``float_key``), or for
    ``0.0`` and ``-0.0`` at once, must not bake one of them into the template."""

    def encode(v, sig, holes, bufs, inputs):
        t = type(v)
        if t is remote_type or isinstance(v, remote_type):
            holes.append(remote_ref(v, sig, inputs))
        elif t is float:
            sig.append(float_key(v) if float_key is not None else (t, v))
            holes.append(v)
        elif t in _SCALARS:
            sig.append((t, v))
        elif t is list or t is tuple or t is torch.Size:
            sig.append(len(v))
            for x in v:  # tensor lists (foreach ops, cat) are the long ones: tensors inline
                if type(x) is remote_type:
                    holes.append(remote_ref(x, sig, inputs))
                else:
                    encode(x, sig, holes, bufs, inputs)
        elif isinstance(v, torch.Tensor):
            if v.device.type != "cpu":
                raise RuntimeError(f"cannot mix tensors on {v.device} with remote GPU tensors")
            sig.append(("cpu", v.dtype, v.shape, v.stride()))
            bufs.append(v)
        elif t is torch.layout and v is not torch.strided:
            raise NotImplementedError(f"layout {v} is not supported on the remote GPU")
        elif t is torch.dtype or t is torch.device or t is torch.memory_format or t is torch.layout:
            sig.append(v)
        elif t is complex:
            sig.append((t, repr(v)))  # a constant: -0.0 and 0.0 parts must differ in the key
        else:
            argument_encoder(remote_type, remote_ref)(v, sig, bufs, inputs)  # raises, saying why

    return encode


def signature_template(remote_type: type):
    """An argument as a signature template (``messages.SigDef``): ``HOLE_TENSOR`` and
    ``HOLE_FLOAT`` where ``signature_encoder`` takes a hole, in the same order, and
    ``argument_encoder``'s wire form elsewhere. Made once per signature."""
    constant = argument_encoder(remote_type, lambda v, sig, inputs: None)

    def template(v):
        t = type(v)
        if t is remote_type or isinstance(v, remote_type):
            return HOLE_TENSOR
        if t is float:
            return HOLE_FLOAT
        if t is list or t is tuple or t is torch.Size:
            return [template(x) for x in v]
        return constant(v, [], [], [])

    return template


def decode_result(v, inputs: dict, make_tensor):
    """A ``call`` result on the client: ``inputs`` maps ids to the op's tensor arguments,
    ``make_tensor(rid, size, stride, offset, dtype, nbytes, dev)`` wraps a new one."""
    t = type(v)
    if t is list:
        return [decode_result(x, inputs, make_tensor) for x in v]
    if t is not dict:
        return v
    tag = _tag(v, _RESULT_TAGS)
    if tag == "t":
        return inputs[v["t"]]
    if tag == "new":
        return make_tensor(
            v["new"], v["size"], v["stride"], v["offset"], DTYPES[v["dtype"]], v["nbytes"],
            v["dev"],
        )
    if tag == "tuple":
        return tuple(decode_result(x, inputs, make_tensor) for x in v["tuple"])
    return DTYPES[v["dt"]]


# -- agent: arguments in, results out --------------------------------------------------------


class ArgumentDecoder:
    """The agent's decoder of one session's op arguments: tensor ids resolve only in that
    session's table (``lookup``), devices only to its own GPUs, buffers only to this frame's."""

    def __init__(self, tensors: dict, lookup, devices: list[torch.device]):
        # ``tensors`` is read directly for the common case; ``lookup`` explains a missing id.
        self.tensors, self.lookup, self.devices = tensors, lookup, devices

    def args(self, args: list, bufs, base=0) -> list:
        """An op's argument list (or a list inside it), its common cases inline: a tensor id,
        a scalar, a list of those (sizes, ``_foreach`` operands). This is paid for every
        op; anything else takes the general path (``__call__``), which checks every tag."""
        out = []
        tensors = self.tensors
        for v in args:
            t = type(v)
            if t is dict:
                if len(v) == 1 and "t" in v:
                    x = tensors.get(v["t"]) if type(v["t"]) is int else None
                    out.append(x if x is not None else self.lookup(v["t"]))
                else:
                    out.append(self(v, bufs, base))
            elif t is int or t is float or t is bool or v is None or t is str:
                out.append(v)
            elif t is list:
                out.append(self.args(v, bufs, base))
            else:
                out.append(self(v, bufs, base))
        return out

    def kwargs(self, kwargs: dict, bufs, base=0) -> dict:
        # Keys are strings: the header is JSON, whose object keys can be nothing else.
        out = {}
        for key, v in kwargs.items():
            t = type(v)
            if t is int or t is float or t is bool or v is None or t is str:
                out[key] = v
            else:
                out[key] = self(v, bufs, base)
        return out

    def __call__(self, v, bufs, base=0):
        t = type(v)
        if t in _SCALARS:
            return v
        if t is list:
            return [self(x, bufs, base) for x in v]
        if t is not dict:
            raise ProtocolError(f"unexpected value of type {t.__name__} in op arguments")
        tag = _tag(v, _ARGUMENT_TAGS)
        x = v[tag]
        if tag == "t":
            return self.lookup(x)
        if tag == "dt":
            dtype = DTYPES.get(x) if type(x) is str else None
            if dtype is None:
                raise ProtocolError(f"unknown dtype {str(x)[:60]!r}")
            return dtype
        if tag == "dev":
            if x == "cpu":
                return _CPU
            i = v.get("i", 0)
            if x != "cuda" or type(i) is not int or not 0 <= i < len(self.devices):
                raise ProtocolError(
                    f"device {str(x)[:20]!r} index {str(i)[:20]!r} is outside this session's "
                    f"{len(self.devices)} GPU(s)"
                )
            return self.devices[i]
        if tag == "cpu":
            if type(x) is not int or type(base) is not int or not 0 <= base + x < len(bufs):
                raise ProtocolError(f"buffer index {str(x)[:20]!r} out of range")
            return tensor_from_buffer(v, bufs[base + x])
        table = MEMORY_FORMATS if tag == "mf" else LAYOUTS if tag == "ly" else None
        if table is not None:
            if type(x) is not str or x not in table:
                raise ProtocolError(f"unknown {tag} value {str(x)[:60]!r}")
            return table[x]
        if type(x) is not list or len(x) != 2 or not all(type(p) in (int, float) for p in x):
            raise ProtocolError(f"a complex number must be [re, im], got {str(x)[:60]!r}")
        return complex(*x)


def encode_result(v, input_id, store):
    """A ``call`` result on the agent: ``input_id(t)`` is the id of an input tensor (or None),
    ``store(t)`` files a new tensor under a fresh (negative) id: ``(id, device index)``."""
    if isinstance(v, torch.Tensor):
        rid = input_id(v)
        if rid is not None:
            return {"t": rid}
        rid, dev = store(v)
        return {
            "new": rid,
            "size": list(v.shape),
            "stride": list(v.stride()),
            "offset": v.storage_offset(),
            "dtype": DTYPE_NAMES[v.dtype],
            "nbytes": v.untyped_storage().nbytes(),
            "dev": dev,
        }
    if isinstance(v, tuple):
        return {"tuple": [encode_result(x, input_id, store) for x in v]}
    if isinstance(v, list):
        return [encode_result(x, input_id, store) for x in v]
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, torch.dtype):
        return {"dt": DTYPE_NAMES[v]}
    raise TypeError(f"cannot return a {type(v).__name__} to the client")


_ARGUMENT_TAGS = frozenset({"t", "dt", "dev", "cpu", "mf", "ly", "c"})
_RESULT_TAGS = frozenset({"t", "new", "tuple", "dt"})


def _tag(v: dict, tags: frozenset) -> str:
    if len(v) == 1:  # most tagged values are just their tag
        for k in v:
            if k in tags:
                return k
    found = [k for k in v if k in tags]
    if len(found) != 1:
        raise ProtocolError(
            f"a tagged value needs exactly one tag of {sorted(tags)}: {str(v)[:100]}"
        )
    return found[0]
