"""At the broker a user's token acts for that user only: it cannot read, heartbeat, release
or even see the owner of another user's lease, nor act as an agent or an admin."""

from __future__ import annotations

import pytest
import requests

from .conftest import AGENT_TOKEN, USER_TOKEN


def call(api, method, path, user=None, token=None, **kw):
    token = token or (USER_TOKEN[user] if user else None)
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(method, api + path, headers=headers, timeout=10, **kw)


@pytest.fixture
def alices_lease(broker):
    r = call(broker, "POST", "leases", "alice", json={"session": "k-alice", "fraction": 0.5})
    assert r.status_code == 200, r.text
    lease = r.json()["lease"]
    yield lease
    call(broker, "DELETE", f"leases/{lease['id']}", "alice")


def test_another_users_token_cannot_read_heartbeat_or_release_a_lease(broker, alices_lease):
    lid = alices_lease["id"]
    assert alices_lease["token"], "the owner gets the lease token"
    for method, path in (
        ("GET", f"leases/{lid}"),
        ("POST", f"leases/{lid}/heartbeat"),
        ("DELETE", f"leases/{lid}"),
    ):
        r = call(broker, method, path, "bob")
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
        assert "egl1." not in r.text  # no token leaks in the refusal
    # Still alice's, still granted.
    r = call(broker, "GET", f"leases/{lid}", "alice")
    assert r.status_code == 200 and r.json()["lease"]["state"] == "granted"


def test_listings_show_other_users_nothing_to_act_on(broker, alices_lease):
    assert call(broker, "GET", "leases", "bob").json()["leases"] == []
    assert call(broker, "GET", "leases", params={"all": "true"}, user="bob").status_code == 403
    assert call(broker, "GET", "usage", "bob").status_code == 403
    me = call(broker, "GET", "me", "bob").json()
    assert me["user"] == "bob" and me["leases"] == [] and me["queue"] == []
    slices = [
        s
        for a in call(broker, "GET", "pool", "bob").json()["agents"]
        for g in a["gpus"]
        for s in g["slices"]
    ]
    assert slices and all(s["user"] is None for s in slices)  # bob sees a slice, not whose
    # Admins see everyone's leases, but never someone else's lease token.
    everyone = call(broker, "GET", "leases", params={"all": "true"}, user="root").json()["leases"]
    assert [x["user"] for x in everyone] == ["alice"] and everyone[0]["token"] is None


def test_same_session_id_for_another_user_is_a_separate_lease_bound_to_that_user(
    broker, alices_lease
):
    """Session ids are only unique per user: bob can name alice's session, but what he gets is
    his own lease whose token names him (so alice's agent session refuses it)."""
    r = call(broker, "POST", "leases", "bob", json={"session": "k-alice", "fraction": 0.5})
    assert r.status_code == 200, r.text
    bobs = r.json()["lease"]
    try:
        assert bobs["id"] != alices_lease["id"] and bobs["user"] == "bob"
        from jupyter_elastic_gpu import lease_token

        from .conftest import LEASE_SECRET

        assert lease_token.verify(bobs["token"], LEASE_SECRET)["user"] == "bob"
    finally:
        call(broker, "DELETE", f"leases/{bobs['id']}", "bob")


@pytest.mark.parametrize(
    "token",
    [None, "", "tok-alice-sec-4c1", "tok-alice-sec-4c1bX", AGENT_TOKEN, "token tok-alice-sec-4c1b"],
)
def test_missing_wrong_and_agent_tokens_are_not_users(broker, token):
    headers = {"Authorization": f"token {token}"} if token is not None else {}
    r = requests.get(broker + "me", headers=headers, timeout=10)
    assert r.status_code in (401, 403), (token, r.status_code, r.text)


def test_user_tokens_cannot_act_as_agents(broker):
    body = {"id": "rogue", "address": "127.0.0.1:1", "gpus": [{"index": 0}]}
    assert call(broker, "POST", "agents", "alice", json=body).status_code == 403
    assert (
        call(broker, "POST", "agents/a1/heartbeat", "alice", json={"gpus": []}).status_code == 403
    )
    assert call(broker, "DELETE", "agents/a1", "alice").status_code == 403
    assert "a1" in {a["id"] for a in call(broker, "GET", "pool", "alice").json()["agents"]}


@pytest.mark.parametrize("path", ["me", "agents"])
def test_non_ascii_tokens_are_refused_not_a_server_error(broker, path):
    r = requests.request(
        "GET" if path == "me" else "POST",
        broker + path,
        timeout=10,
        headers={"Authorization": "token \u00e9\u00e9".encode()},
        json={},
    )
    assert r.status_code in (401, 403), (r.status_code, r.text)
