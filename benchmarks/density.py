"""Users per GPU: replay notebook sessions through the real broker and agents (issue #17).

    python benchmarks/density.py [--device cpu|cuda] [--gpus 1] [--users 2,4,8,16]
        [--modes elastic,timeslice,exclusive] [--trace benchmarks/traces/notebook-sessions.json]
        [--scale 0.1] [--window 600] [--fraction 0.25] [--out density.json] [--plot density.png]

Starts a broker (static tokens, a SQLite file in a temp dir) and ``--gpus`` agents registered
with it (a CPU agent emulates one GPU; on a GPU node one agent serves them all), then for each
N in ``--users`` runs N notebook users, each a real ``jupyter-elastic-gpu run`` client process
(``benchmarks/density_user.py``) replaying one trace session. Trace times are multiplied by
``--scale`` so a run fits in minutes; only the first ``--window`` trace seconds are replayed.

Modes, all on the same trace:

- ``elastic``: this product. ``--fraction`` slices leased per cell through the broker and given
  back ``--linger`` after it; idle sessions' memory stays on the agent (swapped out under
  pressure).
- ``timeslice``: everyone on one GPU all the time (no leases, no caps, no swap): an agent
  without a broker, every user attached from the first cell to the end.
- ``exclusive``: one whole GPU per user for the whole session (KubeSpawner GPU profiles):
  fraction-1 leases held from the first cell to the end. Measured at N = GPUs; with more users
  than GPUs the rest wait for a whole session to end, reported from the trace, not run.

Per run: wait from a GPU cell's start to its lease (p50/p95/p99, wall seconds, and in trace
seconds: the broker queue's share divided by ``--scale``, the fixed costs (HTTP, hello) not),
time to the session's state being usable (swap-in), slowdown of the cell's work against the
same work alone, queue length (sampled), GPU busy fraction, swaps (agent counters), failed
cells, and leases left at the broker after every user exited (must be 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from jupyter_elastic_gpu.agent.local import free_port, wait_for_port
from jupyter_elastic_gpu.broker.client import BrokerClient
from jupyter_elastic_gpu.protocol.client import query_inventory

HERE = Path(__file__).resolve().parent
USER = HERE / "density_user.py"
TRACE = HERE / "traces" / "notebook-sessions.json"
AGENT_TOKEN = "density-agent"
ROOT_TOKEN = "density-root"
P95_TARGET_S = 1.0


def pct(values, q):
    """Nearest-rank percentile; None for no values."""
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values) - 1e-9) - 1))]


def load_trace(path) -> list[dict]:
    trace = json.loads(Path(path).read_text())
    sessions = trace.get("sessions") if isinstance(trace, dict) else None
    if not sessions or not all(isinstance(s.get("cells"), list) for s in sessions):
        raise SystemExit(f"{path}: not a trace (a JSON object with sessions[].cells[])")
    for s in sessions:
        for c in s["cells"]:
            if not (c.get("think", -1) >= 0 and c.get("duration", -1) >= 0 and "gpu" in c):
                raise SystemExit(f"{path}: session {s.get('id')}: bad cell {c!r}")
        if not 0 < s.get("memory_share", 0) < 1:
            raise SystemExit(f"{path}: session {s.get('id')}: memory_share must be in (0, 1)")
    return sessions


def spawn(cmd, log: Path, env=None, *, talk=False) -> subprocess.Popen:
    """A process in its own group, output to ``log``; ``talk``: stdin/stdout are pipes."""
    out = open(log, "ab")
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": out, "text": True}
    return subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        **(pipes if talk else {"stdout": out, "stderr": subprocess.STDOUT}),
    )


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: an agent's session workers too
    except ProcessLookupError:
        pass
    proc.wait()


class Stack:
    """The broker and its agents, the time-slicing agent, and every process started: ``close()``
    stops them all."""

    def __init__(
        self, tmp: Path, *, users: int, gpus: int, device: str, memory_gib: float, swap_policy: str
    ):
        self.tmp, self.device, self.memory_gib = tmp, device, memory_gib
        self.swap_policy = swap_policy
        self.procs: list[subprocess.Popen] = []
        self.groups: list[int] = []  # every process group started, users' too (for checks)
        self.tokens = {f"density-user-{i}": f"user{i}" for i in range(users)}
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/services/elastic-gpu/api/"
        cfg = tmp / "broker_config.py"
        cfg.write_text(
            f"c.ElasticGPUBroker.static_tokens = {self.tokens | {ROOT_TOKEN: 'root'}!r}\n"
            "c.ElasticGPUBroker.admin_users = {'root'}\n"
            f"c.ElasticGPUBroker.agent_token = {AGENT_TOKEN!r}\n"
            "c.ElasticGPUBroker.lease_secret = 'density-lease-secret'\n"
            f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{port}'\n"
            f"c.ElasticGPUBroker.db_url = 'sqlite:///{tmp / 'broker.sqlite'}'\n"
            "c.ElasticGPUBroker.default_limit = 1.0\n"
            "c.ElasticGPUBroker.queue_timeout = 0\n"
            "c.ElasticGPUBroker.log_level = 'WARN'\n"
        )
        (tmp / "lease_secret").write_text("density-lease-secret")
        self.broker = self._start(
            [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)], "broker"
        )
        self._wait_api()
        self.root = BrokerClient(self.api, ROOT_TOKEN, timeout=30)
        self.agents = [self._agent(f"gpu{i}", broker=True) for i in range(gpus)]
        deadline = time.monotonic() + 120
        while sum(a["alive"] for a in self.root.pool()["agents"]) < gpus:
            if time.monotonic() > deadline:
                raise TimeoutError("agents did not register with the broker")
            time.sleep(0.2)
        self._timeslice = None

    def _start(self, cmd, name, env=None) -> subprocess.Popen:
        proc = spawn(cmd, self.tmp / f"{name}.log", env=env)
        self.procs.append(proc)
        self.groups.append(proc.pid)
        return proc

    def _wait_api(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise RuntimeError(f"broker exited:\n{(self.tmp / 'broker.log').read_text()}")
            try:
                requests.get(self.api + "openapi.json", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise TimeoutError("the broker did not answer")

    def _agent(self, agent_id: str, *, broker: bool) -> str:
        port = free_port()
        address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "jupyter_elastic_gpu", "agent", "--device", self.device]
        cmd += ["--listen", address, "--agent-id", agent_id, "--spare-workers", "2"]
        cmd += ["--cpu-memory-gib", str(self.memory_gib), "--session-grace", "10"]
        env = dict(os.environ)
        if self.device == "cuda":
            env.pop("CUDA_VISIBLE_DEVICES", None)
        if broker:
            cmd += ["--broker-url", self.api, "--agent-token", AGENT_TOKEN]
            cmd += ["--lease-secret-file", str(self.tmp / "lease_secret")]
            cmd += ["--swap-policy", self.swap_policy]
        else:  # time-slicing: no leases, no caps beyond the GPU, nobody swapped out
            cmd += ["--swap-policy", "never"]
        proc = self._start(cmd, f"agent-{agent_id}", env)
        wait_for_port(port, proc)
        return address

    def timeslice_agent(self) -> str:
        if self._timeslice is None:
            self._timeslice = self._agent("timeslice", broker=False)
        return self._timeslice

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def swap_totals(addresses) -> dict:
    total = {d: {"count": 0, "bytes": 0, "seconds": 0.0} for d in ("out", "in")}
    for address in addresses:
        agent = query_inventory(address)["agent"]
        for d, t in agent.get("swap_totals", {}).items():
            for k in t:
                total[d][k] += t[k]
    return total


def calibrate(stack: Stack, spec: dict) -> float:
    """Seconds per chunk of work alone on an idle agent, through the broker like any user."""
    path = stack.tmp / "calibrate.json"
    path.write_text(json.dumps(spec | {"calibrate": True}))
    token, _ = next(iter(stack.tokens.items()))
    env = dict(os.environ, JUPYTERHUB_API_TOKEN=token, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "jupyter_elastic_gpu", "run", "--gpu", "1", "--broker"]
    out = subprocess.run(
        [*cmd, stack.api, "--", "python", str(USER), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode:
        raise RuntimeError(f"calibration failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["chunk_s"]


class QueueSampler(threading.Thread):
    """Queued and granted leases at the broker, every ``interval`` seconds."""

    def __init__(self, client: BrokerClient, interval=0.25):
        super().__init__(daemon=True)
        self.client, self.interval = client, interval
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.interval):
            try:
                leases = self.client.leases(all=True)
            except Exception:
                continue
            queued = sum(x["state"] == "queued" for x in leases)
            self.samples.append((time.time(), queued, len(leases) - queued))


def busy_fraction(records, start, end) -> dict:
    """Per GPU: the share of the window in which at least one cell did GPU work."""
    per = {}
    for r in records:
        if "t_ready" in r and "error" not in r:
            per.setdefault(r["agent"], []).append((max(r["t_ready"], start), min(r["t_end"], end)))
    out = {}
    for agent, spans in per.items():
        busy, reach = 0.0, start
        for a, b in sorted(spans):
            if b > max(a, reach):  # spans past the window's end are empty
                busy += b - max(a, reach)
                reach = b
        out[agent] = busy / (end - start)
    return out


def run_users(stack: Stack, mode: str, n: int, sessions, opts, chunk_s) -> dict:
    """N users replay sessions 0..N-1 (wrapping) in one mode; their processes end with it."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{n}-", dir=stack.tmp))
    fraction = {"elastic": opts.fraction, "exclusive": 1.0, "timeslice": 1.0}[mode]
    gpu_bytes = int(opts.memory_gib * (1 << 30)) if opts.device == "cpu" else None
    if gpu_bytes is None:
        gpu_bytes = query_inventory(stack.agents[0])["gpus"][0]["memory_total"]
    procs, outs = [], []
    tokens = list(stack.tokens)
    for i in range(n):
        s = sessions[i % len(sessions)]
        spec = {
            "cells": s["cells"],
            "scale": opts.scale,
            "window": opts.window * opts.scale,
            "linger": opts.linger * opts.scale,
            "hold": "cell" if mode == "elastic" else "session",
            "memory_bytes": int(s["memory_share"] * gpu_bytes),
            "matmul": opts.matmul,
            "chunk_ops": opts.chunk_ops,
            "chunk_s": chunk_s,
        }
        path = run_dir / f"user{i}.json"
        path.write_text(json.dumps(spec))
        outs.append(run_dir / f"user{i}.jsonl")
        env = dict(os.environ, JUPYTERHUB_API_TOKEN=tokens[i], CUDA_VISIBLE_DEVICES="")
        env["ELASTIC_GPU_SESSION"] = f"{mode}-{n}-user{i}"
        where = (
            ["--agent", stack.timeslice_agent()] if mode == "timeslice" else ["--broker", stack.api]
        )
        cmd = [sys.executable, "-m", "jupyter_elastic_gpu", "run", "--gpu", f"{fraction:g}"]
        cmd += [*where, "--", "python", str(USER), str(path), str(outs[-1])]
        procs.append(spawn(cmd, run_dir / f"user{i}.log", env=env, talk=True))
        stack.groups.append(procs[-1].pid)
    addresses = [stack.timeslice_agent()] if mode == "timeslice" else stack.agents
    sampler = QueueSampler(stack.root)
    try:
        for i, p in enumerate(procs):  # every notebook open and its model loaded
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(
                    f"user {i} did not start:\n{(run_dir / f'user{i}.log').read_text()[-3000:]}"
                )
        swaps0 = swap_totals(addresses)
        start = time.time() + 0.5
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        sampler.start()
        deadline = start + opts.window * opts.scale + 120
        stuck = []
        for i, p in enumerate(procs):
            try:
                p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                stuck.append(i)  # stopped below; its cell in flight counts as failed
        end = time.time()
    finally:
        sampler.done.set()
        for p in procs:
            stop(p)
    exits = [p.returncode for p in procs]
    swaps1 = swap_totals(addresses)
    records = [json.loads(line) for o in outs if o.exists() for line in o.read_text().splitlines()]
    # Every user has exited: anything the broker still holds for them leaked.
    time.sleep(0.5)
    leaked = [x["id"] for x in stack.root.leases(all=True)]
    slices = [s for a in stack.root.pool()["agents"] for g in a["gpus"] for s in g["slices"]]
    # The cell a stuck user was in never ended.
    records += [{"gpu": True, "error": "the user's cell did not end by the deadline"}] * len(stuck)
    return summarize(mode, n, opts, records, sampler.samples, start, end) | {
        "user_exit_codes": exits,
        "users_stuck": len(stuck),
        "swaps": {d: {k: swaps1[d][k] - swaps0[d][k] for k in swaps1[d]} for d in ("out", "in")},
        "leases_leaked": len(leaked) + (len(slices) if not leaked else 0),
    }


def summarize(mode, n, opts, records, samples, start, end) -> dict:
    gpu = [r for r in records if r["gpu"]]
    ok = [r for r in gpu if "error" not in r]
    wait = [r["t_lease"] - r["t0"] for r in ok]
    # In trace seconds: the time queued stretches back by 1/scale, fixed costs do not.
    trace_wait = [
        (r["t_lease"] - r["t0"]) + (r["acquire_s"] / opts.scale - r["acquire_s"]) * r["queued"]
        for r in ok
    ]
    # The wait's parts: at the broker (request, queue), then the agent's hello (which makes
    # room first: idle sessions on the GPU are swapped out before a new slice is admitted).
    broker = [r["acquire_s"] for r in ok]
    hello = [r["t_lease"] - r["t0"] - r["acquire_s"] for r in ok]
    ready = [r["t_ready"] - r["t_lease"] for r in ok]
    slow = [
        (r["t_end"] - r["t_ready"]) / (r["chunks"] * opts.chunk_s) for r in ok if r["chunks"] >= 3
    ]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    # Over the replayed window: users still thinking at its end add nothing.
    busy = busy_fraction(ok, start, min(end, start + opts.window * opts.scale))
    return {
        "mode": mode,
        "users": n,
        "gpus": 1 if mode == "timeslice" else opts.gpus,
        "users_per_gpu": n / (1 if mode == "timeslice" else opts.gpus),
        "fraction": {"elastic": opts.fraction}.get(mode, 1.0),
        "seconds": round(end - start, 1),
        "cells_gpu": len(gpu),
        "cells_cpu": len(records) - len(gpu),
        "cells_failed": len(gpu) - len(ok),
        "errors": sorted({r["error"] for r in gpu if "error" in r})[:5],
        "queued_cells": sum(r["queued"] for r in ok),
        "wait_ms": {q: ms(pct(wait, v)) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "trace_wait_s": {
            q: None if pct(trace_wait, v) is None else round(pct(trace_wait, v), 3)
            for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        "broker_ms": {"p50": ms(pct(broker, 0.5)), "p95": ms(pct(broker, 0.95))},
        "hello_ms": {"p50": ms(pct(hello, 0.5)), "p95": ms(pct(hello, 0.95))},
        "ready_after_lease_ms": {"p50": ms(pct(ready, 0.5)), "p95": ms(pct(ready, 0.95))},
        "slowdown": {"p50": pct(slow, 0.5), "p95": pct(slow, 0.95)},
        "queue_len": {
            "max": max((q for _, q, _ in samples), default=0),
            "mean": round(sum(q for _, q, _ in samples) / len(samples), 2) if samples else 0,
        },
        "gpu_busy": {k: round(v, 3) for k, v in busy.items()},
    }


def exclusive_beyond(sessions, n, gpus, opts) -> dict:
    """N > GPUs whole-GPU users: the N - GPUs without one wait until a session ends. From the
    trace (no run): their first cell waits at least one whole session of someone else."""
    lengths = sorted(sum(c["think"] + c["duration"] for c in s["cells"]) for s in sessions)
    waiting = n - gpus
    return {
        "mode": "exclusive",
        "users": n,
        "gpus": gpus,
        "users_per_gpu": n / gpus,
        "from_trace": True,
        "users_without_gpu": waiting,
        "their_first_wait_s_at_least": round(min(lengths), 1),
        "trace_wait_s": {"p95": None},
    }


def limit_of(row: dict) -> str:
    """What makes the p95 wait, in words: the largest of its parts at their p95."""
    if row["cells_failed"]:
        return f"{row['cells_failed']} cells failed ({'; '.join(row['errors'])[:120]})"
    if row["trace_wait_s"]["p95"] is None:
        return "no GPU cells"
    queue = row["trace_wait_s"]["p95"] - (row["wait_ms"]["p95"] or 0) / 1000
    parts = {
        "queue: every slice busy (trace time)": queue if row["queued_cells"] else 0.0,
        "agent hello: swapping idle sessions out to make room": row["hello_ms"]["p95"] / 1000,
        "broker round trips": (row["broker_ms"]["p95"] or 0) / 1000
        if not row["queued_cells"]
        else 0,
        "swap-in of the session's own state": (row["ready_after_lease_ms"]["p95"] or 0) / 1000,
    }
    return max(parts, key=parts.get)


def table(rows) -> str:
    head = (
        "| mode | users/GPU | GPU cells | failed | wait p50 / p95 / p99 (trace s) | wall wait p95 "
        "| broker / hello p95 | swap-in p95 | slowdown p95 | queue max | GPU busy "
        "| swaps out/in | leaked |"
    )
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        if r.get("from_trace"):
            lines.append(
                f"| exclusive | {r['users_per_gpu']:g} | (from the trace) | | "
                f"{r['users_without_gpu']} users get no GPU for ≥ {r['their_first_wait_s_at_least']:g} s "
                "| | | | | | | | |"
            )
            continue
        t, s = r["trace_wait_s"], r["swaps"]
        busy = ", ".join(f"{v:.0%}" for v in r["gpu_busy"].values()) or "-"
        slow = r["slowdown"]["p95"]
        lines.append(
            f"| {r['mode']} | {r['users_per_gpu']:g} | {r['cells_gpu']} | {r['cells_failed']} | "
            f"{t['p50']} / {t['p95']} / {t['p99']} | {r['wait_ms']['p95']} ms | "
            f"{r.get('broker_ms', {}).get('p95', '-')} / {r.get('hello_ms', {}).get('p95', '-')} ms | "
            f"{r['ready_after_lease_ms']['p95']} ms | {'-' if slow is None else f'{slow:.2f}×'} | "
            f"{r['queue_len']['max']} | {busy} | {s['out']['count']}/{s['in']['count']} "
            f"({s['out']['bytes'] / 2**20:.0f} MiB, {s['out']['seconds'] + s['in']['seconds']:.2f} s) "
            f"| {r['leases_leaked']} |"
        )
    return "\n".join(lines)


def headline(rows) -> dict:
    """Largest users per GPU at p95 wait (trace seconds) <= 1 s, per mode, and its limit."""
    out = {}
    for mode in ("elastic", "timeslice", "exclusive"):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["users_per_gpu"])
        good = [
            r
            for r in mine
            if not r.get("from_trace")
            and r["trace_wait_s"]["p95"] is not None
            and r["trace_wait_s"]["p95"] <= P95_TARGET_S
            and not r["cells_failed"]
        ]
        if mine:
            worse = [r for r in mine if r not in good and not r.get("from_trace")]
            out[mode] = {
                "users_per_gpu": good[-1]["users_per_gpu"] if good else 0,
                "limit": limit_of(worse[0]) if worse else "not reached in this sweep",
            }
    return out


def plot(rows, path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("elastic", "o-"), ("timeslice", "s--"), ("exclusive", "^:")):
        mine = sorted(
            (r for r in rows if r["mode"] == mode and not r.get("from_trace")),
            key=lambda r: r["users_per_gpu"],
        )
        if not mine:
            continue
        x = [r["users_per_gpu"] for r in mine]
        ax1.plot(x, [r["trace_wait_s"]["p95"] for r in mine], style, label=mode)
        slow = [r["slowdown"]["p95"] for r in mine]
        if any(s is not None for s in slow):
            ax2.plot(x, [s or float("nan") for s in slow], style, label=mode)
    beyond = [r for r in rows if r.get("from_trace")]
    if beyond:
        ax1.annotate(
            "exclusive: >1 user/GPU\nwaits a whole session",
            xy=(1, P95_TARGET_S),
            xytext=(1.5, 4 * P95_TARGET_S),
            arrowprops={"arrowstyle": "->"},
            fontsize=8,
        )
    ax1.axhline(P95_TARGET_S, color="grey", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel("users per GPU")
    ax1.set_ylabel("p95 wait, cell start to GPU (trace s)")
    ax2.set_xlabel("users per GPU")
    ax2.set_ylabel("p95 slowdown of a cell's GPU work")
    ax1.legend()
    ax2.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--gpus", type=int, default=1, help="agents (CPU) / GPUs in the pool")
    ap.add_argument("--users", default="2,4,8", help="N to sweep, comma-separated")
    ap.add_argument("--modes", default="elastic,timeslice,exclusive")
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--scale", type=float, default=0.1, help="wall seconds per trace second")
    ap.add_argument("--window", type=float, default=600, help="trace seconds replayed")
    ap.add_argument("--fraction", type=float, default=0.25, help="slice per user, elastic mode")
    ap.add_argument(
        "--linger", type=float, default=0.5, help="trace seconds a lease outlives a cell"
    )
    ap.add_argument("--memory-gib", type=float, default=2.0, help="CPU agent's emulated GPU memory")
    ap.add_argument(
        "--swap-policy",
        choices=["pressure", "ahead", "always", "never"],
        default="pressure",
        help="the elastic agents' --swap-policy",
    )
    ap.add_argument("--matmul", type=int, default=None, help="matmul size (cpu 128, cuda 4096)")
    ap.add_argument("--chunk-ops", type=int, default=4, help="matmuls per sync")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--plot", default=None, help="write the PNG plot here (needs matplotlib)")
    opts = ap.parse_args(argv)
    opts.matmul = opts.matmul or (4096 if opts.device == "cuda" else 128)
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if bad := set(modes) - {"elastic", "timeslice", "exclusive"}:
        ap.error(f"unknown modes: {', '.join(sorted(bad))}")
    try:
        sweep = sorted({int(n) for n in opts.users.split(",")})
    except ValueError:
        ap.error(f"--users must be integers, got {opts.users!r}")
    if not (sweep and sweep[0] >= 1 and opts.gpus >= 1 and 0 < opts.scale <= 10):
        ap.error("need users >= 1, gpus >= 1 and 0 < scale <= 10")
    sessions = load_trace(opts.trace)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # still stop everything
    tmp = Path(tempfile.mkdtemp(prefix="density-"))
    print(f"density: logs in {tmp}", flush=True)
    stack = Stack(
        tmp,
        users=max(sweep),
        gpus=opts.gpus,
        device=opts.device,
        memory_gib=opts.memory_gib,
        swap_policy=opts.swap_policy,
    )
    rows = []
    try:
        base = {"matmul": opts.matmul, "chunk_ops": opts.chunk_ops}
        opts.chunk_s = calibrate(stack, base)
        print(f"calibrated: {opts.chunk_s * 1000:.2f} ms per chunk of work alone", flush=True)
        for mode in modes:
            ns = [opts.gpus] if mode == "exclusive" else sweep
            for n in ns:
                row = run_users(stack, mode, n, sessions, opts, opts.chunk_s)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if mode == "exclusive":
                rows += [
                    exclusive_beyond(sessions, n, opts.gpus, opts) for n in sweep if n > opts.gpus
                ]
    finally:
        stack.close()
    result = {
        "device": opts.device,
        "gpus": opts.gpus,
        "scale": opts.scale,
        "window_trace_s": opts.window,
        "swap_policy": opts.swap_policy,
        "trace": str(opts.trace),
        "logs": str(tmp),
        "process_groups": stack.groups,
        "chunk_s": opts.chunk_s if hasattr(opts, "chunk_s") else None,
        "rows": rows,
        "headline": headline(rows),
    }
    print(table(rows))
    print("headline:", json.dumps(result["headline"]))
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    if opts.plot:
        title = f"{opts.device} agent, {opts.gpus} GPU(s), trace x{opts.scale:g}, {opts.fraction:g} slices"
        plot(rows, opts.plot, title)
    return result


if __name__ == "__main__":
    main()
