"""The torch side of the remote device: a Python PrivateUse1 backend of wrapper tensors.

Every tensor "on the GPU" is a :class:`RemoteTensor`: a storage-less wrapper that knows
its shape, strides and dtype and names a real tensor on the agent by id. Ops reaching the
backend (through ``__torch_dispatch__`` for tensor ops, the PrivateUse1 fallback for
factories) get their output metadata from meta-tensor inference, are queued for the agent
and return new wrappers at once; only ops whose results the caller must see (``.item()``,
``.cpu()``, data-dependent shapes) wait for the agent.

The backend is registered as PrivateUse1 (renamed ``egpu``) because autograd needs a device
guard for the wrapper's device; user-facing names say ``cuda`` (see ``cuda_facade``).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

from ..layouts import CONVOLUTIONS, conform
from ..protocol.values import (
    ANY_FLOAT,
    argument_encoder,
    signature_encoder,
    signature_template,
)

BACKEND = "egpu"

_session = None  # the process's one RemoteSession (see session.py)


class RemoteError(RuntimeError):
    """An op failed on the agent; the message names the op."""


def current_session():
    if _session is None:
        raise RuntimeError(
            "no remote GPU is attached to this process: call jupyter_elastic_gpu.remote.attach() "
            "or start it with `jupyter-elastic-gpu run --gpu FRACTION -- python ...`"
        )
    return _session


class RemoteTensor(torch.Tensor):
    """A tensor whose data lives on the agent; ``_rid`` names it within the session."""

    @staticmethod
    def __new__(cls, sess, rid, size, stride, offset, dtype, nbytes, index=0):
        meta = (tuple(size), tuple(stride), offset, dtype, nbytes)
        return _new_wrapper(
            sess, rid, meta[0], _wrapper_kwargs(*meta[:4]), nbytes, index, _meta_key(meta)
        )

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        op = _OPS.get(func) or _op_record(func)
        if op.special is not None:
            return op.special(func, args, kwargs or {})
        return _forward(func, args, kwargs or {}, op)

    # ``x.data = y`` copies only y's C++ metadata into x; x must also name y's data on the
    # agent (an alias there, as the two share storage on a GPU) and carry y's metadata key.
    @property
    def data(self):
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, value):
        _TENSOR_DATA.__set__(self, value)  # torch's checks (compatible types) come first
        if type(value) is RemoteTensor:
            alias = torch.ops.aten.alias.default(value)
            # The alias wrapper takes over our old id, so dropping it frees that on the agent.
            self._rid, alias._rid = alias._rid, self._rid
            self._sess, self._idx = value._sess, value._idx
            self._nbytes, self._key = value._nbytes, value._key

    def __del__(self):
        if self._rid:  # id 0: a metadata donor that owns nothing
            # list.append is atomic under the GIL: safe from the GC at any point.
            self._sess.freed.append(self._rid)

    # Users wrote "cuda"; show them "cuda". torch internals use the C++ device (egpu).
    @property
    def device(self):
        return torch.device("cuda", self._idx)

    @property
    def is_cuda(self):
        return True

    def __repr__(self, *, tensor_contents=None):
        from torch._tensor_str import _tensor_str

        with torch.no_grad():
            local = self.detach().cpu()
        body = _tensor_str(local, len("tensor("))
        suffixes = [f"device='{self.device}'"]
        if self.dtype not in (torch.get_default_dtype(), torch.int64, torch.bool):
            suffixes.append(f"dtype={self.dtype}")
        if self.numel() == 0 and self.dim() != 1:
            suffixes.append(f"size={tuple(self.shape)}")
        if self.grad_fn is not None:
            suffixes.append(f"grad_fn=<{type(self.grad_fn).__name__}>")
        elif self.requires_grad:
            suffixes.append("requires_grad=True")
        prefix = "Parameter containing:\n" if getattr(self, "_is_param", False) else ""
        return f"{prefix}tensor({body}, {', '.join(suffixes)})"

    __str__ = __repr__

    def __format__(self, format_spec):
        # torch formats only plain 0-dim Tensors as numbers (f"{loss:.3f}"); for any other
        # tensor it says the same as torch does for a CPU tensor of that shape.
        if self.dim() == 0:
            return self.detach().item().__format__(format_spec)
        if format_spec:
            raise TypeError("unsupported format string passed to Tensor.__format__")
        return str(self)

    def tolist(self):
        return self.cpu().tolist()

    # torch builds index tensors from Python lists (x[[0, 2]], masks as lists) and new_tensor's
    # data in C++ straight onto the tensor's backend, a path that asserts for Python-defined
    # backends; build them with torch.tensor(..., device=) instead, which the facade serves.
    def __getitem__(self, index):
        return super().__getitem__(_index_lists_to_tensors(index, self.device))

    def __setitem__(self, index, value):
        return super().__setitem__(_index_lists_to_tensors(index, self.device), value)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False, **kw):
        if isinstance(data, torch.Tensor):
            t = data.detach().to(device or self.device, dtype or self.dtype).clone()
        else:
            t = torch.tensor(data, dtype=dtype or self.dtype, device=device or self.device)
        return t.requires_grad_(requires_grad)

    def __reduce_ex__(self, proto):
        from .serialization import reduce_remote  # saved as CUDA tensors are: see there

        return reduce_remote(self)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone()
        new.requires_grad_(self.requires_grad)
        if getattr(self, "_is_param", False):
            new = torch.nn.Parameter(new, self.requires_grad)
        memo[id(self)] = new
        return new


def _index_lists_to_tensors(index, device):
    if (
        type(index) is list
        and len(index) < 32
        and any(
            isinstance(i, (list, tuple, slice, torch.Tensor)) or i is None or i is Ellipsis
            for i in index
        )
    ):
        index = tuple(index)  # torch's (NumPy's) legacy rule: such a list is a tuple of indices
    if type(index) is tuple:
        return tuple(_index_lists_to_tensors(i, device) for i in index)
    if type(index) is list:
        try:  # lists of ints/bools (nested too) index like tensors of them, as in numpy
            return torch.tensor(index, device=device, dtype=None if index else torch.long)
        except (TypeError, ValueError, RuntimeError):
            return index  # let torch say what it makes of it
    return index


# ---------------------------------------------------------------------------------------
# The per-op hot path. One pass over the arguments builds the meta-inference cache key, the
# values of the op's signature holes (tensor ids, varying floats) and the list of CPU buffers
# to upload; a cache hit then needs no meta tensors, and the cache entry also names the wire
# signature (protocol/messages.py: ``SigDef``/``SigUse``) that the key stands for: the key
# fixes everything but the holes, so a key is one signature. A wrapper's metadata enters the
# key as one small int (``_key``, interned when the wrapper is made), not as the shape,
# strides, offset and dtype read back from C++ for every op.

_META_KEYS: dict = {}
# Never reused, so the intern table may be cleared; negative, so a key never reads as one of
# the list lengths beside it in a signature.
_next_key = itertools.count(-1, -1).__next__


def _meta_key(meta):
    """The int that stands for ``(size, stride, offset, dtype, nbytes)`` in cache keys."""
    k = _META_KEYS.get(meta)
    if k is None:
        if len(_META_KEYS) > 1_000_000:
            _META_KEYS.clear()
        k = _META_KEYS[meta] = _next_key()
    return k


_mws = torch.Tensor._make_wrapper_subclass
_TENSOR_DATA = torch._C.TensorBase.data


def _wrapper_kwargs(size, stride, offset, dtype):
    """``_make_wrapper_subclass`` arguments beside size and device, made once per output spec:
    the strides and offset only where they are not the defaults, which torch fills in faster
    than it parses them."""
    kw = {"dtype": dtype}
    contiguous, acc = [], 1
    for n in reversed(size):
        contiguous.append(acc)
        acc *= max(n, 1)
    if offset:  # torch takes an offset only with strides
        kw["strides"], kw["storage_offset"] = stride, offset
    elif tuple(stride) != tuple(reversed(contiguous)):
        kw["strides"] = stride
    return kw


def _new_wrapper(sess, rid, size, kw, nbytes, idx, key):
    r = _mws(RemoteTensor, size, device=sess.devices[idx], **kw)
    r._sess = sess
    r._rid = rid
    r._nbytes = nbytes
    r._idx = idx  # which of the session's GPUs (cuda:N): a lease above 1 has several
    r._key = key
    return r


class _Op:
    """What the hot path needs to know about one op, looked up once per call."""

    __slots__ = ("name", "special", "cache", "scalar_free")

    def __init__(self, func):
        self.name = f"{func._schema.name}.{func._overloadname}"
        self.special = SPECIAL.get(func)
        # argument key -> [output spec (or _SYNC), wire signature id, the table it is in]
        self.cache = {}
        # Float scalars change no output metadata of elementwise and foreach ops (only their
        # kind takes part in type promotion), yet optimizers pass new ones every step (lr
        # schedules, bias corrections): keying them by value would miss the cache every step.
        self.scalar_free = torch.Tag.pointwise in func.tags or func._schema.name.startswith(
            "aten::_foreach_"
        )


_OPS: dict = {}


def _op_record(func):
    op = _OPS[func] = _Op(func)
    return op


def _float_key(v):
    # Values beyond int8's range may overflow a conversion (an error meta inference reports),
    # so they keep their value in the key; the rest share one entry.
    return _FLOAT if -128.0 <= v <= 127.0 else (float, v)


_FLOAT = ANY_FLOAT


def _remote_ref(v, sig, inputs):
    if v._sess is not _session:
        raise RuntimeError(
            "this tensor belongs to an earlier remote GPU session (detached or "
            "re-attached since), so its data is gone"
        )
    sig.append(v._key)
    inputs.append(v)
    return v._rid


_encode = argument_encoder(RemoteTensor, _remote_ref)
_holes = signature_encoder(RemoteTensor, _remote_ref)
_holes_scalar_free = signature_encoder(RemoteTensor, _remote_ref, _float_key)
_template = signature_template(RemoteTensor)
_UNSIGNED = object()  # a cache entry's table when its template is too large for a signature


def _wire_args(args, kwargs):
    """The self-contained ``Run`` form of an op's arguments, and its CPU buffers (uploads,
    sync calls and templates too large for a signature)."""
    sig, bufs, inputs = [], [], []  # the key was made already, by _holes
    eargs = [_encode(v, sig, bufs, inputs) for v in args]
    ekwargs = {k: _encode(v, sig, bufs, inputs) for k, v in kwargs.items()} if kwargs else {}
    return eargs, ekwargs, bufs


def _define(sess, entry, op, args, kwargs, nout) -> bool:
    """Give cache ``entry`` a signature in ``sess``'s current table; False: none fits, or the
    agent reads no signatures."""
    if entry[2] is _UNSIGNED:
        return False
    if not sess.attached:
        sess.attach()  # its hello reply tells whether this agent reads signatures
    if not sess.signatures:
        return False
    got = sess.define_signature(
        op.name, [_template(v) for v in args], {k: _template(v) for k, v in kwargs.items()}, nout
    )
    if got is None:
        entry[2] = _UNSIGNED
        return False
    entry[1], entry[2] = got
    return True


def _to_meta(v, metas):
    """Meta stand-ins for an op's arguments; ``metas`` gets those of remote tensors, in order."""
    if isinstance(v, RemoteTensor):
        base = torch.empty(
            v._nbytes // v.element_size() if v.element_size() else 0, dtype=v.dtype, device="meta"
        )
        m = base.as_strided(v.shape, v.stride(), v.storage_offset())
        metas.append(m)
        return m
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if type(v) is torch.device and v.type == BACKEND:
        return torch.device("meta")
    if type(v) in (list, tuple):
        return type(v)(_to_meta(x, metas) for x in v)
    return v


class _NeedsAgent(Exception):
    """Meta inference cannot tell the output: run the op synchronously on the agent."""


def _out_spec(res, meta_inputs, sizes_ok=False):
    """Describe an op's meta result so it can be rebuilt from the cache without re-running:
    ``("n", size, wrapper kwargs, nbytes, key)`` a new tensor, ``("a", k, size, kwargs,
    nbytes, key)`` input ``k`` (metadata as given), ``("l", type, specs)`` a list or tuple,
    ``("v", value)`` a value.

    ``sizes_ok``: int results are sizes, which meta inference knows exactly."""
    if isinstance(res, torch.Tensor):
        meta = _meta_of(res)
        out = (meta[0], _wrapper_kwargs(*meta[:4]), meta[4], _meta_key(meta))
        for k, m in enumerate(meta_inputs):
            if res is m:
                # In-place metadata ops (squeeze_, t_, resize_...) change the input's shape too.
                return ("a", k, *out)
        return ("n", *out)
    if type(res) in (list, tuple):
        return ("l", type(res), tuple(_out_spec(r, meta_inputs, sizes_ok) for r in res))
    if res is None or (sizes_ok and type(res) is int):
        return ("v", res)
    # A non-tensor result (int, bool...) depends on data: only the agent knows it.
    raise _NeedsAgent


def _meta_of(t):
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.untyped_storage().nbytes())


def _build(spec, inputs, ids, sess, idx=0):
    kind = spec[0]
    if kind == "n":
        rid = sess.new_id()
        ids.append(rid)
        return _new_wrapper(sess, rid, spec[1], spec[2], spec[3], idx, spec[4])
    if kind == "a":
        ids.append(0)
        x = inputs[spec[1]]
        if x._key != spec[5]:
            _restride(x, spec[2], spec[3], spec[4], spec[5], sess)
        return x
    if kind == "l":
        return spec[1](_build(s, inputs, ids, sess, idx) for s in spec[2])
    return spec[1]


# As on CUDA, only copies and indexing take non-scalar CPU tensors beside device tensors.
_CPU_TENSOR_ARGS_OK = {
    torch.ops.aten.copy_.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten.index_put.default,
}


def _restride(x, size, kw, nbytes, key, sess):
    """Give wrapper ``x`` new metadata in place (torch's ``.data`` setter shallow-copies a
    TensorImpl; ours would also re-point ``x`` at the donor's data)."""
    _TENSOR_DATA.__set__(x, _new_wrapper(sess, 0, size, kw, nbytes, x._idx, key))
    x._nbytes, x._key = nbytes, key


# Ops whose int results are sequence lengths that meta inference computes exactly (their
# schemas say SymInt); any other int result depends on data and makes the op synchronous.
_INT_RESULTS_ARE_SIZES = {torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default}
_SYNC = object()  # cache marker: this signature must run on the agent synchronously
_CACHE_MAX = 20_000  # signatures per op; a workload of ever-new shapes starts over


def _dispatch(func, args, kwargs):
    op = _OPS.get(func) or _op_record(func)
    if op.special is not None:
        return op.special(func, args, kwargs)
    return _forward(func, args, kwargs, op)


def _forward(func, args, kwargs, op=None):
    """Queue ``func`` for the agent and return its outputs' wrappers without waiting."""
    sess = _session
    if sess is None:
        current_session()  # raises, saying how to attach
    if op is None:
        op = _OPS.get(func) or _op_record(func)
    scalar_free = op.scalar_free
    sig = [len(args)]
    bufs = []
    inputs = []  # remote tensor arguments in order, for ops that return one of them
    # The use record (messages.SigUse): the signature id goes first, once the key has found it.
    rec = [0]
    # ``_holes`` of the positional arguments (same holes, same key), with remote tensors and
    # plain scalars inline: they are nearly all arguments of nearly all ops.
    for v in args:
        t = type(v)
        if t is RemoteTensor and v._sess is sess:
            sig.append(v._key)
            inputs.append(v)
            rec.append(v._rid)
        elif t is float:  # always a hole (see signature_encoder)
            sig.append(_FLOAT if scalar_free and -128.0 <= v <= 127.0 else (t, v))  # _float_key
            rec.append(v)
        elif t is int or t is bool or v is None:
            sig.append((t, v))
        else:
            (_holes_scalar_free if scalar_free else _holes)(v, sig, rec, bufs, inputs)
    if kwargs:
        enc = _holes_scalar_free if scalar_free else _holes
        for v in kwargs.values():
            enc(v, sig, rec, bufs, inputs)
        sig.append(tuple(kwargs))
    if bufs and func not in _CPU_TENSOR_ARGS_OK and any(b.dim() for b in bufs):
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two "
            f"devices, cuda:0 and cpu! (in {func})"
        )
    key = tuple(sig)
    cache = op.cache
    # [output spec, signature id, the session table that id is in (or _UNSIGNED)]
    entry = cache.get(key)
    if entry is None:
        entry = [_infer(func, args, kwargs, inputs), 0, None]
        # A scalar-free key stands for many scalar values; one that fails to infer may be the
        # odd value out (an overflow), so it is not held against the others.
        if entry[0] is not _SYNC or not scalar_free:
            if len(cache) > _CACHE_MAX:
                cache.clear()
            cache[key] = entry
    spec = entry[0]
    if spec is _SYNC:
        eargs, ekwargs, bufs = _wire_args(args, kwargs)
        return sess.call(func, eargs, ekwargs, bufs, inputs)
    # Outputs live where the op runs: an explicit device argument, else its first input's GPU.
    if kwargs:
        d = kwargs.get("device")
        idx = (
            d.index or 0
            if type(d) is torch.device and d.type == BACKEND
            else inputs[0]._idx
            if inputs
            else 0
        )
    else:
        idx = inputs[0]._idx if inputs else 0
    if spec[0] == "n":  # one new tensor: most ops
        rid = sess.new_id()
        ids = [rid]
        out = _new_wrapper(sess, rid, spec[1], spec[2], spec[3], idx, spec[4])
    else:
        ids = []
        out = _build(spec, inputs, ids, sess, idx)
    if entry[2] is not sess.sigs and (bufs or not _define(sess, entry, op, args, kwargs, len(ids))):
        eargs, ekwargs, bufs = _wire_args(args, kwargs)
        sess.enqueue(op.name, eargs, ekwargs, ids, bufs)
        return out
    rec[0] = entry[1]
    rec += ids
    sess.enqueue_sig(rec)
    return out


def _infer(func, args, kwargs, inputs):
    meta_inputs = []
    margs = _to_meta(args, meta_inputs)
    mkwargs = {k: _to_meta(v, meta_inputs) for k, v in kwargs.items()}
    try:
        res = func(*margs, **mkwargs)
        if func in CONVOLUTIONS:
            res = conform(res, margs[0], margs[1])
    except Exception:
        # No meta kernel, a data-dependent shape, or a user error: the agent runs it now and
        # either returns the real outputs or raises the real (CUDA's own) error.
        return _SYNC
    try:
        return _out_spec(res, meta_inputs, func in _INT_RESULTS_ARE_SIZES)
    except _NeedsAgent:
        return _SYNC


# ---------------------------------------------------------------------------------------
# Ops that cross the device boundary or must not be forwarded as they are.


def _to_copy(func, args, kwargs):
    (x,) = args
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cpu":
        local = x._sess.fetch(x)
        dtype, fmt = kwargs.get("dtype"), kwargs.get("memory_format")
        if dtype is not None and dtype != local.dtype:
            local = local.to(dtype)
        if fmt is not None and fmt is not torch.preserve_format:
            local = local.contiguous(memory_format=fmt)
        return local
    return _forward(func, args, kwargs)


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, RemoteTensor):  # remote -> CPU
        dst.copy_(src._sess.fetch(src))
        return dst
    return _forward(func, args, kwargs)


def _local_scalar_dense(func, args, kwargs):
    return args[0]._sess.item(args[0])


def _is_pinned(func, args, kwargs):
    return False


def _compatible_shallow_copy(func, args, kwargs):
    return isinstance(args[0], RemoteTensor) and isinstance(args[1], RemoteTensor)


def _is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


aten = torch.ops.aten
SPECIAL = {
    aten._has_compatible_shallow_copy_type.default: _compatible_shallow_copy,
    aten.is_same_size.default: _is_same_size,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten.is_pinned.default: _is_pinned,
}


# ---------------------------------------------------------------------------------------

_registered = False


def register_backend(backend_module) -> None:
    """Register the Python PrivateUse1 backend once per process."""
    global _registered
    if _registered:
        return
    _setup_privateuseone_for_python_backend(rename=BACKEND, backend_module=backend_module)
    lib = torch.library.Library("_", "IMPL")
    # Factories have no tensor argument, so they reach the backend key, not Python.
    lib.fallback(lambda op, *a, **k: _dispatch(op, a, k), dispatch_key="PrivateUse1")
    register_backend._lib = lib
    # The optimizers take their foreach (multi-tensor) path only for known tensor types.
    from torch.optim import optimizer

    if RemoteTensor not in optimizer._foreach_supported_types:
        optimizer._foreach_supported_types.append(RemoteTensor)
    from . import modules

    modules.install()
    _registered = True
