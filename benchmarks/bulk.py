"""Bulk transfer throughput through a real agent on loopback: uploads and fetches.

    python benchmarks/bulk.py [--device cpu] [--sizes 1,8,64,256] [--streams 0,1,2,4] [--tls DIR]

For each stream count (``ELASTIC_GPU_BULK_STREAMS`` of the client process; 0 sends
everything on the session's one connection) and tensor size in MiB, a fresh client process
attaches to one agent and times ``x.to("cuda")`` + ``synchronize`` (h2d) and ``y.cpu()``
(d2h), best of several repetitions, in GB/s (1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from jupyter_elastic_gpu.agent.local import LocalAgent

CLIENT = r"""
import json, sys, time, torch
from jupyter_elastic_gpu import remote
sizes, reps = [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
sess = remote.attach(sys.argv[1], fraction=1.0)
res = {}
for mib in sizes:
    n = mib << 20
    host = torch.randn(n // 4)
    gpu = host.to("cuda"); torch.cuda.synchronize()
    up, down = [], []
    for _ in range(reps):
        t = time.perf_counter(); y = host.to("cuda"); torch.cuda.synchronize()
        up.append(time.perf_counter() - t); del y
        t = time.perf_counter(); z = gpu.cpu(); down.append(time.perf_counter() - t)
    assert torch.equal(z, host)
    res[mib] = {"h2d": n / min(up) / 1e9, "d2h": n / min(down) / 1e9}
print("RESULT " + json.dumps(res))
"""


def run(address, sizes, reps, streams, tls_dir=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("ELASTIC_GPU_TLS_DIR", None)
    if streams is not None:
        env["ELASTIC_GPU_BULK_STREAMS"] = str(streams)
    if tls_dir:
        env["ELASTIC_GPU_TLS_DIR"] = tls_dir
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, address, sizes, str(reps)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stderr[-2000:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1,8,64,256", help="MiB")
    ap.add_argument("--streams", default="0,1,2,4", help="ELASTIC_GPU_BULK_STREAMS values")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tls", default=None, metavar="DIR", help="through a mutual-TLS agent")
    opts = ap.parse_args(argv)
    extra = ()
    if opts.tls:
        d = os.path.abspath(opts.tls)
        extra = ("--tls-cert", f"{d}/agent.crt", "--tls-key", f"{d}/agent.key",
                 "--tls-client-ca", f"{d}/ca.crt")  # fmt: skip
    agent = LocalAgent(*extra, device=opts.device, quiet=True)
    try:
        print(f"device {opts.device}, {os.cpu_count()} cores, GB/s (best of {opts.reps})")
        print("streams  MiB     h2d     d2h")
        for k in opts.streams.split(","):
            res = run(
                agent.address, opts.sizes, opts.reps, int(k), opts.tls and os.path.abspath(opts.tls)
            )
            for mib, r in res.items():
                print(f"{k:>7} {mib:>4} {r['h2d']:7.2f} {r['d2h']:7.2f}", flush=True)
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
