"""Slices: memory caps, isolation between sessions, reclaiming sessions of vanished clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jupyter_elastic_gpu.agent.server import spare_warm_up
from jupyter_elastic_gpu.protocol.client import query_inventory
from tests.conftest import AGENT_DEVICE


def run_client(address, code, fraction=0.25, timeout=120):
    """Run ``code`` in a fresh client process attached to ``address``; return the completed process."""
    prog = textwrap.dedent(f"""
        import torch
        from jupyter_elastic_gpu import remote
        remote.attach({address!r}, fraction={fraction})
    """) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout
    )


# A 0.25 slice of a real GPU: 0.6 of the cap fits, a second 0.6 is over it and must be a
# CUDA OOM naming the slice, after which the session still computes.
GPU_CAP_PROBE = """
props = torch.cuda.get_device_properties(0)
cap, total = props.total_memory, props.gpu_total_memory
print("cap/total", round(cap / total, 3))
x = torch.empty(int(cap * 0.6) // 4, device="cuda")  # fits in the slice
try:
    y = torch.empty(int(cap * 0.6) // 4, device="cuda")  # 1.2x the slice
    torch.cuda.synchronize()
except torch.cuda.OutOfMemoryError as e:
    print("OOM:", e)
print("alive", (x[:10] * 0 + 1).sum().item())
"""


def assert_cap_probe_passed(p):
    assert p.returncode == 0, p.stderr
    assert "cap/total 0.25" in p.stdout and "OOM:" in p.stdout and "slice" in p.stdout
    assert "alive 10.0" in p.stdout


@pytest.mark.skipif(AGENT_DEVICE != "cpu", reason="the CPU-mode cap; see the gpu test below")
def test_allocation_over_the_cap_is_a_cuda_oom_naming_the_slice(make_agent):
    agent = make_agent("--cpu-memory-gib", "0.5", device="cpu")  # 0.25 slice = 128 MiB
    p = run_client(
        agent.address,
        """
        x = torch.ones(8 << 20, device="cuda")  # 32 MiB fits
        try:
            y = torch.empty(40 << 20, device="cuda")  # +160 MiB does not
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as e:
            print("OOM:", e)
        z = x * 2  # the session is still usable, its tensors intact
        print("sum", z.sum().item())
    """,
    )
    assert p.returncode == 0, p.stderr
    assert "OOM:" in p.stdout and "0.25 of CPU" in p.stdout and "0.12 GiB cap" in p.stdout
    assert f"sum {2.0 * (8 << 20)}" in p.stdout


@pytest.mark.gpu
def test_gpu_slice_cap_is_enforced_by_the_cuda_allocator(make_agent):
    agent = make_agent(device="cuda")
    assert_cap_probe_passed(run_client(agent.address, GPU_CAP_PROBE))


@pytest.mark.gpu
def test_a_sticky_cuda_error_resets_only_that_session(make_agent):
    agent = make_agent(device="cuda")
    p = run_client(
        agent.address,
        """
        x = torch.arange(3.0, device="cuda")
        try:
            x[torch.tensor([0, 7], device="cuda")].cpu()  # device-side assert: context is dead
        except Exception as e:
            print("ERR", e)
        try:
            x.sum().item()  # that tensor was lost with the context
        except Exception as e:
            print("LOST", e)
        print("fresh", torch.ones(4, device="cuda").sum().item())  # a new context works
    """,
    )
    assert p.returncode == 0, p.stderr
    assert "ERR" in p.stdout and "context is lost" in p.stdout
    assert "LOST" in p.stdout and "fresh 4.0" in p.stdout


def test_a_crashed_worker_leaves_other_sessions_intact(make_agent):
    agent = make_agent()
    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    victim = RemoteSession(DirectLease(agent.address, 0.5))
    victim.attach()
    inv = query_inventory(agent.address)
    assert [s["session"] for s in inv["sessions"]] == [victim.session_id]
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time, torch
        from jupyter_elastic_gpu import remote
        remote.attach({agent.address!r}, fraction=0.5)
        x = torch.arange(10.0, device="cuda")
        print("ready", flush=True)
        sys.stdin.readline()
        print("after", (x * 2).sum().item(), flush=True)
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "ready"
        pid = next(
            s["pid"]
            for s in query_inventory(agent.address)["sessions"]
            if s["session"] == victim.session_id
        )
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-session (as on a segfault)
        with pytest.raises(ConnectionError, match="lost the connection"):
            victim.synchronize()
        out, _ = other.communicate("\n", timeout=60)
        assert "after 90.0" in out
    finally:
        other.kill()
        victim.close()


def test_sessions_of_vanished_clients_are_freed(make_agent):
    agent = make_agent("--session-grace", "1")
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time, torch
        from jupyter_elastic_gpu import remote
        remote.attach({agent.address!r})
        x = torch.ones(1000, device="cuda"); x.sum().item()
        print("attached", flush=True)
        time.sleep(600)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout.readline().strip() == "attached"
    assert len(query_inventory(agent.address)["sessions"]) == 1
    client.kill()  # kill -9: no goodbye
    client.wait()
    deadline = time.monotonic() + 20
    while query_inventory(agent.address)["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert query_inventory(agent.address)["sessions"] == []


def test_agent_shutdown_tells_attached_clients(make_agent):
    agent = make_agent()
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, torch
        from jupyter_elastic_gpu import remote
        remote.attach({agent.address!r})
        x = torch.ones(3, device="cuda"); x.sum().item()
        print("attached", flush=True)
        sys.stdin.readline()
        try:
            x.sum().item()
        except Exception as e:
            print("ERR", type(e).__name__, e, flush=True)
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "attached"
        agent.stop()
        out, _ = client.communicate("\n", timeout=60)
        assert "ERR" in out and "shutting down" in out
    finally:
        client.kill()


def test_inventory_describes_the_cpu_stand_in(agent):
    inv = query_inventory(agent.address)
    assert inv["agent"]["device"] in ("cpu", "cuda")
    gpu = inv["gpus"][0]
    assert {
        "index",
        "uuid",
        "name",
        "memory_total",
        "memory_used",
        "utilization",
        "mig",
    } <= gpu.keys()
    if inv["agent"]["device"] == "cpu":
        assert "CPU" in gpu["name"] and gpu["memory_total"] > 0


def test_the_session_secret_closes_a_session_beside_its_connection(make_agent):
    import socket as _socket

    from jupyter_elastic_gpu.protocol.client import parse_address
    from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame
    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    agent = make_agent()
    s = RemoteSession(DirectLease(agent.address, 0.5), secret="owner-secret")
    s.attach()

    def close(secret):
        with _socket.create_connection(parse_address(agent.address), timeout=30) as c:
            send_frame(c, {"op": "close", "session": s.session_id, "secret": secret})
            return recv_frame(c)[0]

    assert "wrong secret" in close("guess")["error"]["message"]
    assert close("owner-secret").get("ok")
    deadline = time.monotonic() + 20
    while query_inventory(agent.address)["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert query_inventory(agent.address)["sessions"] == []


def _wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def _ready_spares(agent):
    spares = query_inventory(agent.address)["agent"]["spare_workers"]
    return [s["pid"] for s in spares if s["ready"]]


def test_a_new_session_takes_a_spare_worker_and_another_starts(make_agent):
    agent = make_agent("--spare-workers", "1")

    [spare] = _wait(lambda: _ready_spares(agent))
    prog = textwrap.dedent(f"""
        import sys, torch
        from jupyter_elastic_gpu import remote
        remote.attach({agent.address!r}, fraction=0.25)
        print(torch.ones(3, device="cuda").sum().item(), flush=True)
        sys.stdin.readline()
    """)
    client = subprocess.Popen(
        [sys.executable, "-c", prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout.readline().strip() == "3.0"
        # The session runs in the spare, whose torch import was done before the client came...
        assert [s["pid"] for s in query_inventory(agent.address)["sessions"]] == [spare]
        [replacement] = _wait(lambda: _ready_spares(agent))
        assert replacement != spare  # ...and a fresh spare took its place
    finally:
        client.stdin.close()
        client.wait(30)


def test_a_dead_spare_is_replaced(make_agent):
    agent = make_agent("--spare-workers", "1")

    [spare] = _wait(lambda: _ready_spares(agent))
    os.kill(spare, signal.SIGKILL)
    [replacement] = _wait(lambda: [p for p in _ready_spares(agent) if p != spare])
    assert replacement != spare
    out = run_client(agent.address, "print(torch.ones(2, device='cuda').sum().item())")
    assert out.returncode == 0 and out.stdout.strip() == "2.0", out.stderr


@pytest.mark.parametrize(
    "device, mps, open_mode, gpus, warm",
    [
        ("cpu", False, True, 1, None),  # nothing to ready on a CPU agent
        ("cuda", True, True, 1, None),  # MPS: a slice's compute share precedes its context
        ("cuda", False, False, 1, "cuda:0"),  # one GPU: every session runs on it
        ("cuda", False, True, 8, "cuda:0"),  # open mode: every session's GPUs start at 0
        ("cuda", False, False, 8, "cuda"),  # placed per session: no context on a guessed GPU
    ],
)
def test_a_spare_readies_only_what_its_session_is_sure_to_use(device, mps, open_mode, gpus, warm):
    assert spare_warm_up(device, mps, open_mode=open_mode, gpu_count=gpus) == warm


@pytest.mark.gpu
def test_a_spare_holding_a_cuda_context_serves_its_slice_under_the_cap(make_agent, tmp_path):
    # No MPS daemon in sight (its pipe directory is empty): the spare readies GPU 0 ahead.
    agent = make_agent(
        "--spare-workers", "1", device="cuda", env={"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    )
    [spare] = _wait(lambda: _ready_spares(agent))
    assert query_inventory(agent.address)["agent"]["spare_workers"][0]["warm"] == "cuda:0"
    p = run_client(
        agent.address,
        textwrap.dedent(f"""
            from jupyter_elastic_gpu.protocol.client import query_inventory
            print("fresh", torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated(),
                  torch.cuda.memory_reserved())
            print("worker", [s["pid"] for s in query_inventory({agent.address!r})["sessions"]])
        """)
        + GPU_CAP_PROBE,
    )
    assert_cap_probe_passed(p)
    # The warm-up's own allocations are not the session's: its statistics start at zero.
    assert "fresh 0 0 0" in p.stdout
    assert f"worker [{spare}]" in p.stdout  # the session ran in the readied spare


def test_without_spares_each_session_starts_its_own_worker(make_agent):
    agent = make_agent("--spare-workers", "0")
    assert query_inventory(agent.address)["agent"]["spare_workers"] == []
    out = run_client(agent.address, "print(torch.ones(2, device='cuda').sum().item())")
    assert out.returncode == 0 and out.stdout.strip() == "2.0", out.stderr
    assert query_inventory(agent.address)["agent"]["spare_workers"] == []
