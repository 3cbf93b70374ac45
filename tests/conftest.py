"""Shared fixtures: a real agent process on loopback, and this process attached to it.

``ELASTIC_GPU_TEST_DEVICE=cuda`` runs the agent on a real GPU (the test process itself keeps
CUDA hidden, as a kernel on a CPU node would); tests marked ``gpu`` skip otherwise.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from jupyter_elastic_gpu.agent.local import LocalAgent, free_port, wait_for_port  # noqa: F401

AGENT_DEVICE = os.environ.get("ELASTIC_GPU_TEST_DEVICE", "cpu")

# Tests press Ctrl-C (SIGINT) as a user does. A shell script that starts a job in the
# background (`cmd &`, nohup) starts it with SIGINT ignored, Python then leaves it ignored,
# and so would every process the tests start: give them what a kernel has.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class AgentProcess(LocalAgent):
    """The agent the tests use: on the device the test run asks for (cpu unless told)."""

    def __init__(self, *extra, device=AGENT_DEVICE, env=None):
        super().__init__(*extra, device=device, env=env)


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


def pytest_terminal_summary(terminalreporter):
    lifecycle = sys.modules.get("tests.test_lifecycle")
    if lifecycle is not None and lifecycle.STOP_TIMES:
        terminalreporter.section("lifecycle: measured stop times")
        for what, seconds in lifecycle.STOP_TIMES.items():
            terminalreporter.write_line(f"{what}: {seconds:.2f} s")
