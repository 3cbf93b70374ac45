"""GPU kernels leasing through a standalone broker (static tokens) and a registered CPU agent.

alice may hold 0.5 GPU: two of her 0.5 kernels share the quota, the second one queues.
"""

from __future__ import annotations

import time

import pytest
from traitlets.config import Config

from .conftest import agent_session, leases_of, text_of, wait_until


@pytest.fixture
def alice_kernel(make_kernel, broker):
    def make(notebook, name="python3-gpu-0.5", **extra):
        config = Config({"ElasticGPUProvisioner": {"broker_url": broker.api, **extra}})
        return make_kernel(
            name,
            config=config,
            env={"JUPYTERHUB_API_TOKEN": "tok-alice", "JPY_SESSION_NAME": notebook},
        )

    return make


def hold_gpu(seconds: float) -> str:
    return f"import torch, time\nh = torch.ones(2, device='cuda')\nprint(h.sum().item())\ntime.sleep({seconds})"


def test_lease_absent_present_gone(alice_kernel, broker, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-alice")
    k = alice_kernel("lifecycle.ipynb")
    reply, out = k.run(
        "import torch\nx = torch.randn(64, 64)\nprint((x @ x).shape, torch.cuda.is_available())"
    )
    assert reply["status"] == "ok" and "True" in out, out
    assert leases_of(broker, k.id) == [], "a CPU-only cell must take no lease"

    msg_id = k.submit(hold_gpu(2))
    (lease,) = wait_until(lambda: leases_of(broker, k.id), what="a lease during the GPU cell")
    assert lease["state"] == "granted" and lease["fraction"] == 0.5
    assert lease["notebook"] == "lifecycle.ipynb" and lease["kernel_name"] == "python3-gpu-0.5"
    wait_until(
        lambda: (agent_session(broker.agent.address, k.id) or {}).get("attached"),
        what="attached on the agent",
    )
    k.collect(msg_id)
    assert k.reply(msg_id)["status"] == "ok"
    wait_until(
        lambda: leases_of(broker, k.id) == [], timeout=5, what="the lease given back after the cell"
    )
    assert agent_session(broker.agent.address, k.id)["attached"] is False


def test_same_user_second_kernel_queues_then_runs(alice_kernel, broker):
    first = alice_kernel("first.ipynb")
    second = alice_kernel("second.ipynb")
    held = first.submit(hold_gpu(4))
    wait_until(lambda: leases_of(broker, first.id), what="first kernel's lease")

    waiting = second.submit(
        "import torch\nprint('result', torch.full((3,), 2.0, device='cuda').sum().item())"
    )
    msgs = []
    while "Position 1" not in text_of(msgs):
        msgs += _some(second, waiting)
    shown = text_of(msgs)
    assert "your GPU quota is in use by first.ipynb (0.5 GPU)" in shown, shown
    (queued,) = leases_of(broker, second.id)
    assert queued["state"] == "queued" and queued["reason"] == "quota"

    first.collect(held)  # the first kernel's cell ends: its lease goes back, the second runs
    msgs += second.collect(waiting, timeout=30)
    assert second.reply(waiting)["status"] == "ok"
    shown = text_of(msgs)
    assert "Got a 0.5 GPU slice after" in shown and "result 6.0" in shown, shown


def _some(kernel, msg_id, wait=10.0):
    """The next iopub messages of one request (at least one, or fail after ``wait``)."""
    import queue

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            return [msg]
    raise TimeoutError("no output from the waiting cell")


def test_interrupt_queue_wait_then_next_cell_works(alice_kernel, broker):
    holder = alice_kernel("holder.ipynb")
    waiter = alice_kernel("waiter.ipynb")
    held = holder.submit(hold_gpu(60))
    wait_until(lambda: leases_of(broker, holder.id), what="holder's lease")

    waiting = waiter.submit("import torch\ny = torch.ones(2, device='cuda')")
    msgs = []
    while "Position 1" not in text_of(msgs):  # the cell shows its wait
        msgs += _some(waiter, waiting)
    assert leases_of(broker, waiter.id)[0]["state"] == "queued"
    waiter.km.interrupt_kernel()
    reply = waiter.reply(waiting, timeout=15)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    shown = text_of(msgs + waiter.collect(waiting))
    assert "Stopped waiting for a 0.5 GPU slice" in shown, shown
    assert leases_of(broker, waiter.id) == [], "an interrupted wait must leave the queue"

    holder.km.interrupt_kernel()  # its cell (a sleep) ends: the quota frees up
    assert holder.reply(held, timeout=15)["ename"] == "KeyboardInterrupt"
    holder.collect(held)
    wait_until(
        lambda: leases_of(broker, holder.id) == [], timeout=10, what="the holder's lease given back"
    )
    reply, out = waiter.run(
        "y = torch.ones(2, device='cuda')\nprint('ok', y.sum().item())", timeout=60
    )
    assert reply["status"] == "ok" and "ok 2.0" in out, out
    wait_until(
        lambda: leases_of(broker, waiter.id) == [], timeout=5, what="lease back after the cell"
    )


def test_killed_kernel_never_keeps_its_lease(alice_kernel, broker):
    k = alice_kernel("killed.ipynb")
    held = k.submit(hold_gpu(60))
    wait_until(lambda: leases_of(broker, k.id), what="a lease")
    # Killed while it holds the lease inside its GPU cell (killing it in the second its
    # session's worker starts trips an agent race: see the provisioner's report).
    wait_until(
        lambda: (agent_session(broker.agent.address, k.id) or {}).get("attached"), what="attached"
    )
    k.km.restart_kernel(now=True)  # SIGKILL: no atexit, no release from the kernel itself
    assert leases_of(broker, k.id) == [], "the provisioner must end a killed kernel's lease"
    assert agent_session(broker.agent.address, k.id) is None, "and free its agent session"
    del held
    k.kc.wait_for_ready(timeout=60)
    reply, out = k.run("import torch\nprint(torch.ones(5, device='cuda').sum().item())")
    assert reply["status"] == "ok" and "5.0" in out, out


def test_above_limit_fraction_gets_a_clear_error(alice_kernel, broker):
    k = alice_kernel("big.ipynb", name="python3-gpu-1")
    reply, out = k.run("import torch\ntorch.ones(1, device='cuda')")
    assert reply["status"] == "error"
    assert "no GPU slice" in out and "limit" in out, out
    reply, out = k.run("print('still alive')")
    assert "still alive" in out
