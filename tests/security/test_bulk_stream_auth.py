"""Bulk streams (protocol/bulk.py) at an agent that requires lease tokens: a stream must prove
what the session's own connection proves (secret and a valid lease token of the session's
user) and name the live connection it joins; everything else is refused with a reason, and
the owner's connection and streams are not disturbed."""

from __future__ import annotations

import socket

import pytest

from jupyter_elastic_gpu.protocol import messages as m
from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame

from .conftest import LEASE_SECRET, hello, put, request, token


def bulk_hello(address, session, secret, conn, tok, index=0):
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    send_frame(
        s, m.BulkHello(session=session, secret=secret, conn=conn, index=index, token=tok).header()
    )
    return s, recv_frame(s)[0]


@pytest.fixture
def alice(secure_agent):
    s, reply = hello(secure_agent.address, "s-bulk", "alice-secret", token(session="s-bulk"))
    assert reply.get("ok"), reply
    yield s, reply["bulk_offer"]["conn"]
    s.close()


@pytest.mark.parametrize(
    "secret, tok, why",
    [
        ("alice-secret", None, "requires a lease token"),
        ("alice-secret", "egl1.garbage.sig", "lease token rejected"),
        ("alice-secret", lambda: token(session="s-bulk", ttl=-5), "expired"),
        (
            "alice-secret",
            lambda: token(session="s-bulk", secret="other" + LEASE_SECRET),
            "signature",
        ),
        ("alice-secret", lambda: token(session="s-other"), "another session"),
        ("alice-secret", lambda: token(user="bob", session="s-bulk"), "another user"),
        ("bob-secret", lambda: token(user="bob", session="s-bulk"), "wrong secret"),
    ],
)
def test_a_bulk_stream_proves_what_the_session_connection_proves(
    secure_agent, alice, secret, tok, why
):
    owner, conn = alice
    tok = tok() if callable(tok) else tok
    s, reply = bulk_hello(secure_agent.address, "s-bulk", secret, conn, tok)
    s.close()
    err = reply.get("error")
    assert err and err["type"] == "PermissionError" and why in err["message"], reply
    assert "egl1." not in err["message"]  # refusals do not echo tokens
    put(owner, 1, 3.0)
    assert request(owner, {"op": "fetch", "t": 1}).get("ok")  # the owner is undisturbed


def test_the_owner_opens_its_streams_and_keeps_them_when_others_are_refused(secure_agent, alice):
    owner, conn = alice
    mine = [
        bulk_hello(secure_agent.address, "s-bulk", "alice-secret", conn, token(session="s-bulk"), i)
        for i in range(2)
    ]
    assert [r for _, r in mine] == [{"ok": True, "index": 0}, {"ok": True, "index": 1}]
    # Bob, with his own genuine token for the same session id, cannot add or replace one.
    s, reply = bulk_hello(
        secure_agent.address, "s-bulk", "alice-secret", conn, token(user="bob", session="s-bulk")
    )
    s.close()
    assert "another user" in reply["error"]["message"]
    # An 8 KiB upload announced over both streams still reaches alice's session whole.
    op = ["aten::clone.default", [{"cpu": 0, "dtype": "uint8", "shape": [8192]}], {}, [2], 0]
    send_frame(owner, {"op": "batch", "ops": [op], "bulk": [[0, 1, 8192, 2]]}, [b""])
    for i, (sock, _) in enumerate(mine):
        chunk = m.Chunk(x=1, off=4096 * i, n=4096).header()
        send_frame(sock, chunk, [bytes([i + 1]) * 4096])
    send_frame(owner, {"op": "fetch", "t": 2})
    reply, bufs = recv_frame(owner)
    assert reply.get("ok") and bytes(bufs[0]) == b"\x01" * 4096 + b"\x02" * 4096, reply
    for sock, _ in mine:
        sock.close()
