"""Executes one session's ops on real tensors: the agent's only contact with user input.

Op names resolve only inside allow-listed ``torch.ops`` namespaces to real ``OpOverload``
objects; arguments decode from JSON and raw buffers into plain values and tensors. Tensor ids
are looked up in this session's own table, so a session can name nothing but its tensors.
"""

from __future__ import annotations

import collections
import re
import time

import torch

from ..layouts import BOTH_CONTIGUOUS, CONVOLUTIONS, LAYOUT_CHECKED, conform, dense_input
from ..protocol.messages import (
    HOLE_FLOAT,
    HOLE_TENSOR,
    SIG_DEF_SIZE_MAX,
    SIG_SIZE_MAX,
    Free,
    ProtocolError,
    is_id_list,
    parse_record,
    parse_sig_def,
    template_size,
)
from ..protocol.values import DTYPE_NAMES, ArgumentDecoder, encode_result, host_empty

# torchvision's namespace holds tensor kernels only (nms, roi_align, deform_conv2d...); its
# file and image decoders live in another ("image"), which stays closed.
DEFAULT_NAMESPACES = frozenset({"aten", "prims", "torchvision"})
_IMPORTED_BY_NAMESPACE = {"torchvision": "torchvision"}  # registers the ops on first use
# Ops that reach outside the session's tensors (files, process state) are never run.
DENIED_OPS = frozenset(
    {
        "aten::from_file",
        "aten::set_",
        "aten::_set_grad_enabled",
    }
)
_FACTORIES = frozenset(
    f"aten::{n}"
    for n in (
        "empty",
        "empty_strided",
        "zeros",
        "ones",
        "full",
        "rand",
        "randn",
        "randint",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
        "empty_permuted",
    )
)
# What an op needs besides being called, decided once per op name (SessionExecutor._plan).
_FACTORY, _CONVOLUTION, _LAYOUT_CHECKED, _UPLOAD = "factory", "convolution", "layout", "upload"
_BOTH_CONTIGUOUS = "contiguous"
# The agent runs ahead of the GPU by at most this much queued work (see _bound_run_ahead);
# it bounds how long an interrupt waits for work already launched.
RUN_AHEAD_SECONDS = 0.25
RUN_AHEAD_EVERY = 32  # ops between two progress marks (CUDA events)
RUN_AHEAD_MAX_MARKS = 256  # and at most this many marks (8192 ops) in flight
_NAME = re.compile(
    r"^([a-z][a-z0-9_]{0,63})::([a-z_][a-z0-9_]{0,127})\.([A-Za-z_][A-Za-z0-9_]{0,63})$"
)


class OpError(Exception):
    def __init__(self, op, exc):
        super().__init__(str(exc))
        self.op, self.exc = op, exc


def error_payload(exc: BaseException, op: str | None = None, **extra) -> dict:
    if isinstance(exc, OpError):
        op, exc = exc.op, exc.exc
    kind = type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError):
        kind = "OutOfMemoryError"
    return {"type": kind, "message": str(exc).strip().split("\n\n")[0][:4000], "op": op, **extra}


class OpResolver:
    def __init__(self, namespaces=DEFAULT_NAMESPACES):
        self.namespaces = frozenset(namespaces)
        self._cache: dict[str, torch._ops.OpOverload] = {}

    def __call__(self, name) -> torch._ops.OpOverload:
        op = self._cache.get(name) if isinstance(name, str) else None
        if op is not None:
            return op
        m = _NAME.match(name) if isinstance(name, str) else None
        if m is None:
            raise PermissionError(f"malformed op name {name!r}: expected 'namespace::op.overload'")
        ns, base, overload = m.groups()
        if ns not in self.namespaces:
            raise PermissionError(
                f"op {name!r} is outside the allowed namespaces {sorted(self.namespaces)}"
            )
        if f"{ns}::{base}" in DENIED_OPS or base.startswith("__") or overload.startswith("__"):
            raise PermissionError(f"op {name!r} is not allowed on this agent")
        packet = getattr(getattr(torch.ops, ns), base, None)
        if packet is None and ns in _IMPORTED_BY_NAMESPACE:
            try:
                __import__(_IMPORTED_BY_NAMESPACE[ns])
            except Exception as e:
                raise NotImplementedError(
                    f"{name!r} needs {_IMPORTED_BY_NAMESPACE[ns]} on the GPU agent, which "
                    f"cannot import it ({type(e).__name__}: {e})"
                ) from None
            packet = getattr(getattr(torch.ops, ns), base, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            raise NotImplementedError(f"unknown op {name!r}")
        op = getattr(packet, overload, None)
        if not isinstance(op, torch._ops.OpOverload):
            raise NotImplementedError(f"unknown overload {name!r}")
        self._cache[name] = op
        return op


# Cells of a compiled signature template (see _Sig): a hole's index is into the use record.
_C, _T, _F, _L, _LT = "const", "tensor", "float", "list", "tensors"


class _Sig:
    """One signature of the session's table, compiled once: the argument list to copy per use
    (``proto``: constants decoded, ``None`` where a hole goes), the top-level tensor holes as
    ``(position, record index)`` pairs (nearly every hole), and the rest (float holes, lists
    with holes, keyword holes) as cells for the general filler."""

    __slots__ = (
        "name",
        "plan",
        "kernel",
        "proto",
        "tslots",
        "other",
        "kw",
        "kwother",
        "plain",
        "nout",
        "end",
        "size",
        "error",
    )

    def __init__(self, name, nholes, nout, size):
        self.name, self.nout, self.size = name, nout, size
        self.end = 1 + nholes + nout  # a use record's length without its free ids
        self.plan = self.kernel = self.error = None
        self.proto, self.tslots, self.other, self.kw, self.kwother = [], (), (), {}, ()
        self.plain = False  # kernel(*args): no kwargs, no special handling


class SessionExecutor:
    """Tensor table and op execution of one session, on one set of devices."""

    def __init__(self, devices: list[torch.device], resolver: OpResolver | None = None):
        self.devices = devices
        self.resolve = resolver or OpResolver()
        self.tensors: dict[int, torch.Tensor] = {}
        self.failed: set[int] = set()  # ids an async error kept from being produced
        self.error: dict | None = None  # first async error since the last sync point
        self._next_agent_id = 0
        self.cap_bytes: int | None = None
        self.slice_cap = 0
        self.cancelled = False  # the batch running now was interrupted: skip the rest of it
        self.cuda = any(d.type == "cuda" for d in devices)
        self._inflight: collections.deque = collections.deque()  # (time, event) marks
        self._new_event = torch.cuda.Event
        self.slice_name = "this slice"
        # Storage accounting per op (views share a storage) only where no CUDA allocator
        # enforces the cap and counts memory_allocated for us: a CPU agent. A CUDA agent adds
        # up its storages only when asked (``in_use``: detach, swap, an OOM message).
        self.accounting = not self.cuda
        self._storage_of: dict[int, int] = {}
        self._refs: dict[int, list] = {}
        self._in_use = 0
        self.peak = 0
        self._plans: dict[str, tuple] = {}  # op name -> (OpOverload, its kernel, kind)
        self.decode = ArgumentDecoder(self.tensors, self.tensor, devices)
        self.graphs = None  # this session's compiled graphs (agent/graphs.py), if enabled
        # The signature table of the client's current connection (protocol/messages.py).
        self.sigs: dict[int, _Sig] = {}
        self._sig_size = 0
        # While swapped out: (host block, [(id, storage offset)], the device it came from).
        self._swapped: list = []

    # -- decoding --------------------------------------------------------------------
    def tensor(self, rid) -> torch.Tensor:
        t = self.tensors.get(rid) if type(rid) is int else None
        if t is None:
            if type(rid) is not int:
                raise ProtocolError(f"a tensor id must be an integer, got {str(rid)[:60]!r}")
            if rid in self.failed:
                raise RuntimeError(
                    f"tensor {rid} was never produced: an earlier op failed or was "
                    "cancelled by an interrupt"
                )
            raise ProtocolError(
                f"unknown tensor id {rid!r} in this session (freed, or lost with an "
                "earlier GPU context of this session)"
            )
        return t

    # -- execution -------------------------------------------------------------------
    def _plan(self, name) -> tuple:
        """Resolve ``name`` (allow-list, deny-list) once and remember what running it needs.

        Only names that resolved are cached, so every refusal is decided afresh by the
        resolver and nothing but a resolved ``OpOverload`` is ever called."""
        op = self.resolve(name)
        if op in CONVOLUTIONS:
            kind = _CONVOLUTION
        elif op in LAYOUT_CHECKED:
            kind = _LAYOUT_CHECKED
        elif op in BOTH_CONTIGUOUS:
            kind = _BOTH_CONTIGUOUS
        elif op._schema.name in _FACTORIES:
            kind = _FACTORY
        elif op in UPLOADS and self.cuda:
            kind = _UPLOAD
        else:
            kind = None
        # OpOverload.__call__ is one Python frame around its kernel: call the kernel itself.
        plan = (op, getattr(op, "_op", op), kind)
        self._plans[name] = plan
        return plan

    # -- signatures -------------------------------------------------------------------
    def reset_signatures(self) -> None:
        """A new connection starts with an empty table (the client sends its definitions
        again): nothing defined on an earlier connection can be named."""
        self.sigs.clear()
        self._sig_size = 0

    def define_signatures(self, defs) -> None:
        """Add a batch's ``SigDef`` records to the table, in order (before its ops run).

        Broken bounds or numbering are a ``ProtocolError`` (the client and this table would
        no longer agree); a definition whose op or constants are refused is kept, and each use
        of it fails as that op would, so its outputs are known never to exist."""
        if type(defs) is not list:
            raise ProtocolError("sigs must be a list of signature definitions")
        sigs = self.sigs
        for raw in defs:
            d = parse_sig_def(raw)
            if d.n == 0:
                sigs.clear()
                self._sig_size = 0
            elif d.n != len(sigs):
                raise ProtocolError(
                    f"signature {d.n} defined out of order: this connection's table holds "
                    f"{len(sigs)} (definitions are numbered 0, 1, 2, ...; 0 starts afresh)"
                )
            size = template_size(d.args) + template_size(d.kwargs)
            if size > SIG_DEF_SIZE_MAX:
                raise ProtocolError(
                    f"signature {d.n} has {size} template values; at most {SIG_DEF_SIZE_MAX}"
                )
            if self._sig_size + size > SIG_SIZE_MAX:
                raise ProtocolError(
                    f"the signature table is full ({SIG_SIZE_MAX} template values): the "
                    "client must start it afresh (a definition numbered 0)"
                )
            sigs[d.n] = self._compile_sig(d, size)
            self._sig_size += size

    def _compile_sig(self, d, size) -> _Sig:
        # holes: the next hole's index in a use record (0 is the signature id); then the
        # constants that did not decode (a device the session lacks): the op's own error.
        holes = [1]
        args = [self._cell(v, holes) for v in d.args]
        kwargs = {k: self._cell(v, holes) for k, v in d.kwargs.items()}
        sg = _Sig(d.name, holes[0] - 1, d.out, size)
        try:
            if len(holes) > 1:
                raise holes[1]
            sg.plan = self._plans.get(d.name) or self._plan(d.name)
        except Exception as e:  # each use fails as the same Run record would
            sg.error = e
            return sg
        sg.kernel = sg.plan[1]
        sg.proto = [c[1] if c[0] is _C else None for c in args]
        sg.tslots = tuple((p, c[1]) for p, c in enumerate(args) if c[0] is _T)
        sg.other = tuple((p, c) for p, c in enumerate(args) if c[0] is not _C and c[0] is not _T)
        sg.kw = {k: c[1] for k, c in kwargs.items() if c[0] is _C}
        sg.kwother = tuple((k, c) for k, c in kwargs.items() if c[0] is not _C)
        sg.plain = sg.plan[2] is None and not kwargs
        return sg

    def _cell(self, v, holes) -> tuple:
        """A template value as a cell: a decoded constant, a hole (its record index), or a list
        of cells (one of tensor holes only, as foreach ops and cat take, is a slice).

        What would leave the hole count in doubt is a ``ProtocolError`` for the whole table."""
        t = type(v)
        if t is dict:
            if "hole" in v:
                if v == HOLE_TENSOR or v == HOLE_FLOAT:
                    holes[0] += 1
                    return (_T if v["hole"] == "t" else _F, holes[0] - 1)
                raise ProtocolError(f"unknown hole {str(v)[:60]} in a signature")
            if "t" in v or "cpu" in v:
                raise ProtocolError(
                    "a signature holds no tensor ids or buffers: its tensors are holes"
                )
            try:
                return (_C, self.decode(v, (), 0))
            except ProtocolError as e:
                holes.append(e)
                return (_C, None)
        if t is list:
            cells = [self._cell(x, holes) for x in v]
            if all(c[0] is _C for c in cells):
                return (_C, [c[1] for c in cells])
            if all(c[0] is _T for c in cells):
                return (_LT, cells[0][1], cells[-1][1] + 1)
            return (_L, cells)
        if t is int or t is float or t is bool or t is str or v is None:
            return (_C, v)
        raise ProtocolError(f"unexpected value of type {t.__name__} in a signature")

    def _fill(self, cell, rec):
        """The value of a non-constant cell for use record ``rec``."""
        kind = cell[0]
        if kind is _T:
            rid = rec[cell[1]]
            x = self.tensors.get(rid) if type(rid) is int else None
            return x if x is not None else self.tensor(rid)
        if kind is _LT:
            ids = rec[cell[1] : cell[2]]
            if is_id_list(ids):
                try:
                    return [self.tensors[r] for r in ids]
                except KeyError:
                    pass
            return [self.tensor(r) for r in ids]  # raises, naming the id
        if kind is _F:
            v = rec[cell[1]]
            if type(v) is float or type(v) is int:
                return v
            raise ProtocolError(f"a float hole got {str(v)[:60]!r}")
        if kind is _L:
            return [c[1] if c[0] is _C else self._fill(c, rec) for c in cell[1]]
        return cell[1]

    def _sig_kwargs(self, sg, rec) -> dict:
        k = dict(sg.kw)  # a copy: the upload plan may add non_blocking to it
        for key, c in sg.kwother:
            k[key] = self._fill(c, rec)
        return k

    def run(self, name, args, kwargs, bufs, base=0):
        try:
            plan = self._plans.get(name) if type(name) is str else None
            if plan is None:
                plan = self._plan(name)
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ProtocolError("op arguments must be a list and an object")
            a = self.decode.args(args, bufs, base)
            k = self.decode.kwargs(kwargs, bufs, base) if kwargs else {}
            return self._call(plan, a, k)
        except Exception as e:
            raise self._op_error(name, e) from (
                None if isinstance(e, torch.OutOfMemoryError) else e
            )

    def _call(self, plan, a, k):
        op, kernel, kind = plan
        if kind is None:
            return kernel(*a, **k)
        if kind is _CONVOLUTION:
            return conform(kernel(*a, **k), a[0], a[1])
        if kind is _UPLOAD:
            _async_upload(op, a, k)
            return kernel(*a, **k)
        if kind is _LAYOUT_CHECKED:
            a[0] = dense_input(a[0])
        elif kind is _BOTH_CONTIGUOUS:
            a[0], a[1] = a[0].contiguous(), a[1].contiguous()
        elif self.cap_bytes is not None:  # a factory, on an agent that enforces the cap
            self._precheck(op, a, k)
        return kernel(*a, **k)

    def _op_error(self, name, e: Exception) -> OpError:
        if isinstance(e, torch.OutOfMemoryError):
            if "slice" not in str(e):  # the CUDA allocator's own message: say which slice
                first = str(e).split("\n")[0]
                e = torch.OutOfMemoryError(f"{self.oom_message(self.in_use)} ({first})")
            return OpError(name, e)
        return OpError(name if isinstance(name, str) else repr(name)[:100], e)

    def _precheck(self, op, a, k):
        # Refuse an oversized factory before it allocates: on the CPU there is no allocator
        # limit, and a huge request would take the whole node's memory first.
        size = a[0] if a and isinstance(a[0], list) else k.get("size")
        if isinstance(size, list) and all(type(x) is int for x in size):
            n = 1
            for x in size:
                n *= max(x, 0)
            dtype = k.get("dtype") or torch.get_default_dtype()
            need = n * torch.empty((), dtype=dtype).element_size()
            if self._in_use + need > self.cap_bytes:
                raise torch.OutOfMemoryError(self.oom_message(self._in_use + need))

    def run_batch(self, ops, bufs, free=(), interrupted=lambda: False) -> None:
        """Run queued ops; the first failure is kept for the next sync point, like CUDA's.

        ``interrupted()`` is polled every few ops: once it says so, the rest is skipped (their
        outputs are never produced) so that an interrupt stops queued work promptly.

        The loop is ``run`` and ``_store`` inlined for the common op (a ``SigUse`` record, one
        new tensor out, and on a CUDA agent no byte accounting): this is paid per op."""
        self.cancelled = False
        plans, tensors, failed, sigs = self._plans, self.tensors, self.failed, self.sigs
        decode_args, cuda, accounting = self.decode.args, self.cuda, self.accounting
        for i, raw in enumerate(ops):
            if type(raw) is list and raw and type(raw[0]) is int:  # a SigUse
                sg = sigs.get(raw[0])
                if sg is None:
                    raise ProtocolError(
                        f"unknown signature {raw[0]!r}: not defined on this connection"
                    )
                end = sg.end
                if len(raw) != end:
                    if len(raw) < end:
                        raise ProtocolError(
                            f"signature {raw[0]} ({sg.name}) takes {end - 1 - sg.nout} holes "
                            f"and {sg.nout} output ids; the record has {len(raw) - 1} values"
                        )
                    freed = raw[end:]
                    if not is_id_list(freed):
                        raise ProtocolError(f"free ids must be integers, got {str(freed)[:60]}")
                    self.free(freed)  # dropped before this op: their memory is reused now
                if self.cancelled or (i % 8 == 0 and interrupted()):
                    self.cancelled = True
                    self._fail(raw[end - sg.nout : end])
                    continue
                if cuda and i % RUN_AHEAD_EVERY == RUN_AHEAD_EVERY - 1:
                    self._bound_run_ahead()
                try:
                    if sg.error is not None:
                        raise sg.error.with_traceback(None)
                    a = sg.proto.copy()
                    for p, j in sg.tslots:
                        rid = raw[j]
                        x = tensors.get(rid) if type(rid) is int else None
                        a[p] = x if x is not None else self.tensor(rid)
                    for p, c in sg.other:
                        a[p] = self._fill(c, raw)
                    if sg.plain:
                        result = sg.kernel(*a)
                    else:
                        result = self._call(sg.plan, a, self._sig_kwargs(sg, raw))
                except Exception as e:
                    self._fail(raw[end - sg.nout : end])
                    if self.error is None:
                        self.error = error_payload(self._op_error(sg.name, e), deferred=True)
                    continue
                if not accounting and sg.nout == 1 and type(result) is torch.Tensor:
                    rid = raw[end - 1]
                    if type(rid) is int and rid > 0 and rid not in tensors and rid not in failed:
                        tensors[rid] = result
                        continue
                try:
                    self._store(result, raw[end - sg.nout : end], sg.name)
                except Exception as e:
                    self._fail(raw[end - sg.nout : end])
                    if self.error is None:
                        self.error = error_payload(e, deferred=True)
                continue
            rec = parse_record(raw)
            if type(rec) is not list:
                if type(rec) is Free:
                    self.free(rec.ids)
                else:
                    self._run_graph(rec)  # a compiled graph (agent/graphs.py), in stream order
                continue
            name, args, kwargs, outs, base = rec
            if self.cancelled or (i % 8 == 0 and interrupted()):
                self.cancelled = True
                self._fail(outs)
                continue
            if cuda and i % RUN_AHEAD_EVERY == RUN_AHEAD_EVERY - 1:
                self._bound_run_ahead()
            try:
                plan = plans.get(name) if type(name) is str else None
                if plan is None:
                    plan = self._plan(name)
                a = decode_args(args, bufs, base)
                if plan[2] is None and not kwargs:
                    result = plan[1](*a)
                else:
                    result = self._call(plan, a, self.decode.kwargs(kwargs, bufs, base))
            except Exception as e:
                self._fail(outs)
                if self.error is None:
                    self.error = error_payload(self._op_error(name, e), deferred=True)
                continue
            if (
                not accounting
                and type(result) is torch.Tensor
                and len(outs) == 1
                and outs[0] > 0
                and outs[0] not in tensors
                and outs[0] not in failed
            ):
                tensors[outs[0]] = result  # one new tensor under a fresh id: nothing to undo
                continue
            try:
                self._store(result, outs, name)
            except Exception as e:
                self._fail(outs)
                if self.error is None:
                    self.error = error_payload(e, deferred=True)
        if free:
            self.free(free)

    def _run_graph(self, rec) -> None:
        handle, in_ids, out_ids = rec
        if self.cancelled:
            self._fail(out_ids)
            return
        try:
            if self.graphs is None:
                raise ProtocolError("this agent runs no compiled graphs")
            self.graphs.run(handle, in_ids, out_ids)
        except Exception as e:
            self._fail(out_ids)
            if self.error is None:
                self.error = error_payload(OpError("compiled graph", e), deferred=True)

    def _bound_run_ahead(self) -> None:
        """Keep the GPU fed but never more than ``RUN_AHEAD_SECONDS`` behind the ops issued.

        An event marks every ``RUN_AHEAD_EVERY`` ops. Finished marks are dropped by polling
        (``query()``, no wait); only when the oldest unfinished mark is older than the budget
        is the GPU that far behind, and then (only then) this waits for it. So a launch-bound
        loop never synchronises, while an interrupt (or a swap) finds at most about
        ``RUN_AHEAD_SECONDS`` of queued GPU work left to drain."""
        now = time.monotonic()
        ev = self._new_event()
        ev.record()
        inflight = self._inflight
        inflight.append((now, ev))
        while inflight:
            t0, oldest = inflight[0]
            if not oldest.query():
                if now - t0 < RUN_AHEAD_SECONDS and len(inflight) <= RUN_AHEAD_MAX_MARKS:
                    break
                oldest.synchronize()
            inflight.popleft()

    def _store(self, result, outs, name=None):
        if type(result) is torch.Tensor and type(outs) is list and len(outs) == 1:
            rid = outs[0]  # one new tensor: the common case, without the general walk below
            if type(rid) is int and rid > 0:
                if rid in self.tensors or rid in self.failed:
                    self.free([rid])  # a reused id replaces its tensor
                self.tensors[rid] = result
                if self.accounting:
                    self._account(rid, result)
                    if self.cap_bytes is not None and self._in_use > self.cap_bytes:
                        over = self._in_use
                        self.free([rid])
                        raise torch.OutOfMemoryError(self.oom_message(over))
                return
        flat = _flat(result, [])
        if not isinstance(outs, list) or len(outs) != len(flat):
            raise ProtocolError(f"op produced {len(flat)} tensors but {outs!r} ids were given")
        new = []
        for rid, t in zip(outs, flat, strict=True):
            if rid:  # 0: the op wrote into one of its inputs, which already has an id
                if type(rid) is not int or rid <= 0:
                    raise ProtocolError(f"bad output id {rid!r}")
                if rid in self.tensors or rid in self.failed:
                    self.free([rid])  # a reused id replaces its tensor
                self.tensors[rid] = t
                if self.accounting:
                    self._account(rid, t)
                new.append(rid)
        if self.cap_bytes is not None and self.accounting and self._in_use > self.cap_bytes:
            over = self._in_use
            self.free(new)
            raise torch.OutOfMemoryError(self.oom_message(over))

    @property
    def in_use(self) -> int:
        """Bytes of this session's live storages (each storage once, however many views)."""
        if self._swapped:
            return 0  # on the host until the next attach
        if self.accounting:
            return self._in_use
        seen = {}
        for t in self.tensors.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def oom_message(self, wanted: int) -> str:
        gib = 1 << 30
        cap = self.cap_bytes if self.cap_bytes is not None else self.slice_cap
        return (
            f"CUDA out of memory on the {self.slice_name} slice: {cap / gib:.2f} GiB cap, "
            f"{self.in_use / gib:.2f} GiB in use, this op needed {wanted / gib:.2f} GiB in all. "
            "Free tensors (del, torch.cuda.empty_cache()) or ask for a larger GPU fraction."
        )

    def _account(self, rid, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        self._storage_of[rid] = ptr
        ref = self._refs.get(ptr)
        if ref is None:
            n = s.nbytes()
            self._refs[ptr] = [n, 1]
            self._in_use += n
            if self._in_use > self.peak:
                self.peak = self._in_use
        else:
            ref[1] += 1

    def _fail(self, outs):
        if isinstance(outs, list):
            self.failed.update(r for r in outs if type(r) is int and r)

    def free(self, ids) -> None:
        if not isinstance(ids, list):
            raise ProtocolError("free must be a list of ids")
        tensors = self.tensors
        if not self.accounting and not self.failed:
            for rid in ids:
                if type(rid) is int:
                    tensors.pop(rid, None)
            return
        for rid in ids:
            if type(rid) is int:
                tensors.pop(rid, None)
                self.failed.discard(rid)
                ptr = self._storage_of.pop(rid, None)
                ref = self._refs.get(ptr)
                if ref is not None:
                    ref[1] -= 1
                    if ref[1] == 0:
                        del self._refs[ptr]
                        self._in_use -= ref[0]

    def take_error(self) -> dict | None:
        err, self.error = self.error, None
        return err

    def call(self, name, args, kwargs, bufs):
        """Run one op now and describe its result (shapes for data-dependent outputs, values)."""
        result = self.run(name, args, kwargs, bufs)
        inputs = None

        def input_id(t):
            # Built on the first tensor in the result only: most calls (.item(), nonzero's
            # count) return none, and this walks the session's whole table.
            nonlocal inputs
            if inputs is None:
                inputs = {id(x): rid for rid, x in self.tensors.items()}
            return inputs.get(id(t))

        return encode_result(result, input_id, self._keep_result)

    def _keep_result(self, t) -> tuple[int, int]:
        # Below zero: the client numbers its tensors from 1 up, unaware of these.
        self._next_agent_id -= 1
        self.tensors[self._next_agent_id] = t
        if self.accounting:
            self._account(self._next_agent_id, t)
        return self._next_agent_id, self.devices.index(t.device) if t.device in self.devices else 0

    def fetch(self, rid):
        t = self.tensor(rid).detach().resolve_conj().resolve_neg()
        if t.device.type == "cpu" and t.is_contiguous():
            data = t  # sent before any later op runs: no copy needed
        else:
            # A dense copy (expanded or sliced tensors cannot be viewed as bytes), into pinned
            # memory from a GPU when it is large: the copy runs at PCIe speed and is sent from
            # where it lands (a scalar for .item() needs no allocator round trip).
            pin = t.is_cuda and t.numel() * t.element_size() >= 1 << 16
            data = host_empty(t.shape, t.dtype, pin).copy_(t)
        raw = (
            data.reshape(-1).view(torch.uint8)
            if data.numel()
            else torch.empty(0, dtype=torch.uint8)
        )
        return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}, raw.numpy()

    # -- swapping an idle session's tensors between device and host ----------------------
    def swap_out(self, pin: bool, extent: torch.Tensor | None = None) -> int:
        """Copy every live storage to host memory, free the device copies; bytes moved.

        Views share one storage, so storages (not tensors) are copied once each and every
        tensor is re-pointed at its storage's copy with its own size, stride and offset. The
        copies go into ``extent`` (a uint8 tensor in the agent's swap arena) when they fit,
        else into fresh (pinned, on a GPU) host memory."""
        groups: dict[int, tuple] = {}
        for rid, t in self.tensors.items():
            s = t.untyped_storage()
            groups.setdefault(s.data_ptr(), (s, []))[1].append(rid)
        need = sum(_aligned(s.nbytes()) for s, _ in groups.values())
        use_extent = extent is not None and need <= extent.numel()
        blocks, off = [], 0
        for s, rids in groups.values():
            n = s.nbytes()
            if use_extent:
                host = extent[off:off + n]
                off += _aligned(n)
            else:
                host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
            if n:
                host.copy_(_bytes_of(s), non_blocking=True)
            blocks.append((host, rids, s.device))
        self._synchronize()
        self._swapped = []
        for host, rids, device in blocks:
            keep = []
            for rid in rids:
                t = self.tensors[rid]
                keep.append((rid, t.storage_offset()))
                self.tensors[rid] = _view_of(host, t, t.storage_offset())
            self._swapped.append((host, keep, device))
        self._storage_of.clear()
        self._refs.clear()
        self._in_use = 0
        return sum(b[0].numel() for b in blocks)

    def swap_in(self) -> int:
        """Bring what ``swap_out`` moved back to its devices (views alias again); bytes moved."""
        moved = 0
        for host, keep, device in self._swapped:
            dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
            if host.numel():
                dev.copy_(host, non_blocking=True)
            moved += host.numel()
            for rid, offset in keep:
                t = self.tensors.get(rid)
                if t is not None:
                    self.tensors[rid] = _view_of(dev, t, offset)
        self._synchronize()  # the host side (an arena extent) is handed back after this
        self._swapped = []
        if self.accounting:
            for rid, t in self.tensors.items():
                self._account(rid, t)
        return moved

    def _synchronize(self) -> None:
        if self.cuda:
            for d in dict.fromkeys(self.devices):  # a swap's copies run on each of its GPUs
                torch.cuda.synchronize(d)


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def _bytes_of(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _view_of(block: torch.Tensor, t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t``'s size, stride and dtype over ``block`` (a uint8 tensor holding its storage's
    bytes), at element ``offset`` of that storage."""
    isz = t.element_size()
    base = block.storage_offset()  # bytes: the block may be an extent of the arena
    if base % isz:
        raise RuntimeError("a swapped storage is misaligned for its dtype")
    return torch.empty(0, dtype=t.dtype, device=block.device).set_(
        block.untyped_storage(), base // isz + offset, t.size(), t.stride()
    )


aten = torch.ops.aten
UPLOADS = frozenset({aten._to_copy.default, aten.copy_.default})


def _async_upload(op, a: list, k: dict) -> None:
    """Let a copy from a frame's payload to the GPU run asynchronously.

    A blocking copy would stall this worker until the GPU has drained everything queued
    before it (a training step's batch upload would be a bubble every step). The client
    cannot observe the difference: the payload is the worker's own pinned buffer, written
    once on receipt, and the caching host allocator keeps it until the copy has read it."""
    if op is aten._to_copy.default:
        src, dst_device = a[0], k.get("device")
        if dst_device is not None and dst_device.type == "cuda" and _pinned_cpu(src):
            k["non_blocking"] = True
    elif a[0].is_cuda and _pinned_cpu(a[1]):
        if len(a) > 2:
            a[2] = True
        else:
            k["non_blocking"] = True


def _pinned_cpu(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_pinned()


def _flat(v, out):
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _flat(x, out)
    return out
