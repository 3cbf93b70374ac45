"""Shared fixtures: a real agent process on loopback, and this process attached to it.

``ELASTIC_GPU_TEST_DEVICE=cuda`` runs the agent on a real GPU (the test process itself keeps
CUDA hidden, as a kernel on a CPU node would); tests marked ``gpu`` skip otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

AGENT_DEVICE = os.environ.get("ELASTIC_GPU_TEST_DEVICE", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class AgentProcess:
    def __init__(self, *extra, device=AGENT_DEVICE, env=None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        agent_env = dict(os.environ, **(env or {}))
        agent_env.pop("CUDA_VISIBLE_DEVICES", None) if device == "cuda" else None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_elastic_gpu",
                "agent",
                "--device",
                device,
                "--listen",
                self.address,
                *extra,
            ],
            env=agent_env,
            start_new_session=True,
        )
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="session")
def agent():
    a = AgentProcess("--session-grace", "2")
    yield a
    a.stop()


@pytest.fixture
def make_agent():
    started = []

    def make(*extra, **kw):
        a = AgentProcess(*extra, **kw)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture(scope="session")
def remote(agent):
    """This test process attached to the session agent: "cuda" now means the remote GPU."""
    from jupyter_elastic_gpu import remote as r

    sess = r.attach(agent.address, fraction=1.0)
    yield sess
    r.detach()


@pytest.fixture
def own_session():
    """``with own_session(address, fraction) as sess:`` makes "cuda" mean that agent for the
    block, then gives the process back to the shared ``remote`` session."""
    import contextlib

    from jupyter_elastic_gpu.remote import backend, cuda_facade
    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    @contextlib.contextmanager
    def use(address, fraction=1.0):
        prev = backend._session
        sess = RemoteSession(DirectLease(address, fraction), fraction=fraction)
        backend._session = sess
        cuda_facade.install(sess)
        try:
            yield sess
        finally:
            sess.close()
            backend._session = prev
            if prev is not None:
                cuda_facade.install(prev)

    return use


def pytest_collection_modifyitems(config, items):
    if AGENT_DEVICE == "cuda":
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA agent: set ELASTIC_GPU_TEST_DEVICE=cuda on a GPU machine"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
