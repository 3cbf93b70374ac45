"""User isolation over the real network path (network namespaces: CPU node, broker, two GPU
nodes): bob, with his own valid Hub token and broker-issued lease tokens, can never read,
name or free alice's tensors, session or lease."""

from __future__ import annotations

import pytest

from jupyter_elastic_gpu.broker.client import BrokerClient, BrokerError
from jupyter_elastic_gpu.protocol.frames import send_frame
from tests.reliability.conftest import USER_TOKEN

from .conftest import hello, request

pytestmark = pytest.mark.timeout(240)


def test_bob_cannot_reach_alices_tensors_session_or_lease(cluster):
    alice = cluster.driver("alice")
    put = alice.cell("put", name="x")
    assert put["ok"], put
    session, lease_id = alice.hello["session"], put["lease"]
    bob = BrokerClient(cluster.api, USER_TOKEN["bob"], timeout=5)
    on_cpu = lambda fn, *a, **kw: cluster.net.call("cpu", fn, *a, **kw)  # noqa: E731

    # The lease: not readable, renewable or releasable with bob's token.
    for call in (
        lambda: bob.lease(lease_id),
        lambda: bob.heartbeat(lease_id),
        lambda: bob.release(lease_id),
    ):
        with pytest.raises(BrokerError) as e:
            on_cpu(call)
        assert e.value.status in (403, 404)
    assert lease_id in {x["id"] for x in cluster.leases()}

    # The session: bob gets a genuine lease for alice's session id (session ids are per user),
    # but its token names bob, and he lacks alice's session secret.
    stolen = on_cpu(bob.acquire, session, 0.5, timeout=20)
    try:
        for secret in ("guess", ""):
            s, reply = on_cpu(hello, put["address"], session, secret, stolen["token"])
            s.close()
            assert reply["error"]["type"] == "PermissionError", reply
    finally:
        on_cpu(bob.release, stolen["id"])

    # The tensors: from bob's own session, alice's tensor ids name nothing.
    own = on_cpu(bob.acquire, "bob-own", 0.5, timeout=20)
    try:

        def probe():
            s, reply = hello(own["agent"]["address"], "bob-own", "bob-secret", own["token"])
            assert reply.get("ok"), reply
            try:
                return [request(s, {"op": "fetch", "t": rid}) for rid in range(1, 20)]
            finally:
                send_frame(s, {"op": "close"})
                s.close()

        for reply in on_cpu(probe):
            assert "unknown tensor id" in reply["error"]["message"], reply
    finally:
        on_cpu(bob.release, own["id"])

    # Alice's state is intact and still hers.
    assert alice.cell("check", name="x")["equal"]
    node = "gpu1" if put["address"].startswith(cluster.ip["gpu1"]) else "gpu2"
    owners = {x["session"]: x["user"] for x in cluster.inventory(node)["sessions"]}
    assert owners[session] == "alice"
    alice.cell("exit")
