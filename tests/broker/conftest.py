"""Fixtures: a real JupyterHub (with configurable-http-proxy) and broker processes on loopback.

The Hub knows the broker as the external service ``elastic-gpu`` so that tests can start,
kill and restart it with different configs; ``test_managed_service`` checks the Hub-managed
form too. Every process is started in its own process group and killed with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

from jupyter_elastic_gpu.agent.local import free_port
from jupyter_elastic_gpu.broker.client import BrokerClient

from .postgres import PostgresServer, binaries

AGENT_TOKEN = "test-agent-token"
LEASE_SECRET = "test-lease-secret"
PREFIX = "/services/elastic-gpu/"
USERS = ("alice", "bob", "carol", "admin")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0, ok=(200,)):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def start(cmd, log: Path, cwd, env=None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (e.g. the proxy)
    except ProcessLookupError:
        pass
    proc.wait()


def hub_config(tmp: Path, ports: dict, services: list, extra: str = "") -> Path:
    cfg = tmp / "jupyterhub_config.py"
    cfg.write_text(
        f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{ports["proxy"]}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {ports["hub"]}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports["proxy_api"]}"
c.ConfigurableHTTPProxy.pid_file = {str(tmp / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///{tmp / "jupyterhub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(tmp / "cookie_secret")!r}
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "test-password"
c.Authenticator.allowed_users = {{"alice", "bob", "carol"}}
c.Authenticator.admin_users = {{"admin"}}
c.JupyterHub.load_groups = {{"ml": {{"users": ["bob"]}}, "vision": {{"users": ["bob", "carol"]}}}}
c.JupyterHub.services = {services!r}
c.JupyterHub.load_roles = [
    # the broker reads users' admin flag and groups with its own token
    {{"name": "elastic-gpu-service", "scopes": ["read:users", "read:groups"], "services": ["elastic-gpu"]}},
    # every user (and the tokens of their servers/kernels) may call the broker
    {{"name": "user", "scopes": ["self", "access:services!service=elastic-gpu"]}},
    # the test's own admin client, to create tokens
    {{"name": "admin", "services": ["test-admin"]}},
]
{extra}
"""
    )
    return cfg


class Hub:
    def __init__(self, tmp: Path, services: list, broker_port: int | None = None, extra=""):
        self.tmp = tmp
        self.ports = {k: free_port() for k in ("proxy", "hub", "proxy_api")}
        self.url = f"http://127.0.0.1:{self.ports['proxy']}"
        self.api_url = f"http://127.0.0.1:{self.ports['hub']}/hub/api"
        self.admin_token = os.urandom(16).hex()
        services = [*services, {"name": "test-admin", "api_token": self.admin_token}]
        cfg = hub_config(tmp, self.ports, services, extra)
        self.log = tmp / "jupyterhub.log"
        self.proc = start(["jupyterhub", "-f", str(cfg)], self.log, tmp)
        wait_http(f"{self.url}/hub/api/", self.proc, self.log)
        self._tokens = {}

    def api(self, method, path, **kw):
        r = requests.request(
            method,
            f"{self.url}/hub/api/{path}",
            headers={"Authorization": f"token {self.admin_token}"},
            timeout=10,
            **kw,
        )
        r.raise_for_status()
        return r.json() if r.content else None

    def token(self, user: str, scopes=None) -> str:
        """A real Hub token of ``user`` (default: all the user's permissions)."""
        key = (user, json.dumps(scopes))
        if key not in self._tokens:
            body = {"note": "broker test"} | ({"scopes": scopes} if scopes is not None else {})
            self._tokens[key] = self.api("POST", f"users/{user}/tokens", json=body)["token"]
        return self._tokens[key]

    def stop(self):
        stop(self.proc)


class Broker:
    """A broker process known to the Hub as the external service ``elastic-gpu``."""

    def __init__(self, hub: Hub, tmp: Path, port: int, service_token: str, **config):
        self.hub, self.tmp, self.port = hub, tmp, port
        self.cfg = tmp / "elastic_gpu_config.py"
        self.log = tmp / "broker.log"
        self.env = {
            **os.environ,
            "JUPYTERHUB_API_TOKEN": service_token,
            "JUPYTERHUB_API_URL": hub.api_url,
            "JUPYTERHUB_SERVICE_NAME": "elastic-gpu",
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
            "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
            "ELASTIC_GPU_AGENT_TOKEN": AGENT_TOKEN,
            "ELASTIC_GPU_LEASE_SECRET": LEASE_SECRET,
        }
        config.setdefault("db_url", f"sqlite:///{tmp / 'broker.sqlite'}")
        self.configure(**config)
        self.api = f"{hub.url}{PREFIX}api/"
        self.proc = None
        self.start()

    def configure(self, **config):
        self.config = config
        self.cfg.write_text("".join(f"c.ElasticGPUBroker.{k} = {v!r}\n" for k, v in config.items()))

    def start(self):
        cmd = [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(self.cfg)]
        self.proc = start(cmd, self.log, self.tmp, self.env)
        # through the proxy, as users reach it
        wait_http(self.api + "openapi.json", self.proc, self.log, timeout=30)

    def stop(self, sig=signal.SIGTERM):
        stop(self.proc, sig)

    def client(self, user: str, **kw) -> BrokerClient:
        return BrokerClient(self.api, self.hub.token(user, **kw))

    def agent(self) -> BrokerClient:
        return BrokerClient(self.api, AGENT_TOKEN)

    def get(self, path, user=None, token=None, **kw):
        token = token or (self.hub.token(user) if user else None)
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.get(self.api + path, headers=headers, timeout=10, **kw)

    def request(self, method, path, user=None, token=None, **kw):
        token = token or (self.hub.token(user) if user else None)
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.request(method, self.api + path, headers=headers, timeout=10, **kw)


class NotFound(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def proxy_available():
    if not shutil.which("configurable-http-proxy"):
        pytest.skip(
            "configurable-http-proxy is not installed (npm install -g configurable-http-proxy)"
        )


@pytest.fixture(scope="session")
def hub(tmp_path_factory, proxy_available):
    tmp = tmp_path_factory.mktemp("hub")
    broker_port = free_port()
    service_token = os.urandom(16).hex()
    # The Hub waits ~30s at start-up for an external service that does not answer yet:
    # stand in for the broker until the Hub is up.
    stand_in = HTTPServer(("127.0.0.1", broker_port), NotFound)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    try:
        h = Hub(
            tmp,
            [
                {
                    "name": "elastic-gpu",
                    "url": f"http://127.0.0.1:{broker_port}",
                    "api_token": service_token,
                }
            ],
        )
    finally:
        stand_in.shutdown()
        stand_in.server_close()
    h.broker_port, h.service_token = broker_port, service_token
    yield h
    h.stop()


# The database-facing tests run against both; the rest on SQLite only (CI time).
BOTH_DATABASES = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the session (CI installs Debian's postgresql).

    Skipped only where the server's binaries are missing, and not even then under
    ``ELASTIC_GPU_REQUIRE_POSTGRES=1`` (.ci/run sets it): CI must not pass without PostgreSQL.
    The driver is part of the test extra, so a missing psycopg is an error, not a skip.
    """
    bindir = binaries()
    if bindir is None:
        why = "PostgreSQL is not installed (apt-get install postgresql): no initdb found"
        if os.environ.get("ELASTIC_GPU_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{why}, and ELASTIC_GPU_REQUIRE_POSTGRES=1")
        pytest.skip(why)
    import psycopg  # noqa: F401  (pip install -e '.[test]' or '.[postgres]')

    server = PostgresServer(bindir)
    yield server
    server.stop()


@pytest.fixture
def db_url(request, tmp_path):
    """The broker's database: a SQLite file by default; a fresh PostgreSQL database for tests
    marked BOTH_DATABASES."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.sqlite'}"
    assert kind == "postgresql", kind
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def make_broker(hub, tmp_path, db_url):
    """Start the broker with some config; it is stopped after the test."""
    brokers = []

    def make(**config):
        config.setdefault("db_url", db_url)
        b = Broker(hub, tmp_path, hub.broker_port, hub.service_token, **config)
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


def gpus(n: int) -> list[dict]:
    return [
        {"index": i, "uuid": f"GPU-{i}", "name": "Fake H100", "memory_total": 80 << 30}
        for i in range(n)
    ]
