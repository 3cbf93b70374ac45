"""Fixtures for fault tests on a real multi-host layout built from network namespaces.

``cluster`` gives one run its own network: a broker host (10.200.X.2), two GPU-node hosts
each running an agent (``--device cpu``, .21 and .22) and a CPU-node host (.10) where client
programs ("kernels") run. Timeouts are short so faults resolve in seconds. Everything the
fixture starts (processes, namespaces) is removed in its finalizer, even when a test fails.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from .netns import Net, netns_permitted

REPO = Path(__file__).resolve().parents[2]
AGENT_TOKEN = "rel-agent-token-5b1f"
LEASE_SECRET = "rel-lease-secret-93c0"
TOKENS = {"tok-alice-rel": "alice", "tok-bob-rel": "bob", "tok-root-rel": "root"}
USER_TOKEN = {user: tok for tok, user in TOKENS.items()}
NET_TIMEOUT = 6.0  # ELASTIC_GPU_NET_TIMEOUT of every client
LEASE_HEARTBEAT_TIMEOUT = 8.0  # broker: a silent kernel's lease ends after this
AGENT_HEARTBEAT_TIMEOUT = 3.0  # broker: a silent agent's leases end after this
SESSION_GRACE = 2.0  # agent: a vanished client's memory is freed after this
BROKER_PORT, AGENT_PORT = 8090, 7070

MEASURED: list[tuple[str, str, float]] = []  # (scenario, what, seconds), printed at the end


def record(scenario: str, what: str, seconds: float) -> None:
    MEASURED.append((scenario, what, seconds))
    print(f"[reliability] {scenario}: {what} = {seconds:.2f}s", flush=True)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("reliability: measured recovery times")
        for scenario, what, seconds in MEASURED:
            terminalreporter.write_line(f"{scenario:<46} {what:<40} {seconds:6.2f}s")


@pytest.fixture(scope="session")
def netns_ok():
    why = netns_permitted()
    if why:
        pytest.skip(f"network-namespace tests need root / CAP_NET_ADMIN: {why}")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        PYTHONPATH=str(REPO),
        ELASTIC_GPU_NET_TIMEOUT=str(NET_TIMEOUT),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ELASTIC_GPU_LEASE_SECRET", None)
    env.pop("ELASTIC_GPU_AGENT_TOKEN", None)
    return env


class Driver:
    """A client program on the CPU node, stepped with ``cell(cmd, ...)``."""

    def __init__(self, cluster, user: str, log: Path):
        env = base_env() | {"DRIVER_BROKER": cluster.api, "DRIVER_TOKEN": USER_TOKEN[user]}
        self.proc = cluster.net.popen(
            "cpu",
            [sys.executable, str(REPO / "tests/reliability/driver.py")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "ab"),
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.next(60)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float = 60.0) -> dict:
        msg = self.lines.get(timeout=timeout)
        if msg is None:
            raise RuntimeError(f"client exited with {self.proc.poll()}")
        return msg

    def send(self, cmd: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def cell(self, cmd: str, timeout: float = 60.0, **kw) -> dict:
        self.send(cmd, **kw)
        return self.next(timeout)


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.net = Net()
        self.ip = {
            name: self.net.host(name, n)
            for name, n in (("broker", 2), ("cpu", 10), ("gpu1", 21), ("gpu2", 22))
        }
        self.api = f"http://{self.ip['broker']}:{BROKER_PORT}/services/elastic-gpu/api/"
        self.db = tmp / "broker.sqlite"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        (tmp / "lease_secret").write_text(LEASE_SECRET)
        (tmp / "broker_config.py").write_text(
            f"c.ElasticGPUBroker.static_tokens = {TOKENS!r}\n"
            "c.ElasticGPUBroker.admin_users = {'root'}\n"
            f"c.ElasticGPUBroker.agent_token = {AGENT_TOKEN!r}\n"
            f"c.ElasticGPUBroker.lease_secret = {LEASE_SECRET!r}\n"
            f"c.ElasticGPUBroker.bind_url = 'http://{self.ip['broker']}:{BROKER_PORT}'\n"
            f"c.ElasticGPUBroker.db_url = 'sqlite:///{self.db}'\n"
            "c.ElasticGPUBroker.default_limit = 2.0\n"
            f"c.ElasticGPUBroker.lease_heartbeat_timeout = {LEASE_HEARTBEAT_TIMEOUT}\n"
            f"c.ElasticGPUBroker.agent_heartbeat_timeout = {AGENT_HEARTBEAT_TIMEOUT}\n"
            "c.ElasticGPUBroker.queue_timeout = 30.0\n"
        )
        self.broker = None
        self.agents: dict[str, subprocess.Popen] = {}

    def agent_address(self, name: str) -> str:
        return f"{self.ip[name]}:{AGENT_PORT}"

    def log(self, name: str):
        return open(self.logs / f"{name}.log", "ab")

    def start_broker(self) -> None:
        self.broker = self.net.popen(
            "broker",
            [
                sys.executable,
                "-m",
                "jupyter_elastic_gpu",
                "broker",
                "-f",
                str(self.tmp / "broker_config.py"),
            ],
            env=base_env(),
            stdout=self.log("broker"),
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
        )
        self.wait(
            lambda: self.http("GET", "openapi.json", token=None).status_code == 200, 30, "broker up"
        )

    def start_agent(self, name: str) -> None:
        self.agents[name] = self.net.popen(
            name,
            [
                sys.executable,
                "-m",
                "jupyter_elastic_gpu",
                "agent",
                "--device",
                "cpu",
                "--listen",
                self.agent_address(name),
                "--broker-url",
                self.api,
                "--agent-token",
                AGENT_TOKEN,
                "--lease-secret-file",
                str(self.tmp / "lease_secret"),
                "--agent-id",
                name,
                "--session-grace",
                str(SESSION_GRACE),
                "--cpu-memory-gib",
                "1",
            ],
            env=base_env(),
            stdout=self.log(name),
            stderr=subprocess.STDOUT,
        )

    def http(self, method: str, path: str, token: str | None = USER_TOKEN["root"], **kw):
        """A request to the broker from the CPU node (the path kernels use)."""
        headers = {"Authorization": f"token {token}"} if token else {}
        return self.net.call(
            "cpu", requests.request, method, self.api + path, headers=headers, timeout=5, **kw
        )

    def leases(self) -> list[dict]:
        return self.http("GET", "leases", params={"all": "true"}).json()["leases"]

    def alive_agents(self) -> set[str]:
        return {a["id"] for a in self.http("GET", "pool").json()["agents"] if a["alive"]}

    def inventory(self, name: str) -> dict:
        from jupyter_elastic_gpu.protocol.client import query_inventory

        return self.net.call("cpu", query_inventory, self.agent_address(name))

    @staticmethod
    def wait(pred, timeout: float, what: str, interval: float = 0.1):
        """Poll ``pred`` until truthy (exceptions count as not yet); return the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if pred():
                    return time.monotonic() - t0
            except (requests.RequestException, OSError, ValueError, KeyError):
                pass
            time.sleep(interval)
        raise TimeoutError(f"not {what} after {timeout}s")

    def driver(self, user: str = "alice", name: str = "client") -> Driver:
        return Driver(self, user, self.logs / f"{name}.log")

    def kill_broker(self) -> None:
        self.net.kill_host("broker")
        self.broker.wait(10)

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.logs.iterdir())
        )

    def close(self) -> None:
        for p in self.net.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.net.close()


@pytest.fixture
def cluster(netns_ok, tmp_path, request):
    c = Cluster(tmp_path)
    try:
        c.start_broker()
        c.start_agent("gpu1")
        c.start_agent("gpu2")
        c.wait(lambda: c.alive_agents() == {"gpu1", "gpu2"}, 90, "both agents registered")
        yield c
    finally:
        if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
            print(c.all_logs())
        c.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
