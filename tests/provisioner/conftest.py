"""Fixtures: GPU kernelspecs in a temp dir, CPU agents, a standalone broker, real kernels.

Every process is started here and stopped here: agents and the broker in their own process
groups, kernels through their KernelManager.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from pathlib import Path

import pytest
import requests
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from traitlets.config import Config

from jupyter_elastic_gpu.broker.client import BrokerClient
from jupyter_elastic_gpu.protocol.client import query_inventory
from jupyter_elastic_gpu.provisioner.kernelspecs import ElasticGPUKernelSpecs
from tests.broker.conftest import start, stop, wait_http
from tests.conftest import AgentProcess, free_port

AGENT_TOKEN = "prov-agent-token"
LEASE_SECRET = "prov-lease-secret"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="session")
def kernels_dir(tmp_path_factory) -> Path:
    """GPU kernelspecs 0.25/0.5/1/2 installed into a temp prefix (not the user's)."""
    prefix = tmp_path_factory.mktemp("prefix")
    app = ElasticGPUKernelSpecs()
    app.install([0.25, 0.5, 1, 2], prefix=str(prefix))
    return prefix / "share" / "jupyter" / "kernels"


@pytest.fixture(scope="session")
def direct_agent():
    a = AgentProcess("--session-grace", "2")
    yield a
    a.stop()


class BrokerProcess:
    def __init__(self, tmp: Path, **config):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/services/elastic-gpu/api/"
        cfg = tmp / "broker_config.py"
        settings = {
            "static_tokens": TOKENS,
            "agent_token": AGENT_TOKEN,
            "lease_secret": LEASE_SECRET,
            "bind_url": f"http://127.0.0.1:{self.port}",
            "db_url": f"sqlite:///{tmp / 'broker.sqlite'}",
            **config,
        }
        cfg.write_text("".join(f"c.ElasticGPUBroker.{k} = {v!r}\n" for k, v in settings.items()))
        self.log = tmp / "broker.log"
        self.proc = start(
            [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)], self.log, tmp
        )
        wait_http(self.api + "openapi.json", self.proc, self.log)

    def client(self, token="tok-alice") -> BrokerClient:
        return BrokerClient(self.api, token)

    def stop(self):
        stop(self.proc)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A standalone broker (alice may hold 0.5 GPU, bob 1) and a CPU agent registered with it."""
    tmp = tmp_path_factory.mktemp("broker")
    b = BrokerProcess(
        tmp, user_limits={"alice": 0.5}, default_limit=1.0, fractions=[0.25, 0.5, 1.0, 2.0]
    )
    secret_file = tmp / "lease_secret"
    secret_file.write_text(LEASE_SECRET)
    agent = None
    try:
        agent = AgentProcess(
            "--broker-url", b.api, "--agent-token", AGENT_TOKEN, "--lease-secret-file", str(secret_file),
            "--agent-id", "cpu-agent", "--session-grace", "2",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not any(a["alive"] for a in b.client().pool()["agents"]):
            assert time.monotonic() < deadline, "the agent did not register with the broker"
            time.sleep(0.1)
        b.agent = agent
        yield b
    finally:
        if agent is not None:
            agent.stop()
        b.stop()


class Kernel:
    """A real GPU kernel started by jupyter_client, and helpers to run cells in it."""

    def __init__(self, kernels_dir: Path, name: str, config: Config | None = None, env=None):
        ksm = KernelSpecManager(kernel_dirs=[str(kernels_dir)])
        self.km = KernelManager(
            kernel_name=name, kernel_spec_manager=ksm, config=config or Config()
        )
        self.km.start_kernel(env={**os.environ, **(env or {})})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def id(self) -> str:
        return self.km.kernel_id

    def submit(self, code: str) -> str:
        return self.kc.execute(code)

    def collect(self, msg_id: str, timeout: float = 60, until_idle=True) -> list[dict]:
        """iopub messages of one request, up to its idle status (or ``timeout``)."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            out.append(msg)
            if (
                until_idle
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return out
        if until_idle and self.km.provisioner is not None and self.km.provisioner.pid:
            # Where is it stuck? The kernel prints its threads' stacks on SIGUSR1.
            os.kill(self.km.provisioner.pid, signal.SIGUSR1)
            time.sleep(0.5)
        raise TimeoutError(
            f"cell {msg_id} did not finish in {timeout}s; got {[m['msg_type'] for m in out]}"
        )

    def wait_for_output(self, msg_id: str, text: str, timeout: float = 60) -> None:
        """Read the cell's iopub messages until its output contains ``text``."""
        seen, deadline = "", time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cell {msg_id} never printed {text!r}; printed {seen!r}")
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                seen += text_of([msg])

    def reply(self, msg_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def run(self, code: str, timeout: float = 60) -> tuple[dict, str]:
        """Run a cell to its end: (execute_reply content, its text output)."""
        msg_id = self.submit(code)
        msgs = self.collect(msg_id, timeout)
        return self.reply(msg_id, timeout), text_of(msgs)

    def stop(self):
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


def text_of(msgs) -> str:
    parts = []
    for m in msgs:
        c = m["content"]
        if m["msg_type"] == "stream":
            parts.append(c["text"])
        elif m["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            parts.append(c["data"].get("text/plain", "") + "\n")
        elif m["msg_type"] == "error":
            parts.append(f"{c['ename']}: {c['evalue']}\n")
    return "".join(parts)


@pytest.fixture
def make_kernel(kernels_dir):
    started = []

    def make(name="python3-gpu-0.5", **kw) -> Kernel:
        k = Kernel(kernels_dir, name, **kw)
        started.append(k)
        return k

    yield make
    for k in started:
        k.stop()


def agent_session(address: str, session: str) -> dict | None:
    for s in query_inventory(address)["sessions"]:
        if s["session"] == session:
            return s
    return None


def wait_until(pred, timeout=20.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def leases_of(broker: BrokerProcess, session: str, token="tok-alice") -> list[dict]:
    r = requests.get(broker.api + "leases", headers={"Authorization": f"token {token}"}, timeout=10)
    r.raise_for_status()
    return [x for x in r.json()["leases"] if x["session"] == session and x["state"] != "ended"]
