"""The server extension against a real jupyter_server subprocess and a fake broker."""

from __future__ import annotations

import json
import threading
import time

import pytest

from jupyter_elastic_gpu.provisioner import endpoints
from jupyter_elastic_gpu.serverext.app import (
    ElasticGPUServerExtension,
    kernel_gpu_state,
    strip_secrets,
)

from .support import (
    LOCAL_GPU_PROVISIONER_SHIM,
    FakeBroker,
    JupyterProcess,
    free_port,
    gpu_kernelspec,
)

ENDPOINT_ENV = (
    "ELASTIC_GPU_BROKER_URL",
    "ELASTIC_GPU_AGENT",
    "JUPYTERHUB_API_URL",
    "JUPYTERHUB_PUBLIC_URL",
    "JUPYTERHUB_PUBLIC_HUB_URL",
    "JUPYTERHUB_BASE_URL",
)
SERVER_CONFIG = LOCAL_GPU_PROVISIONER_SHIM + "\nc.ElasticGPUServerExtension.request_timeout = 1.5\n"


@pytest.fixture(scope="module")
def broker():
    b = FakeBroker().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def server(broker, tmp_path_factory):
    proc = JupyterProcess(
        tmp_path_factory.mktemp("server"),
        env={"ELASTIC_GPU_BROKER_URL": broker.url, "JUPYTERHUB_API_TOKEN": "alice-token"},
        server_config=SERVER_CONFIG,
        kernelspecs={"gpu-half": gpu_kernelspec(0.5)},
        labextension_from_repo=False,
    )
    yield proc
    proc.stop()


@pytest.fixture
def as_admin(broker):
    broker.state["tokens"]["alice-token"] = "admin"
    yield
    broker.state["tokens"]["alice-token"] = "alice"


@pytest.fixture
def kernel(server):
    status, model = server.request("POST", "api/kernels", {"name": "gpu-half"})
    assert status == 201, (status, model, server.log()[-3000:])
    yield model["id"]
    server.request("DELETE", f"api/kernels/{model['id']}")


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "env, mode, where",
    [
        ({}, "none", ""),
        ({"ELASTIC_GPU_AGENT": "127.0.0.1:7070"}, "agent", "127.0.0.1:7070"),
        # a Hub without a public URL: its API port serves no services, so no broker
        ({"JUPYTERHUB_API_URL": "http://10.1.2.3:8081/hub/api", "JUPYTERHUB_BASE_URL": "/"}, "none", ""),
        (
            {
                "JUPYTERHUB_API_URL": "http://10.1.2.3:8081/hub/api",
                "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/hub/",
                "JUPYTERHUB_BASE_URL": "/",
            },
            "broker",
            "https://hub.example.org/services/elastic-gpu/api/",  # through the proxy
        ),
        # An agent set beside a Hub: the kernels use it directly, so the sidebar does too.
        (
            {"ELASTIC_GPU_AGENT": "127.0.0.1:7070", "JUPYTERHUB_API_URL": "http://h:8081/hub/api"},
            "agent",
            "127.0.0.1:7070",
        ),
        (
            {"ELASTIC_GPU_BROKER_URL": "http://broker:9/api/", "ELASTIC_GPU_AGENT": "a:1"},
            "broker",
            "http://broker:9/api/",
        ),
    ],
)
def test_the_sidebar_talks_to_where_the_kernels_lease_from(monkeypatch, env, mode, where):
    for k in ENDPOINT_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ext = ElasticGPUServerExtension()
    assert ext.mode == mode
    if where is not None:
        assert {"broker": ext.broker_url, "agent": ext.agent_address}.get(mode, "") == where
    used = (ext.broker_url, ext.agent_address if mode == "agent" else "")
    assert used == endpoints.resolve()


def test_strip_secrets():
    data = {"leases": [{"id": "x", "token": "egl1.s"}], "queue": [], "lease": {"token": "t"}}
    assert strip_secrets(data) == {"leases": [{"id": "x"}], "queue": [], "lease": {}}


def test_kernel_gpu_state():
    me = {
        "leases": [{"id": "1", "session": "k1", "state": "granted"}],
        "queue": [{"id": "2", "session": "k2", "state": "queued", "position": 3, "reason": "pool"}],
    }
    assert kernel_gpu_state("k1", me)["state"] == "attached"
    s = kernel_gpu_state("k2", me)
    assert (s["state"], s["position"], s["reason"]) == ("waiting", 3, "pool")
    assert kernel_gpu_state("k3", me) == {
        "state": "idle",
        "position": None,
        "reason": None,
        "lease": None,
    }
    assert kernel_gpu_state("k1", {})["state"] == "idle"


# ----------------------------------------------------------------------------- real server


def test_requires_jupyter_auth(server):
    for path in ("me", "pool", "leases", "usage", "sessions", "kernels/x"):
        status, _ = server.request("GET", f"elastic-gpu/api/{path}", token=None)
        assert status in (401, 403), path


def test_me_uses_hub_token_and_hides_it(server, broker):
    broker.requests.clear()
    status, me = server.request("GET", "elastic-gpu/api/me")
    assert status == 200, me
    assert me["user"] == "alice" and me["admin"] is False and me["mode"] == "broker"
    assert me["limit"] == 1.0 and me["in_use"] == 0.5
    assert [lease["id"] for lease in me["leases"]] == ["L-a1"]
    assert [(q["id"], q["position"]) for q in me["queue"]] == [("L-a2", 2)]
    assert broker.requests[-1]["auth"] == "token alice-token"
    text = json.dumps(me)
    assert "alice-token" not in text
    assert "SECRET-LEASE-TOKEN" not in text and '"token"' not in text


def test_pool_shows_only_my_name_to_non_admin(server):
    status, pool = server.request("GET", "elastic-gpu/api/pool")
    assert status == 200, pool
    assert [a["id"] for a in pool["agents"]] == ["gpu-node-1", "gpu-node-2"]
    users = {s["user"] for a in pool["agents"] for g in a["gpus"] for s in g["slices"]}
    assert users == {"alice", None}
    assert "bob" not in json.dumps(pool) and "carol" not in json.dumps(pool)


def test_admin_views_are_refused_for_non_admin(server):
    status, body = server.request("GET", "elastic-gpu/api/usage")
    assert status == 403 and "admin" in body["message"]
    status, body = server.request("GET", "elastic-gpu/api/leases?all=true")
    assert status == 403 and "admin" in body["message"]
    status, body = server.request("GET", "elastic-gpu/api/leases")
    assert status == 200 and {lease["user"] for lease in body["leases"]} == {"alice"}


def test_admin_views(server, as_admin):
    status, usage = server.request("GET", "elastic-gpu/api/usage")
    assert status == 200 and usage["users"]["carol"] == 30240.0
    status, body = server.request("GET", "elastic-gpu/api/leases?all=true")
    assert status == 200 and {lease["user"] for lease in body["leases"]} == {
        "alice",
        "bob",
        "carol",
    }
    assert "SECRET" not in json.dumps(body)
    status, pool = server.request("GET", "elastic-gpu/api/pool")
    users = {s["user"] for a in pool["agents"] for g in a["gpus"] for s in g["slices"]}
    assert users == {"alice", "bob", "carol"}


def test_sessions_are_mine_only(server):
    status, body = server.request("GET", "elastic-gpu/api/sessions")
    assert status == 200, body
    assert {s["session"] for s in body["sessions"]} == {"kern-alice-train", "kern-alice-old"}
    old = next(s for s in body["sessions"] if s["session"] == "kern-alice-old")
    assert old["swapped"] is True and old["agent"]["id"] == "gpu-node-1"


def test_kernel_state_follows_the_broker(server, broker, kernel):
    status, st = server.request("GET", f"elastic-gpu/api/kernels/{kernel}")
    assert status == 200, st
    assert (st["gpu"], st["fraction"], st["state"]) == (True, 0.5, "idle")

    lease = {
        "id": "L-k",
        "user": "alice",
        "session": kernel,
        "kernel_name": "gpu-half",
        "notebook": None,
        "fraction": 0.5,
        "state": "queued",
        "position": 2,
        "reason": "pool",
        "blocked_by": [],
        "agent": None,
        "gpus": [],
        "created": time.time(),
    }
    broker.state["leases"].append(lease)
    try:
        st = server.request("GET", f"elastic-gpu/api/kernels/{kernel}")[1]
        assert (st["state"], st["position"], st["reason"]) == ("waiting", 2, "pool")
        lease.update(state="granted", position=None, agent={"id": "gpu-node-2"}, gpus=[0])
        st = server.request("GET", f"elastic-gpu/api/kernels/{kernel}")[1]
        assert st["state"] == "attached" and "token" not in st["lease"]
        # The lease is labelled with this server's notebook name when the broker has none.
        status, _ = server.request(
            "POST",
            "api/sessions",
            {"path": "nb/gpu.ipynb", "type": "notebook", "kernel": {"id": kernel}},
        )
        me = server.request("GET", "elastic-gpu/api/me")[1]
        assert {x["id"]: x.get("notebook") for x in me["leases"]}["L-k"] == "nb/gpu.ipynb"
    finally:
        broker.state["leases"].remove(lease)


def test_kernel_state_of_plain_and_unknown_kernels(server):
    status, model = server.request("POST", "api/kernels", {"name": "python3"})
    assert status == 201
    try:
        st = server.request("GET", f"elastic-gpu/api/kernels/{model['id']}")[1]
        assert (st["gpu"], st["fraction"], st["state"]) == (False, None, "idle")
    finally:
        server.request("DELETE", f"api/kernels/{model['id']}")
    status, _ = server.request("GET", "elastic-gpu/api/kernels/no-such-kernel")
    assert status == 404


def test_broker_down_is_a_clear_503(server, broker, kernel):
    broker.stop()
    try:
        for path in ("me", "pool", "leases", f"kernels/{kernel}"):
            status, body = server.request("GET", f"elastic-gpu/api/{path}")
            assert status == 503, (path, body)
            assert body["reason"] == "unreachable"
            assert "GPU broker unreachable" in body["message"] and broker.url in body["message"]
    finally:
        broker.start()
    assert server.request("GET", "elastic-gpu/api/me")[0] == 200


def test_broker_error_is_a_502(server, broker):
    broker.fail_status = 500
    try:
        status, body = server.request("GET", "elastic-gpu/api/me")
        assert status == 502 and "broker exploded" in body["message"]
    finally:
        broker.fail_status = None


def test_slow_broker_times_out_without_blocking_the_server(server, broker):
    broker.delay = 4.0  # longer than request_timeout = 1.5 (set in SERVER_CONFIG)
    broker.delaying.clear()
    try:
        result = {}

        def slow():
            result["me"] = server.request("GET", "elastic-gpu/api/me")

        t0 = time.monotonic()
        th = threading.Thread(target=slow)
        th.start()
        assert broker.delaying.wait(5), "the slow request never reached the broker"
        t1 = time.monotonic()
        assert server.request("GET", "api/status")[0] == 200
        assert time.monotonic() - t1 < 1.0, "the event loop was blocked"
        th.join(10)
        status, body = result["me"]
        assert status == 503 and "unreachable" in body["message"]
        assert time.monotonic() - t0 < 4.0
    finally:
        broker.delay = 0.0


def test_no_broker_no_agent(tmp_path):
    with JupyterProcess(tmp_path, labextension_from_repo=False) as proc:
        status, body = proc.request("GET", "elastic-gpu/api/me")
        assert status == 503 and body["reason"] == "not_configured"
        assert "ELASTIC_GPU_AGENT" in body["message"]


def test_agent_mode_unreachable_agent(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with JupyterProcess(
        tmp_path, env={"ELASTIC_GPU_AGENT": address}, labextension_from_repo=False
    ) as proc:
        for path in ("me", "pool", "sessions"):
            status, body = proc.request("GET", f"elastic-gpu/api/{path}")
            assert status == 503, (path, body)
            assert body["reason"] == "agent_unreachable"
            assert f"GPU agent unreachable at {address}" in body["message"]
        status, body = proc.request("GET", "elastic-gpu/api/usage")
        assert status == 404 and "broker" in body["message"]


def test_agent_mode_with_a_real_agent(tmp_path):
    from tests.conftest import AgentProcess

    agent = AgentProcess()  # our own agent: failing to start it is a failure, not a skip
    try:
        with JupyterProcess(
            tmp_path, env={"ELASTIC_GPU_AGENT": agent.address}, labextension_from_repo=False
        ) as proc:
            status, me = proc.request("GET", "elastic-gpu/api/me")
            assert status == 200, me
            assert me["mode"] == "agent" and me["leases"] == [] and me["limit"] is None
            status, pool = proc.request("GET", "elastic-gpu/api/pool")
            assert status == 200, pool
            (a,) = pool["agents"]
            assert a["alive"] and a["address"] == agent.address and a["gpus"]
            assert all("slices" in g for g in a["gpus"])
    finally:
        agent.stop()


def test_without_a_terminal_sigint_stops_the_server_as_sigterm_does(monkeypatch):
    """jupyter_server leaves SIGINT to Python when stdin is no terminal (a KeyboardInterrupt
    that skips the kernels' shutdown); JupyterHub stops servers with it."""
    import signal

    from jupyter_elastic_gpu.serverext import _stop_kernels_on_sigint

    class ServerApp:
        def _signal_stop(self, sig, frame):
            pass

    app = ServerApp()
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.default_int_handler)
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.setdefault(s, h))
    _stop_kernels_on_sigint(app)
    assert installed == {signal.SIGINT: app._signal_stop}
    # in a terminal jupyter_server has its own handler (the Ctrl-C prompt): left alone
    installed.clear()
    monkeypatch.setattr(signal, "getsignal", lambda s: app._signal_stop)
    _stop_kernels_on_sigint(app)
    assert installed == {}
