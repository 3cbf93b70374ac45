"""Every data-plane message, declared once: the client builds them, the agent parses them.

A request is a frame header ``{"op": NAME, field: value, ...}`` (see ``frames.py``); each op
is one frozen dataclass below, and ``parse`` is the one validator both of the agent's readers
(its main process for a connection's first frame, a session's worker for the rest) call before
dispatching on the parsed type. Field types are checked exactly (``True`` is no int, ``"0"`` is
no index), so a handler gets only the shapes it was declared to take. Fields a peer adds that
are not declared are ignored, as in Jupyter's message spec, so old agents accept new clients
(which send signature records only to an agent whose hello reply says it reads them).

Op arguments inside ``call`` and ``batch`` are values of ``values.py``'s tagged schema; their
tensors travel as the frame's raw buffers. Replies are ``{"ok": true, ...}``, an
``error_reply``, or, under TLS, ``{"handover": "tls"}`` (see ``tls.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Annotated, Any, ClassVar, NamedTuple, Union


class ProtocolError(Exception):
    """A frame or value that does not follow the wire format."""


class Op(str, enum.Enum):
    """The requests of the data plane (the ``op`` of a header)."""

    HELLO = "hello"
    INVENTORY = "inventory"
    INTERRUPT = "interrupt"
    CLOSE = "close"
    RENEW = "renew"
    BATCH = "batch"
    DETACH = "detach"
    SYNC = "sync"
    FETCH = "fetch"
    CALL = "call"
    MEMORY = "memory"
    MANUAL_SEED = "manual_seed"
    GET_RNG_STATE = "get_rng_state"
    SET_RNG_STATE = "set_rng_state"
    EMPTY_CACHE = "empty_cache"
    COMPILE_GRAPH = "compile_graph"
    BULK_HELLO = "bulk_hello"
    CHUNK = "chunk"

    def __str__(self) -> str:
        return self.value


def _session_id(v) -> bool:
    return 0 < len(v) <= 128


SessionId = Annotated[str, _session_id, "a session id of 1 to 128 characters"]

# A session's parallel bulk streams (see bulk.py): at most this many beside its connection.
MAX_BULK_STREAMS = 16
StreamIndex = Annotated[
    int, lambda v: 0 <= v < MAX_BULK_STREAMS, f"a stream index from 0 to {MAX_BULK_STREAMS - 1}"
]


# -- field checks ----------------------------------------------------------------------------


def _is_int(v) -> bool:
    return type(v) is int


def _int_list(v) -> bool:
    if type(v) is not list:
        return False
    for x in v:  # a loop, not all(genexpr): this checks every batch record's ids
        if type(x) is not int:
            return False
    return True


# The executor checks a use record's output and free ids with it, as parse_record does here.
is_id_list = _int_list

_CHECKS: dict[Any, tuple] = {
    str: (lambda v: type(v) is str, "a string"),
    int: (_is_int, "an integer"),
    float: (lambda v: type(v) in (int, float), "a number"),
    bool: (lambda v: type(v) is bool, "a boolean"),
    list: (lambda v: type(v) is list, "a list"),
    dict: (lambda v: type(v) is dict, "an object"),
    list[int]: (_int_list, "a list of integers"),
}


def _checker(hint) -> tuple:
    """(predicate, description) for a declared field type."""
    if hint in _CHECKS:
        return _CHECKS[hint]
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, pred, what = typing.get_args(hint)
        check, _ = _checker(base)
        return (lambda v: check(v) and pred(v)), what
    if origin in (Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        (check, what), nullable = _checker(parts[0]), len(parts) < len(typing.get_args(hint))
        if len(parts) == 1 and nullable:
            return (lambda v: v is None or check(v)), f"{what} or null"
    raise TypeError(f"no wire check for the field type {hint!r}")


def _show(v) -> str:
    return (
        f"{type(v).__name__} {str(v)[:60]!r}"
        if not isinstance(v, (list, dict))
        else (f"{type(v).__name__} of {len(v)}")
    )


class Message:
    """Base of the declared requests; ``OP`` names the request on the wire."""

    OP: ClassVar[Op]
    # Requests that expect no reply: their errors are reported at the next sync point.
    NO_REPLY: ClassVar[bool] = False

    def header(self) -> dict:
        """The frame header of this request (no copy of argument lists: they are sent as is)."""
        h = {"op": self.OP.value}
        for f in dataclasses.fields(self):
            h[f.name] = getattr(self, f.name)
        return h


MESSAGES: dict[str, type[Message]] = {}
_SPECS: dict[type, tuple] = {}


def message(op: Op, *, no_reply: bool = False):
    """Declare a request class for ``op`` (a frozen dataclass whose fields are its body)."""

    def declare(cls):
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        cls.OP, cls.NO_REPLY = op, no_reply
        hints = typing.get_type_hints(cls, include_extras=True)
        _SPECS[cls] = tuple(
            (
                f.name,
                *_checker(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
        MESSAGES[op.value] = cls
        return cls

    return declare


# -- requests --------------------------------------------------------------------------------


@message(Op.HELLO)
class Hello(Message):
    """Open (or re-attach) a session; the agent's main process reads it, then its worker."""

    session: SessionId
    secret: str
    token: str | None = None  # the broker's lease token (None in open mode)
    fraction: float | None = None  # asked for in open mode; a token's claim wins
    pid: int | None = None


@message(Op.INVENTORY)
class Inventory(Message):
    """The agent's GPUs and sessions (no session needed)."""


@message(Op.INTERRUPT)
class Interrupt(Message):
    """Drop a session's work queued before ``epoch``; sent beside its data connection."""

    session: str
    secret: str
    epoch: int | None = None


@message(Op.CLOSE, no_reply=True)
class Close(Message):
    """End a session. On its data connection no fields; to the agent, session and secret."""

    session: str | None = None
    secret: str | None = None


@message(Op.RENEW, no_reply=True)
class Renew(Message):
    token: str | None = None


@message(Op.BATCH, no_reply=True)
class Batch(Message):
    """Queued ops (``SigUse``, ``Run``, ``Free`` and ``RunGraph`` records, in stream order), run
    without a reply. ``sigs``: the ``SigDef`` records the session's signature table gains
    before these ops run; ``free``: ids dropped after the last op."""

    ops: list
    free: list[int] = dataclasses.field(default_factory=list)
    epoch: int = 0
    sigs: list = dataclasses.field(default_factory=list)


@message(Op.DETACH)
class Detach(Message):
    """Drain the session's work and give the GPU slice back; its tensors stay."""


@message(Op.SYNC)
class Sync(Message):
    pass


@message(Op.FETCH)
class Fetch(Message):
    """The bytes of tensor ``t`` (one buffer in the reply, described by its ``tensor``).

    ``streams``: the reply's bytes may come over this many of the session's bulk streams
    (announced in the reply's ``bulk``, see ``parse_bulk``); absent, they come inline.

    ``item``: ``t`` is a one-element real tensor and the client wants its value (``.item()``,
    ``float(x)``, a data-dependent branch): answered ``{"ok", "value"}`` with no buffer, which
    spares both ends a tensor round trip on the most frequent sync. An agent that ignores the
    field answers with the tensor, which the client reads as before."""

    t: int
    streams: int | None = None
    item: bool = False


@message(Op.CALL)
class Call(Message):
    """Run one op now and describe its result: its outputs depend on data."""

    name: str
    args: list = dataclasses.field(default_factory=list)
    kwargs: dict = dataclasses.field(default_factory=dict)


@message(Op.MEMORY)
class Memory(Message):
    pass


@message(Op.MANUAL_SEED)
class ManualSeed(Message):
    seed: int


@message(Op.GET_RNG_STATE)
class GetRngState(Message):
    device: int = 0


@message(Op.SET_RNG_STATE)
class SetRngState(Message):
    """The new state travels as the frame's one buffer."""

    device: int = 0


@message(Op.EMPTY_CACHE)
class EmptyCache(Message):
    pass


@message(Op.COMPILE_GRAPH)
class CompileGraph(Message):
    """Compile a captured graph (data, checked by agent/graphs.py) with inductor; answered
    ``{"ok", "graph": {"handle", "seconds", "cache"}}`` for ``RunGraph`` records."""

    graph: dict
    mode: str | None = None


@message(Op.BULK_HELLO)
class BulkHello(Message):
    """A connection's first frame that makes it bulk stream ``index`` of a session's current
    data connection (bulk.py). Proves ownership as a ``hello`` does (the session secret, and
    the lease token where the agent requires one), and names the connection by the ``conn``
    nonce the worker's hello reply gave, so it joins only the connection it was opened for.
    Answered on the new stream ``{"ok": true, "index": index}`` or refused."""

    session: SessionId
    secret: str
    conn: str
    index: StreamIndex
    token: str | None = None


@message(Op.CHUNK)
class Chunk(Message):
    """The header of one piece of a bulk transfer, on a bulk stream: bytes ``[off, off + n)``
    of transfer ``x`` follow as the frame's one buffer. Never valid on a data connection."""

    x: int
    off: int
    n: int


class Transfer(NamedTuple):
    """A frame's payload ``buf`` sent over bulk streams instead of inline: transfer ``x`` of
    ``n`` bytes, one chunk on each of the streams ``0 .. parts - 1``. On the wire the header's
    ``bulk`` holds ``[buf, x, n, parts]`` per such payload, whose inline buffer is empty."""

    buf: int
    x: int
    n: int
    parts: int


def parse_bulk(ann, lengths, streams: int, last_x: int, max_bytes: int) -> list[Transfer]:
    """Check a frame's ``bulk`` announcement against the frame and the receiver's state:
    payload indices of this frame whose inline bytes are empty, each named once; transfer ids
    increasing past ``last_x`` (the last one this end received); sizes from 1 to
    ``max_bytes``; at least one and at most ``streams`` (those open here) parts, none empty."""
    if type(ann) is not list or not ann or len(ann) > len(lengths):
        raise ProtocolError(f"bulk must be a list of at most {len(lengths)} transfers")
    out, seen = [], set()
    for rec in ann:
        if not _int_list(rec) or len(rec) != 4:
            raise ProtocolError(f"a bulk transfer is [buf, x, bytes, parts], got {_show(rec)}")
        t = Transfer(*rec)
        if not 0 <= t.buf < len(lengths) or t.buf in seen or lengths[t.buf] != 0:
            raise ProtocolError(
                f"bulk transfer {t.x} names payload {t.buf}, which is not an empty payload "
                "of this frame named once"
            )
        if t.x <= last_x:
            raise ProtocolError(f"bulk transfer id {t.x} does not follow the last one ({last_x})")
        if not 0 < t.n <= max_bytes:
            raise ProtocolError(f"bulk transfer {t.x} claims {t.n} bytes (1 to {max_bytes})")
        if not 0 < t.parts <= min(streams, t.n):
            raise ProtocolError(
                f"bulk transfer {t.x} claims {t.parts} parts; {streams} bulk streams are open"
            )
        seen.add(t.buf)
        last_x = t.x
        out.append(t)
    return out


def parse(header: dict, accept: tuple[type[Message], ...] | None = None) -> Message:
    """The declared request ``header`` is, checked field by field; ``ProtocolError`` if not.

    ``accept``: the requests this reader serves (others are refused as unknown here)."""
    op = header.get("op")
    cls = MESSAGES.get(op) if type(op) is str else None
    if cls is None or (accept is not None and cls not in accept):
        raise ProtocolError(f"unknown request {str(op)[:100]!r}")
    body = {}
    for name, check, what, required in _SPECS[cls]:
        if name in header:
            v = header[name]
            if not check(v):
                raise ProtocolError(f"{op}: {name!r} must be {what}, got {_show(v)}")
            body[name] = v
        elif required:
            raise ProtocolError(f"{op} needs {name!r} ({what})")
    return cls(**body)


# -- batch records ---------------------------------------------------------------------------


class Run(NamedTuple):
    """Run op ``name`` on ``args``/``kwargs``; its output tensors get the ids ``out`` (0: an
    output that is one of its inputs); ``{"cpu": k}`` arguments are buffer ``buf + k``.

    On the wire a JSON array of these five fields. The client sends this self-contained form
    only for ops that upload CPU tensors or whose template is too large for a signature;
    every other op is a ``SigUse``."""

    name: str
    args: list
    kwargs: dict
    out: list
    buf: int


class Free(NamedTuple):
    """Tensors the client dropped, freed here in stream order (so memory is reused within a
    batch as on a GPU). On the wire ``{"free": [ids]}``."""

    ids: list

    def wire(self) -> dict:
        return {"free": self.ids}


class RunGraph(NamedTuple):
    """Run the compiled graph ``handle`` (a ``compile_graph`` answer of this session) on the
    tensors ``inputs``; its outputs get the ids ``out`` (0: one of its inputs or an earlier
    output). On the wire ``{"graph": handle, "in": ids, "out": ids}``."""

    handle: str
    inputs: list
    out: list

    def wire(self) -> dict:
        return {"graph": self.handle, "in": self.inputs, "out": self.out}


# -- signatures: an op's arguments declared once per connection, then only what changes ------
#
# Most ops of a training step repeat: the same op on tensors of the same metadata with the
# same constants, only the tensor ids (and a learning rate) differ. The client declares such a
# *signature* once (``SigDef``: the op and its arguments with holes where the values change)
# and then sends each op as ``[n, holes..., out ids..., freed ids...]`` (``SigUse``): about a
# third of a ``Run`` record's bytes, and the agent resolves the op, checks the constants and
# lays out the argument list once per signature instead of once per op.
#
# The table belongs to one data connection of one session: both ends start it empty on each
# new connection (a reconnect, a new worker) and the client then sends its definitions again,
# so nothing can name another session's or an earlier connection's signatures. Definitions are
# numbered 0, 1, 2, ... in the order sent; one numbered 0 starts the table afresh, which is how
# the client stays within ``SIG_MAX`` signatures and ``SIG_SIZE_MAX`` template values.

SIG_MAX = 1 << 16  # signatures in one table
SIG_SIZE_MAX = 1 << 21  # template values (``template_size``) in one table, all signatures
SIG_DEF_SIZE_MAX = 1 << 14  # template values of one signature (larger ones go as ``Run``)
SIG_DEPTH_MAX = 6  # lists in lists of a template (aten arguments nest two deep at most)
# Holes of a template: a tensor of the session (its id in the use record) or a float (a
# number in the use record: learning rates change every step). Everything else in a template
# is a constant, decoded once.
HOLE_TENSOR = {"hole": "t"}
HOLE_FLOAT = {"hole": "f"}


class SigDef(NamedTuple):
    """Signature ``n``: op ``name`` on ``args``/``kwargs`` (values of ``values.py``'s schema,
    plus ``HOLE_TENSOR``/``HOLE_FLOAT``; no tensor ids and no buffers), producing ``out``
    output ids. Its holes are numbered in the order they appear: ``args`` depth first, then
    ``kwargs`` in their order. On the wire ``{"sig": n, "name", "args", "kwargs", "out"}``,
    in a batch's ``sigs``."""

    n: int
    name: str
    args: list
    kwargs: dict
    out: int

    def wire(self) -> dict:
        return {
            "sig": self.n,
            "name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
            "out": self.out,
        }


class SigUse(NamedTuple):
    """Run signature ``n`` with its holes filled by ``holes`` in order; its output tensors get
    the ids ``out`` (0: an output that is one of its inputs); ``free``: ids the client dropped
    before this op, freed before it runs (in stream order, so memory is reused within a batch
    as on a GPU). On the wire one flat JSON array ``[n, *holes, *out, *free]``: its length
    tells the free ids from the rest, since the signature fixes how many holes and outputs
    there are. The executor reads it in place (``SessionExecutor.run_batch``); this type
    names its parts for tests and documentation."""

    n: int
    holes: list
    out: list
    free: list

    def wire(self) -> list:
        return [self.n, *self.holes, *self.out, *self.free]


def template_size(v, depth: int = 0) -> int:
    """How many values a template holds (a list or object counts one, plus its contents; a
    string one per 16 characters begun): what the table's bounds are counted in, by both ends
    alike, so that a table's memory is bounded however its frames are filled."""
    t = type(v)
    if t is list or t is dict:
        if depth > SIG_DEPTH_MAX:
            raise ProtocolError(f"a signature template nests deeper than {SIG_DEPTH_MAX} lists")
        n = 1
        for x in v if t is list else v.values():
            n += template_size(x, depth + 1)
        return n
    if t is str:
        return 1 + len(v) // 16
    return 1


_SIG_SHAPE = '{"sig": n, "name", "args", "kwargs", "out"}'


def parse_sig_def(rec) -> SigDef:
    """A ``SigDef`` from the wire, its fields' types checked (and its size: see
    ``template_size``); the name and template values are the executor's to judge."""
    if type(rec) is not dict or rec.keys() != {"sig", "name", "args", "kwargs", "out"}:
        raise ProtocolError(f"a signature must be {_SIG_SHAPE}, got {_show(rec)}")
    n, name, args, kwargs, out = (rec[k] for k in ("sig", "name", "args", "kwargs", "out"))
    if type(n) is not int or not 0 <= n < SIG_MAX:
        raise ProtocolError(f"signature id {_show(n)} is outside 0..{SIG_MAX - 1}")
    if type(name) is not str or type(args) is not list or type(kwargs) is not dict:
        raise ProtocolError("a signature needs a name, an argument list and an object")
    if type(out) is not int or not 0 <= out <= SIG_DEF_SIZE_MAX:
        raise ProtocolError(f"a signature's output count must be a small int, got {_show(out)}")
    return SigDef(n, name, args, kwargs, out)


def parse_record(rec) -> list | Free | RunGraph:
    """One record of a batch's ``ops``: a ``Free``, or a ``Run``'s five fields as the list
    received (not copied into a ``Run``: this is paid for every op the agent runs). The fields'
    types are checked; their values are the executor's to judge (unknown op names, ids of
    other sessions). ``SigUse`` records (a list led by an int) are read by the executor
    against its signature table, which only it holds."""
    t = type(rec)
    if t is list and len(rec) == 5:
        _, args, kwargs, out, buf = rec
        if type(args) is not list or type(kwargs) is not dict:
            raise ProtocolError("op arguments must be a list and an object")
        if not _int_list(out) or type(buf) is not int or buf < 0:
            raise ProtocolError(f"bad output ids {_show(out)} or buffer base {_show(buf)}")
        # The name is checked by the op resolver, which names what is wrong with it.
        return rec
    if t is dict and len(rec) == 1 and "free" in rec:
        if not _int_list(rec["free"]):
            raise ProtocolError(f"free must be a list of ids, got {_show(rec['free'])}")
        return Free(rec["free"])
    if t is dict and len(rec) == 3 and {"graph", "in", "out"} <= rec.keys():
        if type(rec["graph"]) is not str or not _int_list(rec["in"]) or not _int_list(rec["out"]):
            raise ProtocolError(f"a graph record needs a handle and id lists, got {_show(rec)}")
        return RunGraph(rec["graph"], rec["in"], rec["out"])
    raise ProtocolError(
        "each op must be [signature, holes..., out_ids..., free_ids...], "
        '[name, args, kwargs, out_ids, buffer_base], {"free": ids} or a graph record, '
        f"got {_show(rec)}"
    )


# -- replies ---------------------------------------------------------------------------------


def error_reply(kind: str, message: str, op: str | None = None, **extra) -> dict:
    """``{"error": {...}}``: ``kind`` is the exception class the client raises (by name),
    ``op`` the aten op that failed, if one did; ``deferred``/``fatal`` may be added."""
    return {"error": {"type": kind, "message": message, "op": op, **extra}}


HANDOVER_TLS = {"handover": "tls"}
