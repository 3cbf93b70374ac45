"""Lease tokens at the agent, as an attacker presents them: replayed, expired, forged, for
another agent, and a second user reaching for the first user's session.

Everything is refused with a clear PermissionError; the agent keeps serving honest sessions.
(Random and malformed frames are covered by tests/agent/test_wire_hostile.py.)
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from jupyter_elastic_gpu.protocol.client import query_inventory

from .conftest import AGENT_ID, hello, put, request, token


def refused(reply, *words):
    err = reply.get("error")
    assert err and err["type"] == "PermissionError", reply
    assert all(w in err["message"] for w in words), err["message"]
    assert "Traceback" not in err["message"]


def honest_session_works(address, name):
    s, reply = hello(address, name, "honest-secret", token(user="carol", session=name))
    try:
        assert reply.get("ok"), reply
        put(s, 1, 7.0)
        r = request(s, {"op": "fetch", "t": 1})
        assert r.get("ok"), r
    finally:
        s.close()
    return True


def test_a_token_for_session_a_does_not_open_session_b(secure_agent):
    s, reply = hello(secure_agent.address, "s-bob", "x", token(user="alice", session="s-alice"))
    s.close()
    refused(reply, "another session")
    assert "s-bob" not in {x["session"] for x in query_inventory(secure_agent.address)["sessions"]}


def test_an_expired_token_is_refused(secure_agent):
    s, reply = hello(secure_agent.address, "s-exp", "x", token(session="s-exp", ttl=-5))
    s.close()
    refused(reply, "expired")


def test_a_token_signed_with_another_secret_is_refused(secure_agent):
    s, reply = hello(
        secure_agent.address, "s-forged", "x", token(secret="not-the-secret", session="s-forged")
    )
    s.close()
    refused(reply, "bad signature")


def test_tampered_claims_are_refused(secure_agent):
    good = token(user="mallory", session="s-tamper")
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(user="alice", fraction=8, exp=int(time.time()) + 10**6)
    forged = ".".join(
        [head, base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("="), sig]
    )
    s, reply = hello(secure_agent.address, "s-tamper", "x", forged)
    s.close()
    refused(reply, "bad signature")


def test_a_token_for_another_agent_is_refused(secure_agent):
    s, reply = hello(
        secure_agent.address, "s-other", "x", token(session="s-other", agent="agent-elsewhere")
    )
    s.close()
    refused(reply, "agent-elsewhere", AGENT_ID)


@pytest.mark.parametrize(
    "tok", [None, "", "egl1..", "egl1.e30.AAAA", 42, {"user": "root"}, "x" * 5000]
)
def test_no_token_or_garbage_token_opens_nothing(secure_agent, tok):
    s, reply = hello(secure_agent.address, "s-garbage", "x", tok)
    s.close()
    refused(reply)


def test_forged_session_ids_reach_nothing(secure_agent):
    """Another session's id in requests of my own session names nothing of theirs."""
    a, reply = hello(secure_agent.address, "s-alice-1", "alice-secret", token(session="s-alice-1"))
    assert reply.get("ok"), reply
    put(a, 1, 1234.0)
    assert request(a, {"op": "sync"}).get("ok")
    b, reply = hello(
        secure_agent.address, "s-bob-1", "bob-secret", token(user="bob", session="s-bob-1")
    )
    assert reply.get("ok"), reply
    try:
        # Tensor ids are per session: bob's id 1 is not alice's id 1.
        assert "unknown tensor id" in request(b, {"op": "fetch", "t": 1})["error"]["message"]
        # An interrupt for alice's session needs alice's session secret.
        c, _ = hello(secure_agent.address, "s-probe", "p", token(user="bob", session="s-probe"))
        c.close()
        import socket

        from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame

        host, port = secure_agent.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as i:
            send_frame(i, {"op": "interrupt", "session": "s-alice-1", "secret": "guess"})
            refused(recv_frame(i)[0], "wrong secret")
        # Alice's tensor is untouched.
        r = request(a, {"op": "fetch", "t": 1})
        assert r.get("ok"), r
    finally:
        a.close()
        b.close()


def test_second_user_with_own_valid_token_cannot_take_over_first_users_session(secure_agent):
    """Bob holds a genuine token for the session id alice uses (the broker scopes sessions per
    user, so it will sign one for him) but not alice's session secret: refused."""
    a, reply = hello(
        secure_agent.address, "s-shared", "alice-secret", token(user="alice", session="s-shared")
    )
    assert reply.get("ok"), reply
    try:
        put(a, 1, 42.0)
        assert request(a, {"op": "sync"}).get("ok")
        bob_token = token(user="bob", session="s-shared")
        for guess in ("", "bob-secret", "alice-secret-", "x" * 200):
            s, reply = hello(secure_agent.address, "s-shared", guess, bob_token)
            s.close()
            refused(reply)
        # Alice's session is untouched and still hers.
        r = request(a, {"op": "fetch", "t": 1})
        assert r.get("ok"), r
        owner = {x["session"]: x["user"] for x in query_inventory(secure_agent.address)["sessions"]}
        assert owner["s-shared"] == "alice"
    finally:
        a.close()
    assert honest_session_works(secure_agent.address, "s-after-takeover")


def test_refused_hello_with_leaked_secret_does_not_disconnect_the_owner(secure_agent):
    a, reply = hello(
        secure_agent.address, "s-leak", "leaked", token(user="alice", session="s-leak")
    )
    assert reply.get("ok"), reply
    try:
        put(a, 1, 5.0)
        assert request(a, {"op": "sync"}).get("ok")
        s, reply = hello(
            secure_agent.address, "s-leak", "leaked", token(user="bob", session="s-leak")
        )
        s.close()
        refused(reply, "another user")  # the takeover itself is refused...
        a.settimeout(5)
        assert request(a, {"op": "fetch", "t": 1}).get("ok")  # ...but is alice still connected?
    finally:
        a.close()


def test_agent_stops_serving_a_session_whose_token_expired(secure_agent):
    # Long enough to outlive the worker's start-up (it verifies the token again).
    exp = time.time() + 8
    s, reply = hello(secure_agent.address, "s-short", "k", token(session="s-short", exp=int(exp)))
    assert reply.get("ok"), reply
    try:
        put(s, 1, 3.0)
        assert request(s, {"op": "sync"}).get("ok")
        time.sleep(max(0.0, exp + 1.2 - time.time()))  # no renewal arrives
        refused(request(s, {"op": "fetch", "t": 1}), "expired")
        refused(request(s, {"op": "sync"}), "no GPU lease")
    finally:
        s.close()


def test_a_renewed_token_keeps_the_session_served_and_a_foreign_one_does_not(secure_agent):
    exp = time.time() + 8
    s, reply = hello(secure_agent.address, "s-renew", "k", token(session="s-renew", exp=int(exp)))
    assert reply.get("ok"), reply
    try:
        put(s, 1, 3.0)
        # A renewal for another session (or user) is refused and extends nothing.
        send_frame_renew(s, token(session="s-other", ttl=60))
        assert "another session" in request(s, {"op": "sync"})["error"]["message"]
        send_frame_renew(s, token(session="s-renew", ttl=60))
        time.sleep(max(0.0, exp + 1.2 - time.time()))  # past the first token's expiry
        assert request(s, {"op": "fetch", "t": 1}).get("ok")
        send_frame_renew(s, token(user="bob", session="s-renew", ttl=600))
        assert "another user" in request(s, {"op": "sync"})["error"]["message"]
    finally:
        s.close()
    assert honest_session_works(secure_agent.address, "s-after-renew")


def send_frame_renew(s, tok):
    from jupyter_elastic_gpu.protocol.frames import send_frame

    send_frame(s, {"op": "renew", "token": tok})


def test_a_refused_renewal_is_a_permission_error(secure_agent):
    s, reply = hello(secure_agent.address, "s-renew-type", "k", token(session="s-renew-type"))
    assert reply.get("ok"), reply
    try:
        send_frame_renew(s, token(secret="wrong", session="s-renew-type"))
        refused(request(s, {"op": "sync"}), "bad signature")
    finally:
        s.close()
