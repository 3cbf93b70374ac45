"""Fixtures for security tests: an agent that requires broker-signed lease tokens, a
standalone broker with static per-user tokens, and token helpers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from jupyter_elastic_gpu import lease_token
from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame
from tests.conftest import AgentProcess, free_port
from tests.reliability.conftest import cluster, netns_ok  # noqa: F401 - fixtures for e2e tests

LEASE_SECRET = "sec-lease-secret-7f3a9c"
AGENT_TOKEN = "sec-agent-token-e41d02"
AGENT_ID = "agent-sec"
TOKENS = {"tok-alice-sec-4c1b": "alice", "tok-bob-sec-90fe": "bob", "tok-root-sec-22aa": "root"}
USER_TOKEN = {user: tok for tok, user in TOKENS.items()}


def claims(user="alice", session="s-alice", agent=AGENT_ID, ttl=60.0, **kw) -> dict:
    return {
        "lease": f"lease-{user}-{session}",
        "user": user,
        "session": session,
        "agent": agent,
        "gpus": [0],
        "fraction": 0.5,
        "exp": int(time.time() + ttl),
        **kw,
    }


def token(secret=LEASE_SECRET, **kw) -> str:
    return lease_token.sign(claims(**kw), secret)


def hello(address, session, secret, tok, timeout=10):
    """Open a data connection; return (socket, reply to the hello)."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    send_frame(
        s, {"op": "hello", "session": session, "secret": secret, "token": tok, "fraction": 0.5}
    )
    return s, recv_frame(s)[0]


def request(s, header, bufs=()):
    send_frame(s, header, bufs)
    return recv_frame(s)[0]


def put(s, rid, value, n=4):
    """Queue a tensor full of ``value`` as id ``rid`` on the session behind ``s``."""
    send_frame(
        s,
        {
            "op": "batch",
            "free": [],
            "ops": [
                ["aten::full.default", [[n], float(value)], {"device": {"dev": "cuda"}}, [rid], 0]
            ],
        },
    )


@pytest.fixture(scope="module")
def secure_agent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure-agent")
    (tmp / "secret").write_text(LEASE_SECRET)
    a = AgentProcess(
        "--lease-secret-file",
        str(tmp / "secret"),
        "--agent-id",
        AGENT_ID,
        "--session-grace",
        "2",
        device="cpu",
    )
    yield a
    a.stop()


def start_broker(tmp: Path, log_name="broker.log", extra=""):
    port = free_port()
    cfg = tmp / "broker_config.py"
    cfg.write_text(
        f"c.ElasticGPUBroker.static_tokens = {TOKENS!r}\n"
        "c.ElasticGPUBroker.admin_users = {'root'}\n"
        f"c.ElasticGPUBroker.agent_token = {AGENT_TOKEN!r}\n"
        f"c.ElasticGPUBroker.lease_secret = {LEASE_SECRET!r}\n"
        f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{port}'\n"
        f"c.ElasticGPUBroker.db_url = 'sqlite:///{tmp / 'broker.sqlite'}'\n"
        "c.ElasticGPUBroker.default_limit = 2.0\n"
        "c.ElasticGPUBroker.queue_timeout = 5.0\n" + extra
    )
    log = open(tmp / log_name, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_elastic_gpu", "broker", "-f", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/services/elastic-gpu/api/"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(api + "openapi.json", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp / log_name).read_text())
        time.sleep(0.1)
    return proc, api


def stop_process(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A standalone broker on loopback with one registered (fake) agent of two GPUs."""
    proc, api = start_broker(tmp_path_factory.mktemp("broker"))
    r = requests.post(
        api + "agents",
        headers={"Authorization": f"token {AGENT_TOKEN}"},
        timeout=5,
        json={
            "id": "a1",
            "address": "127.0.0.1:9",
            "gpus": [
                {"index": i, "uuid": f"GPU-{i}", "name": "Fake", "memory_total": 1 << 34}
                for i in range(2)
            ],
        },
    )
    assert r.status_code == 200, r.text
    yield api
    stop_process(proc)
