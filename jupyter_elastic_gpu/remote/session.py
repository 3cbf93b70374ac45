"""A process's data-plane session with one agent: batching, sync points and the lease.

Ops are queued and shipped in batches (at a size threshold, by a background flusher every
few milliseconds, and before anything that waits), so the caller never waits per op.
Errors of queued ops come back with the next reply and are raised there, the way CUDA
reports asynchronous errors at the next synchronisation.

The session outlives leases: tensors stay on the agent between cells while the lease (the
right to run on a GPU slice) is taken at the first GPU op and given back by ``release()``.
"""

from __future__ import annotations

import _signal
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time

import torch

from ..protocol import bulk, tls
from ..protocol import messages as m
from ..protocol.client import interrupt_session, parse_address
from ..protocol.frames import FrameReader, encode_frame, send_frame, send_frames, set_liveness
from ..protocol.values import as_buffer, decode_result, host_buffer, tensor_from_buffer
from . import backend

BATCH_MAX_OPS = 512
BATCH_MAX_BYTES = 8 << 20
FLUSH_INTERVAL = 0.002
# An upload is sent later than the op that asked for it, so the user may change the CPU
# tensor meanwhile. Smaller ones are copied at once (cheap); larger ones go out before the op
# returns, straight from the user's memory, as a copy from pageable memory to a GPU does.
UPLOAD_COPY_BYTES = 1 << 20
# How long a sync point polls for its reply before sleeping in the kernel. A thread that
# sleeps pays the scheduler's wake-up (and an idle core's exit from its sleep state) on each
# round trip, which on a GPU node costs more than the round trip itself; CUDA's own default
# spins in synchronize for the same reason. Off where cores are few (the spinner would take
# the core the agent needs on a laptop or a 2-core CI machine).
SPIN_SECONDS = float(
    os.environ.get("ELASTIC_GPU_SPIN_US", 300 if (os.cpu_count() or 1) >= 4 else 0)
) / 1e6

_ERRORS = {
    "OutOfMemoryError": torch.OutOfMemoryError,
    "IndexError": IndexError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "NotImplementedError": NotImplementedError,
    "PermissionError": PermissionError,
    "_LinAlgError": torch.linalg.LinAlgError,
    "LinAlgError": torch.linalg.LinAlgError,
    "ProtocolError": backend.RemoteError,
}


class AgentUnavailable(ConnectionError):
    """The agent cannot be reached or the connection to it broke."""


def _raise_remote(err: dict):
    if err.get("type") == "ConnectionAbortedError":
        raise AgentUnavailable(f"the GPU agent ended this session: {err.get('message')}")
    cls = _ERRORS.get(err.get("type"), backend.RemoteError)
    op = err.get("op")
    where = f"{op} failed on the remote GPU" if op else "the remote GPU agent refused the request"
    when = " (asynchronously; reported at this sync point)" if err.get("deferred") else ""
    raise cls(f"{where}{when}: {err.get('message')}")


class DirectLease:
    """No broker: the agent at ``address`` is used directly, without quotas (single-user mode)."""

    def __init__(self, address: str, fraction: float, token: str | None = None):
        self.address, self.fraction, self.token = address, fraction, token

    def acquire(self, session) -> dict:
        return {"address": self.address, "token": self.token, "fraction": self.fraction}

    def release(self) -> None:
        pass


_OP_NAMES: dict = {}


def _op_name(func):
    name = _OP_NAMES.get(func)
    if name is None:
        name = _OP_NAMES[func] = f"{func._schema.name}.{func._overloadname}"
    return name


class RemoteSession:
    def __init__(
        self,
        lease_provider,
        *,
        session_id: str | None = None,
        fraction: float = 1.0,
        secret: str | None = None,
        connect_timeout: float = 10.0,
        reply_timeout: float | None = None,
    ):
        self.lease_provider = lease_provider
        self.session_id = session_id or secrets.token_hex(8)
        # Whoever knows the secret may reconnect to, interrupt or close this session (the
        # provisioner passes it so it can free a dead kernel's session).
        self.secret = secret or secrets.token_urlsafe(24)
        self.fraction = fraction
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        # A cut network or dead agent surfaces as an error after about this many seconds.
        self.net_timeout = float(os.environ.get("ELASTIC_GPU_NET_TIMEOUT", 20))
        self.devices: list = []  # egpu:0..n-1, set by cuda_facade.install once the backend exists
        self.info: dict = {}
        self.freed: list[int] = []
        # The signature table (messages.SigDef wire records, id = index): a new list object
        # whenever it starts afresh, so cache entries can tell which table their id is in.
        self.sigs: list[dict] = []
        self._sig_size = 0
        self._sig_sent = 0  # how many of them this connection's agent has been sent
        self.signatures = False  # whether the agent reads them (its hello reply says)
        self.attached = False
        self.address = None
        self.sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._kept = None  # a whole reply read when Ctrl-C came: still owed
        # Parallel bulk streams of this connection (protocol/bulk.py), opened at the first
        # large transfer where the worker offers them (its hello reply's ``bulk``).
        self.bulk_streams = bulk.configured_streams()
        self.bulk_min = bulk.configured_min_bytes()
        self._bulk: bulk.BulkStreams | None = None
        self._bulk_offer: dict | None = None
        self._bulk_off = False  # opening them failed on this connection: payloads go inline
        self._outgoing: list = []  # bulk transfers announced by frames about to be sent
        self._token = None  # the lease token, which bulk streams show too
        self._next_id = 0
        self._pending: list = []
        self._bufs: list = []
        self._buf_bytes = 0
        self._lock = threading.RLock()
        self._owed_replies = 0  # replies of requests abandoned by an interrupt
        self.epoch = 0  # bumped by each interrupt; batches carry it
        self._closed = False
        self.forked = False  # this is a fork()ed child's copy: the connection is the parent's
        self._lost: AgentUnavailable | None = None  # a broken connection the flusher found
        self.stats = {"ops": 0, "batches": 0, "requests": 0, "bytes_up": 0, "bytes_down": 0}
        self.on_attach = []  # callbacks(session) after a lease is taken
        self._flusher = threading.Thread(target=self._flush_loop, name="egpu-flusher", daemon=True)
        self._flusher.start()

    # -- ids and queueing (hot path) ----------------------------------------------------
    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def define_signature(self, name, args, kwargs, nout) -> tuple[int, list] | None:
        """Add a signature (op ``name``, templates ``args``/``kwargs``, ``nout`` output ids) to
        the table: its id and the table, or None if its template is too large for one. The
        definition goes out at the head of the next batch."""
        try:
            size = m.template_size(args) + m.template_size(kwargs)
        except m.ProtocolError:  # nested deeper than any aten argument
            return None
        if size > m.SIG_DEF_SIZE_MAX:
            return None
        with self._lock:
            if len(self.sigs) >= m.SIG_MAX or self._sig_size + size > m.SIG_SIZE_MAX:
                # Start afresh (the next definition is 0), after the ops that use the old one.
                # (Queued ops mean a lease: frees alone wait for the next op, as they would.)
                if self._pending:
                    self._flush()
                self.sigs, self._sig_size, self._sig_sent = [], 0, 0
            n = len(self.sigs)
            self.sigs.append(m.SigDef(n, name, args, kwargs, nout).wire())
            self._sig_size += size
            return n, self.sigs

    def enqueue_sig(self, rec: list) -> None:
        """Queue a ``SigUse`` record, ``[signature, holes..., out ids...]``, built by the caller
        as it goes on the wire (this runs once per op; the agent checks it against its table)."""
        if not self.attached:
            self.attach()
        with self._lock:
            if self.freed:
                # Ids dropped since the last op ride on this one, freed before it runs: stream
                # order, so memory is reused within a batch as on a GPU, without a record each.
                freed, self.freed = self.freed, []
                rec += freed
            self._pending.append(rec)
            self.stats["ops"] += 1
            if len(self._pending) >= BATCH_MAX_OPS:
                self._flush()

    def enqueue(self, name, eargs, ekwargs, ids, bufs) -> None:
        """Queue op ``name`` (``aten::add.Tensor``: its wire name, which the caller keeps) as a
        self-contained ``Run`` record: an upload, or an op without a signature."""
        if not self.attached:
            self.attach()
        with self._lock:
            if self.freed:
                # Frees go in stream order, so memory is reused within a batch as on a GPU.
                freed, self.freed = self.freed, []
                self._pending.append({"free": freed})  # an m.Free record
            # An m.Run record, built as the bare list it is on the wire: the agent validates
            # every record it receives (messages.parse_record).
            self._pending.append([name, eargs, ekwargs, ids, len(self._bufs)])
            self.stats["ops"] += 1
            send_now = False
            if bufs:
                for i, b in enumerate(bufs):
                    if b.nbytes < UPLOAD_COPY_BYTES:
                        bufs[i] = b.clone()
                    else:
                        send_now = True
                    self._buf_bytes += b.nbytes
                self._bufs.extend(bufs)
            if send_now or len(self._pending) >= BATCH_MAX_OPS or self._buf_bytes >= BATCH_MAX_BYTES:
                self._flush()

    def _batch_frame(self) -> list | None:
        """The queued ops as one encoded batch frame (None if nothing is queued)."""
        if not self._pending and not self.freed:
            return None
        if self.sock is None:  # nothing was ever sent: frees need no agent
            self.freed.clear()
            return None
        freed, self.freed = self.freed, []
        sigs = self.sigs[self._sig_sent :]  # defined since the last batch, used in this one
        self._sig_sent = len(self.sigs)
        header = m.Batch(ops=self._pending, free=freed, epoch=self.epoch, sigs=sigs).header()
        self.stats["batches"] += 1
        self.stats["bytes_up"] += self._buf_bytes
        bufs = [as_buffer(b) for b in self._bufs]
        self._pending, self._bufs, self._buf_bytes = [], [], 0
        self._bulk_out(header, bufs)
        return encode_frame(header, bufs)

    def _bulk_out(self, header: dict, bufs: list) -> None:
        """Payloads from ``bulk_min`` up leave the frame for the bulk streams (announced in
        ``header``; sent by ``_send_frames`` right after the frame)."""
        if not self.bulk_streams or all(bulk.nbytes_of(b) < self.bulk_min for b in bufs):
            return
        streams = self._bulk_ready()
        if streams is not None:
            ann, transfers = streams.outgoing(bufs, self.bulk_min)
            if ann:
                header["bulk"] = ann
                self._outgoing.extend(transfers)

    def _bulk_ready(self) -> bulk.BulkStreams | None:
        """This connection's bulk streams, opened now if the worker offers them and none are
        open; None where payloads go inline (turned off, not offered, or failed to open)."""
        if self._bulk is not None:
            return self._bulk if self._bulk.broken is None else None
        offer = self._bulk_offer
        if self._bulk_off or not self.bulk_streams or not offer or self.sock is None:
            return None
        host, port = parse_address(self.address)
        streams = bulk.BulkStreams("egpu-bulk")
        try:
            for i in range(min(self.bulk_streams, int(offer.get("max") or 0))):
                hello = m.BulkHello(
                    session=self.session_id,
                    secret=self.secret,
                    conn=str(offer.get("conn")),
                    index=i,
                    token=self._token,
                )
                streams.add(
                    i, bulk.open_stream(host, port, hello, self.connect_timeout, self.net_timeout)
                )
        except (OSError, ConnectionError, m.ProtocolError) as e:
            streams.close()
            self._bulk_off = True
            print(
                f"elastic-gpu: no bulk streams to the GPU agent at {self.address} ({e}); large "
                "transfers use the session's one connection",
                file=sys.stderr,
            )
            return None
        except BaseException:
            streams.close()
            raise
        if not streams.count:
            return None
        self._bulk = streams
        return streams

    def _flush(self) -> None:
        frame = self._batch_frame()
        if frame is not None:
            self._send_frames([frame])

    def _flush_loop(self) -> None:
        while not self._closed:
            time.sleep(FLUSH_INTERVAL)
            if self._pending and self._lock.acquire(blocking=False):
                try:
                    self._flush()
                except AgentUnavailable as e:
                    # Ops of the user's thread were lost with the connection: say so at its
                    # next op, before it reconnects (attach raises this once).
                    self._lost = e
                except Exception:
                    pass
                finally:
                    self._lock.release()

    def _send(self, header, bufs=()):
        self._send_frames([encode_frame(header, bufs)])

    def _send_frames(self, frames):
        transfers, self._outgoing = self._outgoing, []
        try:
            if self._owed_replies:
                # The worker may be blocked sending a reply we owe (a large fetch that Ctrl-C
                # abandoned): read it first, or both ends would wait on full sockets.
                self._drain_owed()
            send_frames(self.sock, frames)
            if transfers:
                self._bulk.send(transfers)
        except (OSError, m.ProtocolError) as e:
            self._broken(e)
        except KeyboardInterrupt:
            # A frame cut in half cannot be resumed: reconnect (same session) at the next op.
            self._hang_up()
            self.attached = False
            self._owed_replies = 0
            self.lease_provider.release()
            raise

    def _broken(self, e):
        self.attached = False
        why = str(e)
        if self.sock is not None:
            try:  # the agent may have said why before hanging up (shutdown, worker ended)
                self.sock.settimeout(0.5)
                last, _ = self._reader.recv()
                why = last.get("error", {}).get("message") or why
            except Exception:
                pass
            self._hang_up()
        raise AgentUnavailable(
            f"lost the connection to the GPU agent at {self.address} ({why}); the next GPU op "
            "reconnects. Tensors of this session are still there if the agent kept the session "
            "(its grace period), else they are lost and using them raises an error"
        ) from None

    def request(self, header: dict, bufs=()) -> tuple[dict, list]:
        """Send everything queued, then ``header``, and wait for its reply."""
        if not self.attached:
            self.attach()
        with self._lock:
            batch = self._batch_frame()
            # The queued ops and the request that waits on them leave in one write.
            if bufs:
                bufs = list(bufs)
                self._bulk_out(header, bufs)
            request = encode_frame(header, bufs)
            self._send_frames([batch, request] if batch is not None else [request])
            self.stats["requests"] += 1
            self._owed_replies += 1
            try:
                reply, rbufs = self._recv()
            except KeyboardInterrupt:
                # The reply stays owed (drained before the next request); stop the queued work.
                self.interrupt()
                raise
        if "error" in reply:
            if reply["error"].get("fatal"):
                # The worker is gone with its CUDA context: reconnect at the next op.
                self._hang_up()
                self.attached = False
                self.lease_provider.release()
            elif reply["error"].get("type") == "PermissionError" and self.attached:
                # The agent no longer honours our lease (expired): the next op takes a new one.
                self.attached = False
                self.lease_provider.release()
            _raise_remote(reply["error"])
        return reply, rbufs

    def _recv(self):
        """The next reply, read on the waiting thread itself (no hand-off between threads).

        Ctrl-C may land while waiting for the reply's first byte, never inside a frame: the
        stream stays in step, and the reply stays owed (read before the next request). One
        that came while a frame was read is raised once the frame is whole, and the frame is
        kept as that owed reply."""
        frame, self._kept = self._kept, None
        if frame is None:
            reader = self._reader
            try:
                if not reader.buffered():
                    _wait_readable(self.sock, self.reply_timeout)
                frame, ctrl_c = _read_whole(self._read_frame)
            except (OSError, ConnectionError, m.ProtocolError) as e:  # EOF, reset, a bad frame
                self._broken(e)
            if ctrl_c is not None:
                self._kept = frame
                ctrl_c()  # the user's Ctrl-C, as its handler would have raised it
        self._owed_replies -= 1
        return frame

    def _read_frame(self):
        """The next frame, with the payloads it announced on the bulk streams."""
        header, bufs = self._reader.recv()
        bulk.complete(self._bulk, header, bufs, host_buffer)
        return header, bufs

    def _drain_owed(self):
        while self._owed_replies:
            self._recv()

    # -- sync points ------------------------------------------------------------------------
    def fetch(self, x) -> torch.Tensor:
        header = {"op": m.Op.FETCH.value, "t": x._rid}
        if self.bulk_streams and x.numel() * x.element_size() >= self.bulk_min:
            if not self.attached:
                self.attach()
            with self._lock:
                streams = self._bulk_ready()
                if streams is not None:
                    header["streams"] = streams.count  # the reply may come over them
        reply, bufs = self.request(header)
        self.stats["bytes_down"] += len(bufs[0])
        local = tensor_from_buffer(reply["tensor"], bufs[0])
        if local.stride() == x.stride() or not _dense(x):
            return local
        # Keep the remote layout (channels_last, transposes), as .cpu() of a CUDA tensor does.
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(local)

    def item(self, x):
        """``x.item()``: the value travels in the reply's header, not as a tensor."""
        if x.numel() != 1 or x.is_complex():
            return self.fetch(x).item()
        reply, bufs = self.request({"op": m.Op.FETCH.value, "t": x._rid, "item": True})
        if "value" in reply:
            return reply["value"]
        return tensor_from_buffer(reply["tensor"], bufs[0]).item()  # an agent without it

    def call(self, func, eargs, ekwargs, bufs, inputs):
        """Run an op on the agent now: its outputs' shapes or values depend on data."""
        header = m.Call(name=_op_name(func), args=eargs, kwargs=ekwargs).header()
        reply, _ = self.request(header, [as_buffer(b) for b in bufs])
        by_id = {t._rid: t for t in inputs}
        return decode_result(reply["result"], by_id, self._wrap)

    def _wrap(self, rid, size, stride, offset, dtype, nbytes, dev):
        return backend.RemoteTensor(self, rid, size, stride, offset, dtype, nbytes, dev)

    def interrupt(self) -> None:
        """Ask the agent to drop this session's queued work (sent beside the data connection)."""
        self._pending.clear()
        self._bufs, self._buf_bytes = [], 0
        self.epoch += 1  # everything sent before now belongs to the interrupted epoch
        try:
            interrupt_session(self.address, self.session_id, self.secret, self.epoch)
        except (OSError, ConnectionError):
            pass  # the agent is gone: the next op reports that

    def synchronize(self) -> None:
        self.request(m.Sync().header())

    # -- lease and connection -------------------------------------------------------------------
    def attach(self) -> None:
        """Take a lease and bind this session to the agent it names (blocks while queued)."""
        if self.forked:
            raise RuntimeError(FORKED_MESSAGE)
        with self._lock:
            if self.attached:
                return
            if self._closed:
                raise RuntimeError("this remote GPU session has been closed")
            if self._lost is not None:
                lost, self._lost = self._lost, None
                raise lost
            lease = self.lease_provider.acquire(self)
            self._token = lease.get("token")
            hello = m.Hello(
                session=self.session_id,
                secret=self.secret,
                token=lease.get("token"),
                fraction=lease.get("fraction", self.fraction),
                pid=os.getpid(),
            ).header()
            try:
                if self.sock is None or lease["address"] != self.address:
                    reply = self._connect(lease["address"], hello)
                else:
                    self._drain_owed()
                    send_frame(self.sock, hello)
                    self._owed_replies += 1
                    reply = None
                if reply is None:
                    reply, _ = self._recv()
            except (OSError, ConnectionError) as e:
                self.lease_provider.release()
                self._hang_up()
                if isinstance(e, AgentUnavailable):
                    raise
                if isinstance(e, tls.TLSRefused):
                    raise AgentUnavailable(str(e)) from None
                raise AgentUnavailable(
                    f"cannot reach the GPU agent at {lease['address']}: {e}"
                ) from None
            if "error" in reply:
                self.lease_provider.release()
                _raise_remote(reply["error"])
            self.info = reply["device"]
            self.signatures = reply.get("signatures") is True
            if not self.signatures and self.sigs:
                # An agent that reads only Run records (an older one): ids of the table are
                # no use there, and a fresh table sends every cache entry back to _define.
                self.sigs, self._sig_size, self._sig_sent = [], 0, 0
            self._bulk_offer = reply.get("bulk_offer")
            self.attached = True
        for cb in self.on_attach:
            cb(self)

    def _connect(self, address: str, hello: dict) -> dict | None:
        """Open a data connection and send ``hello``; returns the agent's refusal, if any."""
        self._hang_up()
        sock, refusal = tls.open_session(*parse_address(address), hello, self.connect_timeout)
        if refusal is not None:
            return refusal
        sock.settimeout(self.reply_timeout)
        set_liveness(sock, self.net_timeout)
        self.sock, self.address = sock, address
        self._owed_replies = 1  # the reply to the hello
        # Fetched tensors land in memory the user then owns (fresh, huge pages where offered).
        self._reader = FrameReader(sock, host_buffer)
        return None

    def _hang_up(self) -> None:
        """Drop the data connection (the session stays on the agent for its grace period)."""
        sock, self.sock, self._reader, self._kept = self.sock, None, None, None
        # The agent's table is this connection's: the next one is sent every signature again
        # (queued records keep their ids, which stay valid).
        self._sig_sent = 0
        streams, self._bulk, self._bulk_offer, self._bulk_off = self._bulk, None, None, False
        self._outgoing = []
        if streams is not None:
            streams.close()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def renew(self, token: str) -> None:
        """Hand the agent a refreshed lease token (no reply: a rejection shows at the next sync)."""
        with self._lock:
            self._token = token
            if self.attached and self.sock is not None:
                self._flush()
                self._send(m.Renew(token=token).header())

    def release(self) -> None:
        """Wait for queued GPU work to drain, then give the lease back (state stays on the agent)."""
        if self.forked:
            return
        with self._lock:
            if not self.attached:
                return
            try:
                self.request(m.Detach().header())
            finally:
                self.attached = False
                self.lease_provider.release()

    def close(self) -> None:
        """Free everything on the agent and end the session."""
        if self.forked:
            return  # the session and its lease are the parent's
        with self._lock:
            if self._closed:
                return
            try:
                if self.sock is not None:
                    self._pending.clear()
                    send_frame(self.sock, m.Close().header())
            except OSError:
                pass
            finally:
                self._hang_up()
                if self.attached:
                    self.attached = False
                    self.lease_provider.release()
                self._closed = True


FORKED_MESSAGE = (
    "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you "
    "must use the 'spawn' start method (this process's GPU is remote: its connection to the "
    "GPU agent belongs to the parent process; a spawned child can attach its own session)"
)


def _after_fork_in_child() -> None:
    """A fork()ed child (DataLoader worker, multiprocessing) must never use the parent's
    connection: its bytes would interleave with the parent's on the one stream, and the
    parent's lock may be held by a thread that does not exist here. Forget the socket without
    shutting it down (that would cut the parent's connection too), as CUDA marks a bad fork."""
    sess = backend._session
    if sess is None:
        return
    sess.forked = True
    sess.attached = False
    sess.sock = None
    sess._reader = None
    if sess._bulk is not None:
        sess._bulk.forget()  # the parent's sockets, untouched; its threads are not here
    sess._bulk, sess._outgoing = None, []
    sess._lock = threading.RLock()
    sess._pending, sess._bufs, sess._buf_bytes = [], [], 0
    sess.freed = []
    sess.sigs, sess._sig_size, sess._sig_sent = [], 0, 0
    sess._owed_replies = 0
    sess._closed = True  # no flusher runs here, and nothing may reconnect


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _wait_readable(sock, timeout: float | None) -> None:
    """Until ``sock`` has bytes: polled for ``SPIN_SECONDS``, then asleep in select() (where
    Ctrl-C ends the wait)."""
    if SPIN_SECONDS:
        deadline = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < deadline:
            if select.select((sock,), (), (), 0)[0]:
                return
    # In slices: a SIGINT that the kernel delivered to another thread interrupts no
    # select() here, and Python runs the handler only when this thread comes back.
    deadline = None if timeout is None else time.monotonic() + timeout
    while not select.select((sock,), (), (), 0.1)[0]:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no reply from the GPU agent in {timeout} s")


_MAIN = threading.main_thread()
_SIGINT = int(signal.SIGINT)


def _read_whole(read):
    """Read one frame (``read()``) with Ctrl-C held back until it is whole (a frame cut in half would leave
    the stream out of step): the frame, and the held-back Ctrl-C's handler call (or None).
    Only the main thread receives KeyboardInterrupt. ``_signal`` rather than ``signal``: its
    wrappers turn handlers into enums, which cost 6 us of every sync."""
    previous = _signal.getsignal(_SIGINT) if threading.current_thread() is _MAIN else None
    if previous is None:  # another thread, or a handler set outside Python we could not restore
        return read(), None
    caught = []
    _signal.signal(_SIGINT, lambda *a: caught.append(a))
    try:
        frame = read()
    finally:
        _signal.signal(_SIGINT, previous)
    if not caught:
        return frame, None
    if callable(previous):
        return frame, lambda: previous(*caught[0])
    if previous == _signal.SIG_DFL:  # what it would have done: end the process
        return frame, lambda: _signal.raise_signal(_SIGINT)
    return frame, None  # ignored


def _dense(x) -> bool:
    # Strides of a non-overlapping, dense layout can be reproduced on the CPU copy.
    return torch._prims_common.is_non_overlapping_and_dense_or_false(
        torch.empty_strided(x.shape, x.stride(), device="meta")
    )
