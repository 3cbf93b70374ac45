"""Framing of the data plane, shared by the remote client, the agent and its control plane.

A frame is ``[u32 header length][u32 buffer count][u64 length per buffer][JSON header][buffers]``.
The header is plain JSON (one message of ``messages.py``) and buffers are raw tensor bytes
described by the header (see ``values.py``), so nothing on the wire is ever executable: no
pickle, no code. This module knows nothing of torch.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct

from .messages import ProtocolError, error_reply

MAX_HEADER_BYTES = 64 << 20
MAX_BUFFERS = 1 << 16
# A single tensor payload larger than this is refused before reading it, so a hostile
# length field cannot make a peer allocate unbounded memory.
MAX_BUFFER_BYTES = 64 << 30

_PREFIX = struct.Struct("<II")


def encode_frame(header: dict, buffers: list = ()) -> list:
    """Return the pieces of one frame, ready for ``socket.sendmsg``/``writelines``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    views = [memoryview(b).cast("B") for b in buffers]
    prefix = _PREFIX.pack(len(head), len(views)) + struct.pack(
        f"<{len(views)}Q", *(v.nbytes for v in views)
    )
    return [prefix, head, *views]


def decode_header(head: bytes) -> dict:
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"frame header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header


def check_prefix(hlen: int, nbuf: int) -> None:
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"frame header of {hlen} bytes exceeds the {MAX_HEADER_BYTES} byte limit"
        )
    if nbuf > MAX_BUFFERS:
        raise ProtocolError(f"frame claims {nbuf} buffers; at most {MAX_BUFFERS} are allowed")


def check_lengths(lengths) -> None:
    for n in lengths:
        if n > MAX_BUFFER_BYTES:
            raise ProtocolError(f"buffer of {n} bytes exceeds the {MAX_BUFFER_BYTES} byte limit")


def _recv_into(sock: socket.socket, view: memoryview, got: int = 0) -> None:
    """Fill ``view`` from the socket, its first ``got`` bytes being there already."""
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytearray]]:
    """Read one frame from a blocking socket, not a byte more (for a connection's first frame,
    after which the socket may change hands)."""
    hlen, nbuf = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    check_prefix(hlen, nbuf)
    lengths = struct.unpack(f"<{nbuf}Q", _recv_exact(sock, 8 * nbuf)) if nbuf else ()
    check_lengths(lengths)
    header = decode_header(_recv_exact(sock, hlen))
    return header, [_recv_exact(sock, n) for n in lengths]


class FrameReader:
    """Reads a stream of frames through one reused buffer.

    One ``recv`` usually brings a whole small frame, or several (a batch and the sync request
    behind it arrive together), where ``recv_frame`` makes four system calls per frame. A
    payload too big for the buffer is received straight into memory from ``alloc(nbytes)``,
    which returns the payload object and a writable buffer onto its memory (a tensor and its
    numpy view: pinned host memory on a CUDA worker), never zero-filled or copied again. Only
    the reader's owner may read the socket from then on: it may hold bytes of the next
    frame."""

    CHUNK = 1 << 18

    def __init__(self, sock, alloc=None):
        self.sock, self.alloc = sock, alloc or _bytearray
        self.buf = bytearray(self.CHUNK)
        self.start = self.end = 0

    def buffered(self) -> bool:
        """Bytes of a next frame are already here, where ``select()`` cannot see them."""
        return self.end > self.start or (
            isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        )

    def _fill(self, need: int) -> None:
        """Make ``need`` bytes available at ``self.start`` (``need`` <= the buffer's size)."""
        if self.start + need > len(self.buf):  # no room behind: move the tail to the front
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        view = memoryview(self.buf)
        while self.end - self.start < need:
            k = self.sock.recv_into(view[self.end:])
            if k == 0:
                raise ConnectionError("connection closed by peer")
            self.end += k

    def _take(self, n: int) -> bytes:
        if n > len(self.buf):  # a large header (up to MAX_HEADER_BYTES): grow for it
            self.buf.extend(bytes(n - len(self.buf)))
        self._fill(n)
        self.start += n
        return bytes(memoryview(self.buf)[self.start - n:self.start])

    def _payload(self, n: int):
        if n <= self.CHUNK >> 2 and self.alloc is _bytearray:
            return bytearray(self._take(n))  # small: a copy out of the buffer beats a recv
        dst, raw = self.alloc(n)
        view = memoryview(raw).cast("B")
        have = min(n, self.end - self.start)
        view[:have] = memoryview(self.buf)[self.start:self.start + have]
        self.start += have
        _recv_into(self.sock, view, have)
        return dst

    def recv(self) -> tuple[dict, list]:
        """The next frame: its header and its payloads (from ``alloc`` when large)."""
        if self.start == self.end:
            self.start = self.end = 0
        hlen, nbuf = _PREFIX.unpack(self._take(_PREFIX.size))
        check_prefix(hlen, nbuf)
        lengths = struct.unpack(f"<{nbuf}Q", self._take(8 * nbuf)) if nbuf else ()
        check_lengths(lengths)
        header = decode_header(self._take(hlen))
        return header, [self._payload(n) for n in lengths]


def _bytearray(n: int):
    b = bytearray(n)
    return b, b


def send_frame(sock: socket.socket, header: dict, buffers: list = ()) -> None:
    send_frames(sock, [encode_frame(header, buffers)])


def send_frames(sock: socket.socket, frames: list) -> None:
    """Send encoded frames (``encode_frame``'s pieces) back to back, in one system call where
    the socket takes them all: a batch and the request that waits on it cost one wake-up of
    the peer, not two."""
    parts = [p for f in frames for p in f]
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg under TLS; each write is its own record
        if all(len(p) < 1 << 20 for p in parts):
            sock.sendall(b"".join(parts))
            return
        for p in parts:
            sock.sendall(p)
        return
    # sendmsg straight from the tensors' memory: no joined copy of large payloads, and a
    # partial send (the socket buffer is full) resumes where it stopped instead of copying
    # the whole frame again.
    views = [memoryview(p).cast("B") for p in parts]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + 512])  # IOV_MAX is 1024 on Linux
        while i < len(views) and sent >= views[i].nbytes:
            sent -= views[i].nbytes
            i += 1
        if sent:
            views[i] = views[i][sent:]


def send_refusal(sock, message: str) -> None:
    """Tell a peer why it is refused (best effort: it may be gone already)."""
    try:
        send_frame(sock, error_reply("PermissionError", message))
    except OSError:
        pass


def set_liveness(sock: socket.socket, timeout: float) -> None:
    """Make a dead peer or a cut network an error within about ``timeout`` seconds.

    Keepalive probes cover a connection waiting idle for a reply (a long GPU op is fine: the
    peer's kernel still acknowledges probes); TCP_USER_TIMEOUT covers data left unacknowledged.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probe = max(1, int(timeout / 4))
    for opt, value in (
        ("TCP_KEEPIDLE", probe),
        ("TCP_KEEPINTVL", probe),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(timeout * 1000)),
    ):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)

