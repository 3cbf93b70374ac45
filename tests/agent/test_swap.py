"""Idle sessions are swapped to host memory when another session needs the GPU, and come
back transparently: same values, same aliasing of views, usable for in-place ops."""

from __future__ import annotations

import time

import torch

from jupyter_elastic_gpu.protocol.client import query_inventory
from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession


def session_info(address, sid):
    return next(s for s in query_inventory(address)["sessions"] if s["session"] == sid)


def test_idle_session_swaps_out_under_pressure_and_back_in(make_agent, own_session):
    agent = make_agent("--cpu-memory-gib", "0.25", device="cpu")  # a 256 MiB "GPU"
    with own_session(agent.address, 0.5) as a:
        swap_round_trip(agent, a)


def swap_round_trip(agent, a):
    base = torch.arange(24.0).reshape(4, 6).cuda()
    big = torch.ones(20 << 20, device="cuda")  # 80 MiB resident
    row, col = base[1], base[:, 2]  # views of one storage
    assert row.sum().item() == 51.0
    a.release()  # idle: holds no lease, still holds memory
    assert session_info(agent.address, a.session_id)["swapped"] is False

    b = RemoteSession(DirectLease(agent.address, 1.0))  # wants the whole 256 MiB
    b.attach()
    deadline = time.monotonic() + 10
    while not session_info(agent.address, a.session_id)["swapped"] and time.monotonic() < deadline:
        time.sleep(0.1)
    info = session_info(agent.address, a.session_id)
    assert info["swapped"] and info["memory"] == 0
    swaps = query_inventory(agent.address)["agent"]["swaps"]
    assert swaps[-1]["direction"] == "out" and swaps[-1]["bytes"] >= 80 << 20
    b.close()

    # Next use: everything is back, views still alias their base.
    row.add_(100)
    assert base[1].tolist() == [106.0, 107.0, 108.0, 109.0, 110.0, 111.0]
    assert col.tolist() == [2.0, 108.0, 14.0, 20.0]
    assert big.sum().item() == float(20 << 20)
    assert session_info(agent.address, a.session_id)["swapped"] is False
    assert query_inventory(agent.address)["agent"]["swaps"][-1]["direction"] == "in"


def test_policy_never_keeps_idle_sessions_resident(make_agent):
    agent = make_agent("--cpu-memory-gib", "0.25", "--swap-policy", "never", device="cpu")
    a = RemoteSession(DirectLease(agent.address, 0.5))
    a.attach()
    a.release()
    b = RemoteSession(DirectLease(agent.address, 1.0))
    b.attach()
    assert session_info(agent.address, a.session_id)["swapped"] is False
    a.close()
    b.close()
