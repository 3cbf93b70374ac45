"""Small synchronous queries of an agent that need no session (inventory for the sidebar)."""

from __future__ import annotations

from ..remote.session import parse_address
from ..remote.tls import connect
from ..remote.wire import recv_frame, send_frame


def query_inventory(address: str, timeout: float = 3.0) -> dict:
    """Return ``{"agent": ..., "gpus": [...], "sessions": [...]}`` from the agent at HOST:PORT."""
    with connect(*parse_address(address), timeout) as s:
        send_frame(s, {"op": "inventory"})
        reply, _ = recv_frame(s)
    if "error" in reply:
        raise RuntimeError(reply["error"].get("message"))
    return reply
