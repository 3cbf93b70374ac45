"""The broker as a JupyterHub service: real Hub, real proxy, real user tokens, a fake agent."""

import signal
import threading
import time

import pytest
import requests
import sqlalchemy

from jupyter_elastic_gpu.broker.client import BrokerError
from jupyter_elastic_gpu.broker.db import _engine_url
from jupyter_elastic_gpu.lease_token import verify

from .conftest import (
    BOTH_DATABASES,
    LEASE_SECRET,
    PREFIX,
    Hub,
    free_port,
    gpus,
    stop,
    wait_http,
)


def beat(client, lease_id) -> bool:
    """Heartbeat a lease; False once it has ended (the broker may end it between any two calls)."""
    try:
        client.heartbeat(lease_id)
    except BrokerError as e:
        if e.status == 404 and "has ended" in str(e):
            return False
        raise
    return True


def wait_until(predicate, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_limits_per_user_and_per_group(make_broker):
    broker = make_broker(
        default_limit=0.5, group_limits={"ml": 2.0, "vision": 1.0}, user_limits={"carol": 0.25}
    )
    broker.agent().register_agent("a1", "127.0.0.1:9001", gpus(4))
    alice, bob, carol = (broker.client(u) for u in ("alice", "bob", "carol"))

    me = bob.me()
    assert me["user"] == "bob" and set(me["groups"]) >= {"ml", "vision"} and me["limit"] == 2.0
    assert alice.me()["limit"] == 0.5 and carol.me()["limit"] == 0.25  # override beats group

    with pytest.raises(BrokerError) as e:
        alice.request("k1", 1.0)
    assert e.value.status == 403 and "limit of 0.5" in e.value.message
    assert bob.request("k1", 2.0)["state"] == "granted"  # the most generous group
    with pytest.raises(BrokerError) as e:
        carol.request("k1", 0.5)
    assert e.value.status == 403

    lease = alice.request("k1", 0.5)
    assert lease["state"] == "granted" and lease["agent"]["address"] == "127.0.0.1:9001"
    claims = verify(lease["token"], LEASE_SECRET)
    assert claims["user"] == "alice" and claims["agent"] == "a1" and claims["gpus"] == lease["gpus"]
    queued = alice.request("k2", 0.25)
    assert queued["state"] == "queued" and queued["reason"] == "quota"
    assert [b["id"] for b in queued["blocked_by"]] == [lease["id"]]


def test_fair_queue_between_two_users_and_queue_timeout(make_broker):
    broker = make_broker(default_limit=4.0, queue_timeout=4.0, lease_heartbeat_timeout=30.0)
    broker.agent().register_agent("a1", "127.0.0.1:9001", gpus(1))
    alice, bob = broker.client("alice"), broker.client("bob")

    hog = alice.acquire("k0", 1.0)
    a1, a2 = alice.request("k1", 1.0), alice.request("k2", 1.0)
    waits = []
    got = {}
    t = threading.Thread(
        target=lambda: got.setdefault("bob", bob.acquire("b1", 1.0, on_wait=waits.append))
    )
    t.start()
    wait_until(lambda: waits)
    assert waits[0]["position"] == 1 and waits[0]["reason"] == "pool"  # ahead of alice's two
    assert alice.lease(a1["id"])["position"] == 2 and alice.lease(a2["id"])["position"] == 3

    alice.release(hog["id"])
    t.join(10)
    assert got["bob"]["state"] == "granted"
    bob.release(got["bob"]["id"])
    assert alice.lease(a1["id"], wait=2)["state"] == "granted"  # FIFO within alice
    assert alice.lease(a2["id"])["position"] == 1

    # nobody releases: alice's second request times out in the queue
    with pytest.raises(BrokerError, match="queue timeout"):
        alice.acquire("k2", 1.0)
    assert alice.lease(a2["id"])["reason"] == "timeout"


@BOTH_DATABASES
def test_lease_expires_when_the_kernel_stops_heartbeating_and_agent_death(make_broker):
    broker = make_broker(lease_heartbeat_timeout=2.0, agent_heartbeat_timeout=2.0)
    agent = broker.agent()
    agent.register_agent("a1", "127.0.0.1:9001", gpus(1))
    agent.register_agent("a2", "127.0.0.1:9002", gpus(1))
    alice, bob = broker.client("alice"), broker.client("bob")
    lease = alice.acquire("k", 1.0)
    other = bob.acquire("k", 1.0)
    for _ in range(6):  # alive past the timeout while heartbeating
        time.sleep(0.5)
        for a in ("a1", "a2"):
            agent.agent_heartbeat(a)
        fresh = alice.heartbeat(lease["id"])
        bob.heartbeat(other["id"])
    assert (
        fresh["state"] == "granted" and verify(fresh["token"], LEASE_SECRET)["exp"] >= time.time()
    )

    # alice's kernel goes silent; agents stay alive
    def ended(client, lease_id, beats=()):
        for a in ("a1", "a2"):
            agent.agent_heartbeat(a)
        for c, i in beats:
            assert beat(c, i), "only the silent kernel's lease may end here"
        return client.lease(lease_id)["state"] == "ended"

    wait_until(lambda: ended(alice, lease["id"], [(bob, other["id"])]), timeout=8)
    assert alice.lease(lease["id"])["reason"] == "expired"
    with pytest.raises(BrokerError) as e:
        alice.heartbeat(lease["id"])
    assert e.value.status == 404

    # bob's agent dies: his lease ends and its GPU leaves the pool
    dead = other["agent"]["id"]
    live = "a1" if dead == "a2" else "a2"

    def agent_gone():
        agent.agent_heartbeat(live)
        return not beat(bob, other["id"])

    wait_until(agent_gone, timeout=8)
    assert bob.lease(other["id"])["reason"] == "agent-lost"
    pool = {a["id"]: a for a in bob.pool()["agents"]}
    assert not pool[dead]["alive"] and pool[live]["alive"]
    with pytest.raises(BrokerError) as e:
        agent.agent_heartbeat("nobody")
    assert e.value.status == 404


@BOTH_DATABASES
def test_restart_keeps_leases_and_sighup_reloads_limits(make_broker):
    broker = make_broker(
        default_limit=1.0, lease_heartbeat_timeout=30.0, agent_heartbeat_timeout=60.0
    )
    broker.agent().register_agent("a1", "127.0.0.1:9001", gpus(2))
    alice = broker.client("alice")
    granted = alice.acquire("k1", 1.0)
    queued = alice.request("k2", 0.5)
    assert queued["reason"] == "quota"

    broker.stop(signal.SIGKILL)  # no chance to save anything at exit
    broker.start()
    after = {x["id"]: x for x in alice.leases()}
    assert set(after) == {granted["id"], queued["id"]}
    assert (
        after[granted["id"]]["gpus"] == granted["gpus"] and after[queued["id"]]["state"] == "queued"
    )
    assert verify(after[granted["id"]]["token"], LEASE_SECRET)["lease"] == granted["id"]

    # raise the limit, SIGHUP: the queued request is granted, the granted one untouched
    broker.configure(**{**broker.config, "default_limit": 2.0})
    broker.proc.send_signal(signal.SIGHUP)
    assert alice.lease(queued["id"], wait=5)["state"] == "granted"
    assert alice.me()["limit"] == 2.0 and alice.lease(granted["id"])["state"] == "granted"

    # a broken config on SIGHUP is refused and the broker keeps serving with the old one
    broker.configure(**{**broker.config, "default_limit": -1.0})
    broker.proc.send_signal(signal.SIGHUP)
    # Only once the reload has been tried does the unchanged limit say it was refused.
    wait_until(lambda: "Config reload failed" in broker.log.read_text())
    assert broker.proc.poll() is None and alice.me()["limit"] == 2.0

    for lease_id in after:
        alice.release(lease_id)
    assert alice.leases() == []
    usage = broker.client("admin").usage()
    assert usage["users"]["alice"] > 0


@BOTH_DATABASES
def test_concurrent_lease_churn_leaks_nothing(make_broker, db_url):
    """Many kernels take and give back slices at once: every lease ends, every one is in the
    usage record, and the pool is whole again, also after a restart."""
    broker = make_broker(default_limit=1.0, lease_heartbeat_timeout=30.0, queue_timeout=60.0)
    broker.agent().register_agent("a1", "127.0.0.1:9001", gpus(2))
    rounds, errors, ids = 6, [], []

    def kernel(user, n):
        client = broker.client(user)
        try:
            for i in range(rounds):
                lease = client.acquire(f"{user}-{n}-{i}", 0.25)
                ids.append(lease["id"])
                client.heartbeat(lease["id"])
                client.release(lease["id"])
        except Exception as e:  # re-raised below, on the test's thread
            errors.append(e)

    threads = [
        threading.Thread(target=kernel, args=(user, n))
        for user in ("alice", "bob", "carol")
        for n in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(set(ids)) == len(threads) * rounds

    def check():
        assert broker.client("admin").leases(all=True) == []
        (agent,) = broker.client("admin").pool()["agents"]
        assert all(g["free"] == 1.0 and not g["slices"] for g in agent["gpus"]), agent
        engine = sqlalchemy.create_engine(_engine_url(db_url))
        try:
            with engine.connect() as conn:
                rows = conn.execute(sqlalchemy.text(
                    "SELECT id, state, granted_at, ended_at FROM elastic_gpu_leases"
                )).all()  # fmt: skip
        finally:
            engine.dispose()
        assert {r.id for r in rows} == set(ids)
        assert all(r.state == "ended" and r.ended_at >= r.granted_at for r in rows)

    check()
    broker.stop()
    broker.start()
    check()


def test_bad_config_fails_at_startup_with_a_clear_message(hub, tmp_path):
    import subprocess
    import sys

    for line, message in [
        ("c.ElasticGPUBroker.default_limit = -1", "default_limit must be a number of GPUs >= 0"),
        (
            "c.ElasticGPUBroker.defualt_limit = 1",
            "unknown config key(s): ElasticGPUBroker.defualt_limit",
        ),
        ("c.ElasticGPUBroker.fractions = [0.5, 1.5]", "1.5 fits no GPU"),
        ("c.ElasticGPUBroker.user_limits = {'alice': 'lots'}", "user_limits"),
        ("c.ElasticGPUBroker.group_limits = {'ml': -2}", "group_limits['ml']"),
    ]:
        cfg = tmp_path / "bad_config.py"
        cfg.write_text(line + "\n")
        r = subprocess.run(
            [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and message in r.stderr, (line, r.stderr)


def test_access_control(make_broker, hub):
    broker = make_broker()
    broker.agent().register_agent("a1", "127.0.0.1:9001", gpus(1))
    alice, bob = broker.client("alice"), broker.client("bob")
    mine = alice.request("k", 0.5)
    theirs = bob.request("k", 0.25)

    for method, path in [
        ("GET", f"leases/{mine['id']}"),
        ("DELETE", f"leases/{mine['id']}"),
        ("POST", f"leases/{mine['id']}/heartbeat"),
    ]:
        r = broker.request(method, path, user="bob")
        assert r.status_code == 403 and "another user" in r.json()["message"]
    for path in ("leases?all=true", "usage", "agents"):
        r = broker.get(path, user="alice")
        assert r.status_code == 403 and r.json()["message"]
    assert (
        requests.get(
            f"{hub.url}{PREFIX}metrics", headers={"Authorization": f"token {hub.token('alice')}"}
        ).status_code
        == 403
    )
    # bob sees alice's slice in the pool, but not whose it is
    slices = bob.pool()["agents"][0]["gpus"][0]["slices"]
    assert {s["user"] for s in slices} == {None, "bob"}
    assert broker.get("leases", user="bob").json()["leases"][0]["id"] == theirs["id"]
    assert broker.get(f"leases/{theirs['id']}", user="alice").status_code == 403

    assert broker.get("me").status_code == 401
    assert broker.get("me", token="not-a-token").status_code == 403
    narrow = hub.token("alice", scopes=["read:users:activity!user=alice"])
    r = broker.get("me", token=narrow)
    assert r.status_code == 403 and "access:services" in r.json()["message"]
    r = broker.request("POST", "agents", user="alice", json={"id": "x", "address": "y", "gpus": []})
    assert r.status_code == 403 and "agent token" in r.json()["message"]

    admin = broker.client("admin")
    assert {x["user"] for x in admin.leases(all=True)} == {"alice", "bob"}
    assert {s["user"] for s in admin.pool()["agents"][0]["gpus"][0]["slices"]} == {"alice", "bob"}
    assert admin.agents()[0]["id"] == "a1"
    assert "token" not in [
        k for k, v in admin._call("GET", f"leases/{mine['id']}")["lease"].items() if v
    ]
    assert admin.usage()["groups"].keys() >= {"ml", "vision"}  # bob's groups
    metrics = requests.get(
        f"{hub.url}{PREFIX}metrics", headers={"Authorization": f"token {hub.token('admin')}"}
    )
    assert metrics.status_code == 200 and 'elastic_gpu_leases{state="granted"} 2.0' in metrics.text


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "leases", "not json", 400),
        ("POST", "leases", [], 400),
        ("POST", "leases", {}, 400),
        ("POST", "leases", {"session": "k"}, 400),
        ("POST", "leases", {"session": "k", "fraction": "0.5"}, 400),
        ("POST", "leases", {"session": "k", "fraction": True}, 400),
        ("POST", "leases", {"session": "", "fraction": 0.5}, 400),
        ("POST", "leases", {"session": "k", "fraction": 0.5, "gpu": 1}, 400),
        ("POST", "leases", {"session": "k", "fraction": 0.3}, 400),
        ("POST", "leases", {"session": "k", "fraction": -1}, 400),
        ("POST", "leases", {"session": "k", "fraction": 64}, 400),
        ("POST", "leases", {"session": "k", "fraction": 2}, 403),
        ("POST", "leases", {"session": "k" * 300, "fraction": 0.5}, 400),
        ("GET", "leases/nope", None, 404),
        ("DELETE", "leases/nope", None, 404),
        ("GET", "leases/nope?wait=x", None, 404),
        ("GET", "usage?since=yesterday", None, 403),
        ("PUT", "leases", {}, 405),
        ("GET", "nothing/here", None, 404),
    ],
)
def test_bad_input_gets_a_clear_4xx(make_broker_once, method, path, body, status):
    broker = make_broker_once
    kw = {"data": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    r = broker.request(method, path, user="alice", **kw)
    assert r.status_code == status, r.text
    assert r.json()["message"]


@pytest.fixture(scope="module")
def make_broker_once(hub, tmp_path_factory):
    from .conftest import Broker

    b = Broker(hub, tmp_path_factory.mktemp("broker"), hub.broker_port, hub.service_token)
    yield b
    b.stop()


def test_managed_service(tmp_path, proxy_available):
    """The snippet docs/broker.md gives: the Hub starts the broker itself."""
    import sys

    port = free_port()
    cfg = tmp_path / "elastic_gpu_config.py"
    cfg.write_text(f"c.ElasticGPUBroker.db_url = 'sqlite:///{tmp_path / 'broker.sqlite'}'\n")
    hub = Hub(
        tmp_path,
        [
            {
                "name": "elastic-gpu",
                "url": f"http://127.0.0.1:{port}",
                "command": [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)],
                "environment": {"ELASTIC_GPU_AGENT_TOKEN": "t"},
            }
        ],
    )
    try:
        api = f"{hub.url}{PREFIX}api/"
        wait_http(api + "openapi.json", hub.proc, hub.log, timeout=30)
        r = requests.get(
            api + "me", headers={"Authorization": f"token {hub.token('bob')}"}, timeout=10
        )
        assert r.status_code == 200 and r.json()["user"] == "bob" and r.json()["limit"] == 1.0
        assert "ml" in r.json()["groups"]
    finally:
        stop(hub.proc)
