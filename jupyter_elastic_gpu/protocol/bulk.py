"""Parallel bulk streams: a session's large payloads split across extra connections.

One TCP stream served by Python tops out near 3 GB/s on loopback (one core copies every
byte through the kernel's socket layer), and filling a 100 GbE link takes several streams
anyway. So a session may open up to ``MAX_BULK_STREAMS`` extra connections to its worker
(``ELASTIC_GPU_BULK_STREAMS``, default 4, 0: none), lazily at its first large transfer,
each proving ownership as the session's own connection does (``messages.BulkHello``: the
session secret, the lease token, TLS when the agent uses it) and bound to that connection.

A frame (upload or reply) whose payload is large sends it over those streams instead of
inline: the frame's header says ``"bulk": [[buf, x, bytes, parts], ...]`` (``parse_bulk``)
and that payload is empty in the frame; then bulk streams ``0 .. parts - 1`` each carry one
chunk frame of it, ``{"op": "chunk", "x", "off", "n"}`` + ``n`` raw bytes, in announcement
order. Chunks are sent straight from the payload's memory and received straight into the
final buffer, concurrently, by one thread per stream (socket calls release the GIL). The
receiver checks each chunk before a byte of it lands: the transfer due on that stream, the
range inside it, no overlap with bytes already received; and the whole transfer covered at
the end. Any failure breaks the connection: a transfer is whole or an error, never wrong.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import sys
import threading
from concurrent.futures import Future

from . import messages as m
from . import tls
from .frames import (
    MAX_BUFFER_BYTES,
    _recv_exact,
    _recv_into,
    decode_header,
    encode_frame,
    recv_frame,
    send_frames,
    set_liveness,
)
from .messages import ProtocolError

DEFAULT_STREAMS = 4
# Payloads from this size go over bulk streams (ELASTIC_GPU_BULK_MIN_MIB); below it one
# stream's time is mostly per-transfer costs that more streams do not share out.
DEFAULT_MIN_BYTES = 8 << 20
# No part smaller than this: a transfer of 3 MiB over 4 streams uses 3.
MIN_PART_BYTES = 1 << 20
_ALIGN = 1 << 12  # parts start on page boundaries
_CHUNK_PREFIX = struct.Struct("<IIQ")  # header length, buffer count (1), the chunk's length
_MAX_CHUNK_HEADER = 256


def configured_streams() -> int:
    """``ELASTIC_GPU_BULK_STREAMS`` (default 4; 0 turns bulk streams off), at most 16."""
    raw = os.environ.get("ELASTIC_GPU_BULK_STREAMS", "")
    try:
        k = int(raw) if raw.strip() else DEFAULT_STREAMS
    except ValueError:
        print(
            f"elastic-gpu: ELASTIC_GPU_BULK_STREAMS={raw!r} is not a number; using "
            f"{DEFAULT_STREAMS}",
            file=sys.stderr,
        )
        k = DEFAULT_STREAMS
    return max(0, min(k, m.MAX_BULK_STREAMS))


def configured_min_bytes() -> int:
    """``ELASTIC_GPU_BULK_MIN_MIB``: the smallest payload sent over bulk streams (default 8,
    at least 1)."""
    raw = os.environ.get("ELASTIC_GPU_BULK_MIN_MIB", "")
    try:
        mib = float(raw) if raw.strip() else DEFAULT_MIN_BYTES / (1 << 20)
    except ValueError:
        mib = DEFAULT_MIN_BYTES / (1 << 20)
    return max(MIN_PART_BYTES, int(mib * (1 << 20)))


def parts_for(nbytes: int, streams: int) -> int:
    """How many streams a transfer of ``nbytes`` is split across."""
    return max(1, min(streams, nbytes // MIN_PART_BYTES))


def split(nbytes: int, parts: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each part: near-equal, starting on page boundaries."""
    cuts = [0] + [(nbytes * i // parts) & ~(_ALIGN - 1) for i in range(1, parts)] + [nbytes]
    return [(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]


def nbytes_of(b) -> int:
    n = getattr(b, "nbytes", None)
    return n if type(n) is int else len(b)


class _Incoming:
    """One transfer being received: which bytes have arrived, checked chunk by chunk."""

    def __init__(self, t: m.Transfer, view: memoryview):
        self.t, self.view = t, view
        self.spans: list[tuple[int, int]] = []
        self.got = 0
        self.lock = threading.Lock()

    def claim(self, c: m.Chunk, stream: int) -> memoryview:
        """Where chunk ``c`` goes, once it is known to be a due, in-range, new part."""
        t = self.t
        if c.x != t.x:
            raise ProtocolError(
                f"bulk stream {stream} sent a chunk of transfer {c.x}; transfer {t.x} is the "
                "one due there (no such transfer, or out of order)"
            )
        if c.off < 0 or c.n < 1 or c.off + c.n > t.n:
            raise ProtocolError(
                f"chunk [{c.off}, {c.off + c.n}) lies outside transfer {t.x} of {t.n} bytes"
            )
        with self.lock:
            for a, b in self.spans:
                if c.off < b and a < c.off + c.n:
                    raise ProtocolError(
                        f"chunk [{c.off}, {c.off + c.n}) of transfer {t.x} overlaps bytes "
                        f"[{a}, {b}) already received (a duplicate or overlapping chunk)"
                    )
            self.spans.append((c.off, c.off + c.n))
            self.got += c.n
        return self.view[c.off : c.off + c.n]

    def check_whole(self) -> None:
        if self.got != self.t.n:
            raise ProtocolError(
                f"bulk transfer {self.t.x} is incomplete: its {self.t.parts} chunks carried "
                f"{self.got} of {self.t.n} bytes"
            )


def _read_chunk(sock) -> m.Chunk:
    """A chunk frame's header; its ``n`` bytes follow on the stream."""
    hlen, nbuf, length = _CHUNK_PREFIX.unpack(_recv_exact(sock, _CHUNK_PREFIX.size))
    if nbuf != 1 or hlen > _MAX_CHUNK_HEADER:
        raise ProtocolError("a bulk stream carries only chunk frames (a short header, one payload)")
    chunk = m.parse(decode_header(_recv_exact(sock, hlen)), (m.Chunk,))
    if chunk.n != length:
        raise ProtocolError(f"chunk header says {chunk.n} bytes, its frame carries {length}")
    return chunk


class _Helper:
    """A thread that runs one stream's share of each transfer (a daemon: it never holds up
    the process's exit)."""

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self):
        while True:
            job, fut = self.jobs.get()
            if job is None:
                return
            try:
                job()
                fut.set_result(None)
            except BaseException as e:  # reported by the thread that waits on it
                fut.set_exception(e)

    def submit(self, job) -> Future:
        fut = Future()
        self.jobs.put((job, fut))
        return fut

    def stop(self):
        self.jobs.put((None, None))


class BulkStreams:
    """A session's bulk streams at one end of its data connection (client and worker alike).

    Streams are indexed from 0; only streams ``0 .. count - 1`` (all present) carry parts.
    Transfer ids count up per direction. After any failure the object is ``broken``: its
    owner drops the whole connection (bytes of a half-done transfer may still be in flight)."""

    def __init__(self, name: str = "egpu-bulk"):
        self.socks: dict[int, socket.socket] = {}
        self.name = name
        self.sent_x = 0  # the last transfer id sent
        self.recv_x = 0  # the last transfer id received
        self._helpers: list[_Helper] = []
        self.broken: BaseException | None = None

    @property
    def count(self) -> int:
        k = 0
        while k in self.socks:
            k += 1
        return k

    def add(self, index: int, sock) -> None:
        old = self.socks.pop(index, None)
        if old is not None:
            _close(old)
        self.socks[index] = sock

    # -- sending ------------------------------------------------------------------------------
    def outgoing(self, bufs: list, min_bytes: int, max_parts: int | None = None):
        """Take the payloads of ``bufs`` from ``min_bytes`` up out of the frame (their slots
        become empty): the frame's ``bulk`` announcement and the transfers for ``send``."""
        streams = self.count if max_parts is None else min(self.count, max_parts)
        ann, transfers = [], []
        if streams < 1 or self.broken is not None:
            return ann, transfers
        for i, b in enumerate(bufs):
            n = nbytes_of(b)
            if n < min_bytes or n == 0:
                continue
            self.sent_x += 1
            parts = parts_for(n, streams)
            ann.append([i, self.sent_x, n, parts])
            transfers.append((self.sent_x, memoryview(b).cast("B"), parts))
            bufs[i] = b""
        return ann, transfers

    def send(self, transfers: list) -> None:
        """Send each transfer's chunks, every stream's in parallel, from the payloads' memory;
        returns once all are sent."""
        if not transfers:
            return
        width = max(p for _, _, p in transfers)

        def job(i):
            sock = self.socks[i]
            for x, view, parts in transfers:
                if i < parts:
                    off, n = split(view.nbytes, parts)[i]
                    header = m.Chunk(x=x, off=off, n=n).header()
                    send_frames(sock, [encode_frame(header, [view[off : off + n]])])

        self._run([lambda i=i: job(i) for i in range(width)])

    # -- receiving ----------------------------------------------------------------------------
    def receive(self, header: dict, bufs: list, alloc) -> None:
        """Complete a received frame whose header announces bulk transfers: each payload is
        received, in parallel over the streams, into memory from ``alloc(nbytes)`` (as
        ``FrameReader`` takes it) and put in its slot of ``bufs``."""
        if self.broken is not None:
            raise ConnectionError(f"the bulk streams broke earlier ({self.broken})")
        transfers = m.parse_bulk(
            header.get("bulk"), [nbytes_of(b) for b in bufs], self.count, self.recv_x,
            MAX_BUFFER_BYTES,
        )  # fmt: skip
        incoming = []
        for t in transfers:
            dst, raw = alloc(t.n)
            incoming.append(_Incoming(t, memoryview(raw).cast("B")))
            bufs[t.buf] = dst
        self.recv_x = transfers[-1].x

        def job(i):
            sock = self.socks[i]
            for inc in incoming:
                if i < inc.t.parts:
                    _recv_into(sock, inc.claim(_read_chunk(sock), i))

        self._run([lambda i=i: job(i) for i in range(max(t.parts for t in transfers))])
        try:
            for inc in incoming:
                inc.check_whole()
        except ProtocolError as e:
            self._abort(e)
            raise

    # -- running the streams' jobs --------------------------------------------------------------
    def _run(self, jobs: list) -> None:
        """Job 0 on this thread, the others on the helpers; all end before this returns. A
        failure shuts every stream down (so no job waits on a peer that will not come) and is
        raised: the first protocol error if there is one, else the first error."""
        while len(self._helpers) < len(jobs) - 1:
            self._helpers.append(_Helper(f"{self.name}-{len(self._helpers) + 1}"))
        futures = [h.submit(j) for h, j in zip(self._helpers, jobs[1:], strict=False)]
        errors = []
        try:
            try:
                jobs[0]()
            except Exception as e:
                errors.append(e)
                self._abort(e)
            for f in futures:
                e = f.exception()
                if e is not None:
                    errors.append(e)
                    self._abort(e)
        except BaseException as e:  # Ctrl-C while sending: the streams are out of step now
            self._abort(e)
            raise
        if errors:
            raise next((e for e in errors if isinstance(e, ProtocolError)), errors[0])

    def _abort(self, why: BaseException) -> None:
        if self.broken is None:
            self.broken = why
        for s in self.socks.values():
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for s in self.socks.values():
            _close(s)
        self.socks.clear()
        for h in self._helpers:
            h.stop()
        self._helpers = []

    def forget(self) -> None:
        """A fork()ed child's copy: the sockets are the parent's, its threads do not exist."""
        self.socks, self._helpers = {}, []


def complete(streams: BulkStreams | None, header: dict, bufs: list, alloc) -> None:
    """Receive the payloads a frame announced on bulk streams (``BulkStreams.receive``); a
    frame that announces none is complete already. Both ends read frames through this."""
    if "bulk" in header:
        if streams is None:
            raise m.ProtocolError("bulk transfers announced, but no bulk stream is open")
        streams.receive(header, bufs, alloc)


def open_stream(host: str, port: int, hello: m.BulkHello, timeout, net_timeout: float):
    """Open one bulk stream (TLS when the environment configures it, as for the session's
    connection) and return it once the worker has taken it; ``PermissionError`` with the
    agent's reason if refused."""
    sock, refusal = tls.open_session(host, port, hello.header(), timeout)
    try:
        reply = refusal or recv_frame(sock)[0]
        if reply.get("ok") is not True or reply.get("index") != hello.index:
            err = reply.get("error") or {}
            raise PermissionError(
                f"the GPU agent refused bulk stream {hello.index}: "
                f"{err.get('message') or str(reply)[:200]}"
            )
        sock.settimeout(None)
        set_liveness(sock, net_timeout)
        return sock
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def _close(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
