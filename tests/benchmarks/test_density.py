"""The density benchmark's harness works: CI-sized, CPU agent, real broker and clients.

No timing assertions (the machine is shared): cells ran, waits were recorded, nothing leaked
at the broker, and every process the benchmark started is gone when it returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


density = load("density_bench", "benchmarks/density.py")


def processes_in_groups(groups) -> list[str]:
    """Live processes of these process groups (an agent's session workers are in its group)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        if int(fields[2]) in groups and fields[0] != "Z":
            found.append(f"{pid}: {stat[:80]}")
    return found


def test_the_committed_trace_is_what_its_generator_makes(tmp_path):
    trace = json.loads((ROOT / "benchmarks/traces/notebook-sessions.json").read_text())
    args = trace["generator"].split()[1:]
    out = tmp_path / "t.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/traces/make_trace.py"), *args, "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert json.loads(out.read_text()) == trace
    assert 0.05 <= trace["gpu_duty"] <= 0.2  # the interactive regime the benchmark is about
    assert len(density.load_trace(out)) == len(trace["sessions"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "not a trace"),
        ('{"sessions": [{"id": "a", "memory_share": 0.1, "cells": [{"think": -1}]}]}', "bad cell"),
        ('{"sessions": [{"id": "a", "memory_share": 2, "cells": []}]}', "memory_share"),
    ],
)
def test_a_bad_trace_is_refused_naming_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        density.load_trace(path)


def test_users_replay_sessions_through_broker_and_agent_and_leave_nothing(tmp_path):
    out = tmp_path / "density.json"
    result = density.main(
        [
            "--users", "2",
            "--modes", "elastic,timeslice,exclusive",
            "--window", "200",
            "--scale", "0.05",
            "--fraction", "0.5",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["mode"], r["users"]): r for r in result["rows"]}
    assert set(rows) == {("elastic", 2), ("timeslice", 2), ("exclusive", 1), ("exclusive", 2)}
    assert rows[("exclusive", 2)]["from_trace"] and rows[("exclusive", 2)]["users_without_gpu"] == 1
    for key in (("elastic", 2), ("timeslice", 2), ("exclusive", 1)):
        row = rows[key]
        assert row["user_exit_codes"] == [0] * key[1], key
        assert row["cells_gpu"] > 0 and row["cells_failed"] == 0, row
        assert row["wait_ms"]["p95"] is not None and row["wait_ms"]["p95"] >= 0
        # trace seconds stretch the queued part only (both rounded: to 1 ms and 0.1 ms)
        assert row["trace_wait_s"]["p95"] >= row["wait_ms"]["p95"] / 1000 - 1e-3
        assert row["gpu_busy"] and all(0 < b <= 1 for b in row["gpu_busy"].values())
        assert {"count", "bytes", "seconds"} <= set(row["swaps"]["out"])
        assert row["leases_leaked"] == 0
    assert rows[("elastic", 2)]["fraction"] == 0.5
    assert "elastic" in result["headline"]
    assert len(result["process_groups"]) >= 2 + 2 + 2 + 1 + 1  # broker, agents, users
    assert processes_in_groups(set(result["process_groups"])) == []


def test_gpu_busy_is_the_union_of_work_intervals_within_the_window():
    cells = [
        {"agent": "g", "t_ready": 0, "t_end": 2},
        {"agent": "g", "t_ready": 1, "t_end": 3},  # overlaps the first: counted once
        {"agent": "g", "t_ready": 12, "t_end": 15},  # after the window: nothing
        {"agent": "h", "t_ready": 5, "t_end": 6},
    ]
    assert density.busy_fraction(cells, 0, 10) == {"g": 0.3, "h": 0.1}


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert [density.pct(values, q) for q in (0.5, 0.95, 0.99)] == [50, 95, 99]
    assert density.pct([], 0.95) is None
