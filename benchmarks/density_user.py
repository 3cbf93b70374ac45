"""One simulated notebook user of ``benchmarks/density.py``: replays a trace session.

Runs under ``jupyter-elastic-gpu run --gpu F (--broker URL | --agent ADDRESS) -- python
density_user.py SPEC.json OUT.jsonl``, so ``device="cuda"`` is the remote slice and the lease
is taken lazily at a cell's first GPU op, as in a GPU kernel. ``SPEC`` says what to replay:

- ``cells``: ``[{"think", "duration", "gpu"}]`` in trace seconds, times ``scale``;
- ``hold``: ``"cell"`` gives the lease back ``linger`` seconds after each cell, as the kernel
  hooks do (elastic); ``"session"`` keeps it from the first GPU cell to the end (a whole GPU
  per user, or time-slicing without leases);
- ``memory_bytes`` stays resident between cells (model and optimizer state), so an idle
  session's tensors are what the agent swaps out under pressure;
- a GPU cell does ``round(duration / chunk_s)`` chunks (at least one) of ``chunk_ops``
  matmuls of ``matmul``² floats and a sync: fixed work, so contention shows as slowdown
  (a cell still running at the end of the ``window`` is cut there).

Protocol with the harness: after the warm-up (the notebook was opened and its model loaded
before the measured window) the program prints ``ready`` and reads the common start time
(unix seconds) from stdin. One JSON line per cell goes to ``OUT``.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from jupyter_elastic_gpu import remote


def timed_lease(session) -> dict:
    """Wrap the lease provider so each attach says how long the broker queued it."""
    lp = session.lease_provider
    info = {"queued": False, "acquire_s": 0.0, "agent": getattr(lp, "address", None)}
    acquire = lp.acquire

    def on_wait(lease):
        info["queued"] = True

    def timed(sess):
        info["queued"] = False
        t = time.time()
        lease = acquire(sess)
        info["acquire_s"] = time.time() - t
        held = getattr(lp, "lease", None)  # a BrokerLease keeps the broker's answer
        if held:
            info["agent"] = held["agent"]["id"]
        return lease

    if hasattr(lp, "on_wait"):
        lp.on_wait = on_wait
    lp.acquire = timed
    return info


def work(a: torch.Tensor, chunks: int, ops: int) -> None:
    for _ in range(chunks):
        for _ in range(ops):
            a @ a
        torch.cuda.synchronize()  # bounds the queued work, as a cell printing a loss would


def calibrate(spec: dict) -> None:
    """Seconds per chunk alone on the agent: the unit of every cell's work."""
    a = torch.randn(spec["matmul"], spec["matmul"], device="cuda")
    work(a, 3, spec["chunk_ops"])  # warm-up (first kernels, allocator)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < spec.get("seconds", 1.0):
        work(a, 1, spec["chunk_ops"])
        n += 1
    print(json.dumps({"chunk_s": (time.perf_counter() - t) / n}), flush=True)
    remote.detach()


def replay(spec: dict, out) -> None:
    session = remote.current_session()
    lease = timed_lease(session)
    # Warm-up, outside the measured window: state loaded, lease given back.
    x = torch.ones(max(1, spec["memory_bytes"] // 4), device="cuda")
    a = torch.randn(spec["matmul"], spec["matmul"], device="cuda")
    work(a, 1, spec["chunk_ops"])
    session.release()
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    scale, linger = spec["scale"], spec["linger"]
    end = start + spec["window"]
    t = start
    for i, cell in enumerate(spec["cells"]):
        # Think time; an elastic kernel gives its lease back after `linger` of it.
        think_end = t + cell["think"] * scale
        if spec["hold"] == "cell" and session.attached:
            time.sleep(max(0.0, min(think_end, time.time() + linger) - time.time()))
            if time.time() < think_end:
                session.release()
        if think_end >= end:
            break  # the window ends while this user thinks
        time.sleep(max(0.0, think_end - time.time()))
        nominal = cell["duration"] * scale
        rec = {"cell": i, "gpu": cell["gpu"], "nominal": nominal, "t0": time.time()}
        if not cell["gpu"]:
            time.sleep(nominal)  # pandas, plots: no GPU op, no lease
        else:
            # A cell still running at the window's end is cut there: runs stay bounded.
            left = max(spec["chunk_s"], end - rec["t0"])
            chunks = max(1, round(min(nominal, left) / spec["chunk_s"]))
            rec["chunks"] = chunks
            try:
                was_attached = session.attached
                session.attach()  # what the cell's first GPU op does: lease, then hello
                rec["t_lease"] = time.time()
                rec["queued"] = lease["queued"] and not was_attached
                rec["acquire_s"] = 0.0 if was_attached else lease["acquire_s"]
                rec["agent"] = lease["agent"]
                x[-1].item()  # the session's state is back (swapped in) and usable
                rec["t_ready"] = time.time()
                work(a, chunks, spec["chunk_ops"])
            except Exception as e:  # the cell fails, the notebook goes on
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
        rec["t_end"] = time.time()
        out.write(json.dumps(rec) + "\n")
        out.flush()
        t = rec["t_end"]
    remote.detach()


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("calibrate"):
        calibrate(spec)
        return
    with open(sys.argv[2], "w") as out:
        replay(spec, out)


if __name__ == "__main__":
    main()
