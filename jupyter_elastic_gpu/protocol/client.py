"""The sessionless agent client: inventory, interrupt and close, for anyone but the session.

The sidebar's server extension, the provisioner (freeing a dead kernel's session), ``check``
and the kernel's own Ctrl-C all use these; none of them needs torch. Each call is one short
blocking connection: callers on an event loop run it in an executor.
"""

from __future__ import annotations

import time

from . import messages as m
from .frames import ProtocolError, recv_frame, send_frame
from .tls import connect, open_session


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a socket address; an empty host is loopback."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"agent address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _ask(address: str, msg: m.Message, timeout: float) -> dict:
    with connect(*parse_address(address), timeout) as s:
        send_frame(s, msg.header())
        reply, _ = recv_frame(s)
    return reply


def query_inventory(address: str, timeout: float = 3.0) -> dict:
    """Return ``{"agent": ..., "gpus": [...], "sessions": [...]}`` from the agent at HOST:PORT."""
    reply = _ask(address, m.Inventory(), timeout)
    if "error" in reply:
        raise RuntimeError(reply["error"].get("message"))
    return reply


def interrupt_session(address: str, session: str, secret: str, epoch: int, timeout=5.0) -> bool:
    """Drop the session's work queued before ``epoch``; False where the agent refused."""
    reply = _ask(address, m.Interrupt(session=session, secret=secret, epoch=epoch), timeout)
    return "error" not in reply


def close_session(
    address: str, session: str, secret: str, *, token: str | None = None, timeout: float = 3.0
) -> bool:
    """Free ``session`` on the agent at ``address`` if it is still there; True if it was.

    The agent hands a connection that knows the session's secret to the session's worker
    even without a lease, and ``close`` is honoured before any lease check. Returns once
    the agent no longer lists the session (or after ``timeout``), so a restarted kernel
    (same session id) starts from a clean slate. With a broker, ``token`` is a lease token
    for the session.
    """
    deadline = time.monotonic() + timeout
    closed, last_try = False, -1.0
    while True:
        now = time.monotonic()
        left = deadline - now
        if left <= 0 or not is_listed(address, session, min(left, 3.0)):
            return closed
        # A worker that is still starting (the kernel died between its lease and its hello)
        # may drop our connection unanswered, or take our hello into the kernel's unfinished
        # one: ask again every second until the session is gone.
        if now - last_try >= 1.0:
            last_try = now
            outcome = _send_close(address, session, secret, token, min(left, 5.0))
            if outcome == "refused":
                return False  # wrong secret (not ours to free), or the lease token was refused
            closed = closed or outcome == "closed"
        time.sleep(0.1)


def is_listed(address: str, session: str, timeout: float) -> bool:
    """The agent at ``address`` answers and lists ``session``."""
    try:
        sessions = query_inventory(address, timeout=timeout).get("sessions", [])
    except (OSError, RuntimeError, ValueError):
        return False  # agent gone: nothing of ours is left there
    return any(s.get("session") == session for s in sessions)


def _send_close(address: str, session: str, secret: str, token: str | None, timeout: float) -> str:
    hello = m.Hello(session=session, secret=secret, token=token, pid=0)
    try:
        sock, refusal = open_session(*parse_address(address), hello.header(), timeout)
        if refusal is not None:
            return "refused"
        with sock:
            reply, _ = recv_frame(sock)
            if "error" in reply:
                return "refused"
            send_frame(sock, m.Close().header())
            try:
                recv_frame(sock)  # the worker's goodbye, or EOF
            except (OSError, ConnectionError, ProtocolError):
                pass
            return "closed"
    except (OSError, ConnectionError, ProtocolError):
        return "retry"
