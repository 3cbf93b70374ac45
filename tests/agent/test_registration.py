"""An agent whose broker cannot be reached says so in one line per try, and keeps trying."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from jupyter_elastic_gpu.agent.registration import BrokerRegistration
from jupyter_elastic_gpu.broker.client import BrokerClient, BrokerError


class Agent:
    """What the registration reads of an agent: its id, device and inventory."""

    agent_id, device = "gpu-node-1", "cpu"

    def inventory(self):
        return {"gpus": [], "sessions": []}


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (bound, then released: refused, not filtered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port


def test_an_unreachable_broker_is_one_short_line_per_try_with_the_chain_at_debug(
    closed_port, caplog
):
    url = f"http://127.0.0.1:{closed_port}/services/elastic-gpu/api/"
    reg = BrokerRegistration(Agent(), url, "agent-token", advertise="127.0.0.1:7070")
    reg.interval = 0.1
    with caplog.at_level(logging.DEBUG, logger="jupyter_elastic_gpu.agent"):
        reg.start()
        time.sleep(0.6)
        reg.halt()
        time.sleep(0.3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(warnings) >= 3, warnings
    for line in warnings:
        assert line == (
            f"registering with the broker failed: cannot reach the broker at {url}: "
            "connection refused; next try in 0.1s"
        ), line
    # the whole urllib3 chain is there for whoever turns debug on
    assert debug and all("Max retries exceeded" in d and "Connection refused" in d for d in debug)
    assert not any(r.exc_info for r in caplog.records)
    # halted: no further tries
    n = len(warnings)
    time.sleep(0.3)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == n


def test_a_broker_that_does_not_answer_is_a_timeout_in_few_words():
    with socket.socket() as server:  # listens, never accepts or answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api/"
        with pytest.raises(BrokerError) as e:
            BrokerClient(url, "t", timeout=0.3).pool()
    assert str(e.value) == f"cannot reach the broker at {url}: timed out"
    assert e.value.status is None and "Read timed out" in e.value.detail


def test_an_unknown_broker_host_is_named():
    with pytest.raises(BrokerError) as e:
        BrokerClient("http://no-such-host.invalid/api/", "t", timeout=2).pool()
    assert str(e.value).startswith("cannot reach the broker at http://no-such-host.invalid/api/: ")
    assert "HTTPConnectionPool" not in str(e.value)
