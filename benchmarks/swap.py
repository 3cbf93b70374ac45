"""Idle swap-out/in on a real GPU, and slices sharing one GPU.

    python benchmarks/swap.py [--device cuda] [--sizes 1,10] [--out swap.json]

1. For each size S GiB: session A fills S GiB and goes idle (gives its lease back); session B
   attaches with the whole GPU, so the agent swaps A to pinned host memory; B leaves and A's
   next op brings its tensors back. Swap-out (D2H) and swap-in (H2D) times come from the
   agent's own counters, as GB/s and as a ratio of the PCIe bandwidth measured by the same
   script on the same GPU (pinned cudaMemcpy).
2. Two 0.5 sessions compute at the same time; a third 0.5 session attaching while the
   first is idle forces that idle one out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

from jupyter_elastic_gpu.agent.local import LocalAgent
from jupyter_elastic_gpu.protocol.client import query_inventory

CLIENT = textwrap.dedent("""
    import sys, time, torch
    from jupyter_elastic_gpu import remote
    sess = remote.attach(sys.argv[1], fraction=float(sys.argv[2]))
    gib = float(sys.argv[3])
    x = torch.ones(int(gib * (1 << 30)) // 4, device="cuda") if gib else torch.ones(1, device="cuda")
    a = torch.randn(4096, 4096, device="cuda")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "release":
            sess.release()
        elif cmd == "work":
            t = time.perf_counter()
            for _ in range(int(sys.argv[4])):
                b = a @ a
            torch.cuda.synchronize()
            print("worked", time.perf_counter() - t, flush=True)
            continue
        elif cmd == "touch":
            t = time.perf_counter()
            ok = x[-1].item() == 1.0
            print("touched", ok, time.perf_counter() - t, flush=True)
            continue
        elif cmd == "quit":
            break
        print("done", flush=True)
""")


class Client:
    def __init__(self, address, fraction, gib, reps=50):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        self.p = subprocess.Popen(
            [sys.executable, "-c", CLIENT, address, str(fraction), str(gib), str(reps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.p.stdout.readline().strip() == "ready"

    def do(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def quit(self):
        try:
            self.do("quit")
        except (BrokenPipeError, OSError):
            pass
        self.p.wait(60)


def pcie_bandwidth():
    import torch

    if not torch.cuda.is_available():
        return None
    n = 1 << 30
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, fn in (
        ("h2d", lambda: d.copy_(h, non_blocking=True)),
        ("d2h", lambda: h.copy_(d, non_blocking=True)),
    ):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        out[name + "_GBps"] = 5 * n / (time.perf_counter() - t) / 1e9
    return out


def wait_swaps(address, count, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        swaps = query_inventory(address)["agent"]["swaps"]
        if len(swaps) >= count:
            return swaps
        time.sleep(0.05)
    raise TimeoutError("no swap happened")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1,10")
    ap.add_argument("--cpu-memory-gib", default="4")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--swap-arena-gib", default=None, help="the agent's pinned swap arena (default: its own)"
    )
    opts = ap.parse_args(argv)
    arena = ["--swap-arena-gib", opts.swap_arena_gib] if opts.swap_arena_gib is not None else []
    agent = LocalAgent("--cpu-memory-gib", opts.cpu_memory_gib, *arena, device=opts.device)
    address = agent.address
    results = {"pcie": pcie_bandwidth(), "swap": [], "concurrent": None}
    print("PCIe (pinned, same GPU):", results["pcie"], flush=True)
    try:
        for gib in map(float, opts.sizes.split(",")):
            n0 = len(query_inventory(address)["agent"]["swaps"])
            a = Client(address, 0.5, gib)
            a.do("release")
            b = Client(address, 1.0, 0)  # wants the whole GPU: A must leave
            out = wait_swaps(address, n0 + 1)[-1]
            b.quit()
            touched = a.do("touch")
            inn = wait_swaps(address, n0 + 2)[-1]
            a.quit()
            row = {
                "gib": gib,
                "out_s": out["seconds"],
                "in_s": inn["seconds"],
                "out_GBps": out["bytes"] / out["seconds"] / 1e9,
                "in_GBps": inn["bytes"] / inn["seconds"] / 1e9,
                "first_op_after_swap_s": float(touched[2]),
                "values_ok": touched[1] == "True",
                "into_arena": out.get("arena"),  # else fresh pinned memory (cudaHostAlloc)
            }
            if results["pcie"]:
                row["out_vs_pcie_d2h"] = row["out_GBps"] / results["pcie"]["d2h_GBps"]
                row["in_vs_pcie_h2d"] = row["in_GBps"] / results["pcie"]["h2d_GBps"]
            results["swap"].append(row)
            print(json.dumps(row), flush=True)
        # Two 0.5 slices at once, then a third forces the idle one out.
        total = query_inventory(address)["gpus"][0]["memory_total"] / (1 << 30)
        reps = 200 if opts.device == "cuda" else 1
        # Attached sessions count their whole slice: with B attached, C's 0.5 does not fit
        # beside idle A's resident memory, however small, so A must leave.
        a, b = Client(address, 0.5, 0.05 * total, reps), Client(address, 0.5, 0.05 * total, reps)
        a.p.stdin.write("work\n"), b.p.stdin.write("work\n")
        a.p.stdin.flush(), b.p.stdin.flush()
        ta, tb = float(a.p.stdout.readline().split()[1]), float(b.p.stdout.readline().split()[1])
        a.do("release")
        n0 = len(query_inventory(address)["agent"]["swaps"])
        c = Client(address, 0.5, 0.02 * total)
        swapped = [s for s in query_inventory(address)["sessions"] if s["swapped"]]
        results["concurrent"] = {
            "a_work_s": ta,
            "b_work_s": tb,
            "third_forced_swaps": len(query_inventory(address)["agent"]["swaps"]) - n0,
            "swapped_sessions": len(swapped),
        }
        print("concurrent:", results["concurrent"], flush=True)
        for cl in (a, b, c):
            cl.quit()
    finally:
        agent.stop()
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
