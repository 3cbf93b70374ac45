"""A process's data-plane session with one agent: batching, sync points and the lease.

Ops are queued and shipped in batches (at a size threshold, by a background flusher every
few milliseconds, and before anything that waits), so the caller never waits per op.
Errors of queued ops come back with the next reply and are raised there, the way CUDA
reports asynchronous errors at the next synchronisation.

The session outlives leases: tensors stay on the agent between cells while the lease (the
right to run on a GPU slice) is taken at the first GPU op and given back by ``release()``.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
import time

import torch

from ..protocol import messages as m
from ..protocol import tls
from ..protocol.client import interrupt_session, parse_address
from ..protocol.frames import recv_frame, send_frame, set_liveness
from ..protocol.values import as_buffer, decode_result, tensor_from_buffer
from . import backend

BATCH_MAX_OPS = 512
BATCH_MAX_BYTES = 8 << 20
FLUSH_INTERVAL = 0.002

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
        self.attached = False
        self.address = None
        self.sock: socket.socket | None = None
        self._receiver: threading.Thread | None = None
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

    def enqueue(self, name, eargs, ekwargs, ids, bufs) -> None:
        """Queue op ``name`` (``aten::add.Tensor``: its wire name, which the caller keeps)."""
        if not self.attached:
            self.attach()
        with self._lock:
            if self.freed:
                # Frees go in stream order, so memory is reused within a batch as on a GPU.
                freed, self.freed = self.freed, []
                self._pending.append({"free": freed})  # an m.Free record
            # An m.Run record, built as the bare list it is on the wire: this runs once per op,
            # and the agent validates every record it receives (messages.parse_record).
            self._pending.append([name, eargs, ekwargs, ids, len(self._bufs)])
            self.stats["ops"] += 1
            if bufs:
                self._bufs.extend(bufs)
                self._buf_bytes += sum(b.nbytes for b in bufs)
            if len(self._pending) >= BATCH_MAX_OPS or self._buf_bytes >= BATCH_MAX_BYTES:
                self._flush()

    def _flush(self) -> None:
        if not self._pending and not self.freed:
            return
        if self.sock is None:  # nothing was ever sent: frees need no agent
            self.freed.clear()
            return
        freed, self.freed = self.freed, []
        header = m.Batch(ops=self._pending, free=freed, epoch=self.epoch).header()
        self.stats["batches"] += 1
        self.stats["bytes_up"] += self._buf_bytes
        bufs = [as_buffer(b) for b in self._bufs]
        self._pending, self._bufs, self._buf_bytes = [], [], 0
        self._send(header, bufs)

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
        try:
            send_frame(self.sock, header, bufs)
        except OSError as e:
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
                last = self._inbox.get(timeout=0.5)
                if isinstance(last, tuple):
                    why = last[0].get("error", {}).get("message") or why
            except queue.Empty:
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
            self._flush()
            self._drain_owed()
            self._send(header, bufs)
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
        """The next reply. Frames are read whole by the receiver thread, so an interrupt here
        (Ctrl-C in a notebook) never leaves half a frame behind on the stream."""
        while True:
            try:
                item = self._inbox.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                self._broken(item)
            self._owed_replies -= 1
            return item

    @staticmethod
    def _receive(sock, inbox):
        while True:
            try:
                inbox.put(recv_frame(sock))
            except BaseException as e:  # EOF, reset, or a bad frame: the connection is over
                inbox.put(e)
                return

    def _drain_owed(self):
        while self._owed_replies:
            self._recv()

    # -- sync points ------------------------------------------------------------------------
    def fetch(self, x) -> torch.Tensor:
        reply, bufs = self.request(m.Fetch(t=x._rid).header())
        self.stats["bytes_down"] += len(bufs[0])
        local = tensor_from_buffer(reply["tensor"], bufs[0])
        if local.stride() == x.stride() or not _dense(x):
            return local
        # Keep the remote layout (channels_last, transposes), as .cpu() of a CUDA tensor does.
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(local)

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
        self._inbox = queue.Queue()
        self._receiver = threading.Thread(
            target=self._receive, args=(sock, self._inbox), daemon=True, name="egpu-receiver"
        )
        self._receiver.start()
        return None

    def _hang_up(self) -> None:
        """Drop the data connection. Shut it down and let the receiver thread end before the
        descriptor is closed: a reader still inside recv() on a closed descriptor number
        would read the next connection's bytes once the number is reused."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._receiver is not threading.current_thread():
            self._receiver.join(2.0)
        sock.close()

    def renew(self, token: str) -> None:
        """Hand the agent a refreshed lease token (no reply: a rejection shows at the next sync)."""
        with self._lock:
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
    sess._receiver = None
    sess._lock = threading.RLock()
    sess._pending, sess._bufs, sess._buf_bytes = [], [], 0
    sess.freed = []
    sess._owed_replies = 0
    sess._closed = True  # no flusher runs here, and nothing may reconnect


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _dense(x) -> bool:
    # Strides of a non-overlapping, dense layout can be reproduced on the CPU copy.
    return torch._prims_common.is_non_overlapping_and_dense_or_false(
        torch.empty_strided(x.shape, x.stride(), device="meta")
    )
