"""GPU kernel start-up vs plain ipykernel, and lease attach latency in a cell.

    python benchmarks/kernel_startup.py [--reps 5] [--device cpu|cuda] [--out results.json]

Starts, on loopback, a standalone broker (static tokens) and an agent registered with it,
plus a second agent used directly (single-user mode). Then, with real kernels started
through jupyter_client:

- start-up: ``start_kernel()`` until the kernel answers ``kernel_info`` (ready), and until
  a first cell ``import torch`` has run, for the plain ``python3`` kernel and the GPU
  kernelspec ``python3-gpu-0.5`` (the GPU kernel loads torch + the remote client in the
  background while it already answers).
- attach: inside a cell, the time from cell start to the first GPU op done
  (``torch.ones(1, device="cuda").sum().item()``), cold (first GPU cell of a new kernel:
  the agent starts the session's worker) and warm (a later cell, after the previous one
  gave its lease back), directly and through the broker; plus one GPU round trip with the
  lease held, for comparison. ``--think S`` waits S seconds before the cold GPU cell, as a
  user running a few cells first would (0: the GPU cell right after ``import torch``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from traitlets.config import Config

from jupyter_elastic_gpu.agent.local import free_port, wait_for_port

TOKEN = "bench-token"
AGENT_TOKEN = "bench-agent-token"
SECRET = "bench-lease-secret"

ATTACH_CELL = (
    "import time, torch\n"
    "_t0 = time.perf_counter()\n"
    "torch.ones(1, device='cuda').sum().item()\n"
    "_t1 = time.perf_counter()\n"
    "torch.ones(1, device='cuda').sum().item()\n"
    "print('EGPU', _t1 - _t0, time.perf_counter() - _t1)"
)


class Procs:
    """Processes this benchmark started; all stopped at the end, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, log: Path):
        p = subprocess.Popen(
            cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def start_kernel(ksm, name, config=None, env=None):
    t0 = time.perf_counter()
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm, config=config or Config())
    km.start_kernel(env={**os.environ, **(env or {})})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc, time.perf_counter() - t0


def run(kc, code):
    out = []
    reply = kc.execute_interactive(
        code,
        timeout=120,
        output_hook=lambda m: (
            out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None
        ),
    )
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}")
    return "".join(out)


def stop_kernel(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def startup(ksm, name, config=None, env=None):
    km, kc, ready = start_kernel(ksm, name, config, env)
    t0 = time.perf_counter()
    run(kc, "import torch")
    first = ready + time.perf_counter() - t0
    stop_kernel(km, kc)
    return ready, first


def attach_latencies(ksm, config, env, warm_reps, think=0.0):
    """(cold attach, [warm attaches], [round trips with the lease held])."""
    km, kc, _ = start_kernel(ksm, "python3-gpu-0.5", config, env)
    try:
        run(kc, "import torch")  # start-up out of the way: only the lease is timed
        time.sleep(think)  # a user's first cells before the first GPU one
        _, cold, trip = run(kc, ATTACH_CELL).split()
        warm, trips = [], [float(trip)]
        for _ in range(warm_reps):
            time.sleep(1.0)  # > linger: the previous cell's lease has been given back
            _, w, trip = run(kc, ATTACH_CELL).split()
            warm.append(float(w))
            trips.append(float(trip))
        return float(cold), warm, trips
    finally:
        stop_kernel(km, kc)


def summary(xs):
    xs = list(xs)
    return {"median_ms": round(1000 * statistics.median(xs), 1), "min_ms": round(1000 * min(xs), 1),
            "max_ms": round(1000 * max(xs), 1), "n": len(xs)}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="seconds between the kernel's first cell (import torch) and its first GPU cell",
    )
    opts = ap.parse_args()

    from jupyter_elastic_gpu.provisioner.kernelspecs import ElasticGPUKernelSpecs

    tmp = Path(tempfile.mkdtemp(prefix="egpu-bench-"))
    ElasticGPUKernelSpecs(log_level="ERROR").install([0.5], prefix=str(tmp))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "share/jupyter/kernels")])
    ksm.ensure_native_kernel = True
    procs = Procs()
    try:
        bport = free_port()
        api = f"http://127.0.0.1:{bport}/services/elastic-gpu/api/"
        cfg = tmp / "broker_config.py"
        cfg.write_text(
            f"c.ElasticGPUBroker.static_tokens = {{{TOKEN!r}: 'bench'}}\n"
            f"c.ElasticGPUBroker.agent_token = {AGENT_TOKEN!r}\nc.ElasticGPUBroker.lease_secret = {SECRET!r}\n"
            f"c.ElasticGPUBroker.bind_url = 'http://127.0.0.1:{bport}'\n"
            f"c.ElasticGPUBroker.db_url = 'sqlite:///{tmp / 'broker.sqlite'}'\n"
        )
        b = procs.start(
            [sys.executable, "-m", "jupyter_elastic_gpu.broker", "-f", str(cfg)], tmp / "broker.log"
        )
        wait_for_port(bport, b)
        (tmp / "secret").write_text(SECRET)
        agents = {}
        for mode, extra in (("direct", []), ("broker", ["--broker-url", api, "--agent-token", AGENT_TOKEN,
                                                          "--lease-secret-file", str(tmp / "secret")])):  # fmt: skip
            port = free_port()
            a = procs.start([sys.executable, "-m", "jupyter_elastic_gpu", "agent", "--device", opts.device,
                             "--listen", f"127.0.0.1:{port}", *extra], tmp / f"agent-{mode}.log")  # fmt: skip
            wait_for_port(port, a)
            agents[mode] = f"127.0.0.1:{port}"
        time.sleep(1.0)  # registration
        setups = {
            "direct": (Config({"ElasticGPUProvisioner": {"agent": agents["direct"]}}), {}),
            "broker": (
                Config({"ElasticGPUProvisioner": {"broker_url": api}}),
                {"JUPYTERHUB_API_TOKEN": TOKEN},
            ),
        }

        res = {"reps": opts.reps, "device": opts.device, "cpus": os.cpu_count()}
        plain, gpu = [], []
        for _ in range(opts.reps):
            plain.append(startup(ksm, "python3"))
            gpu.append(startup(ksm, "python3-gpu-0.5", *setups["direct"]))
        res["startup"] = {
            "plain_ready": summary(r for r, _ in plain),
            "gpu_ready": summary(r for r, _ in gpu),
            "plain_first_import_torch": summary(f for _, f in plain),
            "gpu_first_import_torch": summary(f for _, f in gpu),
        }
        for mode, (config, env) in setups.items():
            colds, warms, trips = [], [], []
            for _ in range(max(1, opts.reps // 2)):
                cold, warm, trip = attach_latencies(ksm, config, env, opts.reps, opts.think)
                colds.append(cold)
                warms += warm
                trips += trip
            res[f"attach_{mode}"] = {
                "cold": summary(colds),
                "warm": summary(warms),
                "held_round_trip": summary(trips),
            }
        print(json.dumps(res, indent=1))
        if opts.out:
            Path(opts.out).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
