"""Remote GPU vs native PyTorch on the same GPU, in one run.

    python benchmarks/remote_vs_native.py [--device cuda] [--out results.json] [--quick] [--tls DIR]

Starts an agent on loopback, then runs each workload twice in fresh processes: natively
(the process sees the GPU) and remotely (CUDA hidden from the process, ``device="cuda"``
attached to the agent, as a kernel on a CPU node would run). Reports the throughput ratio
remote/native and the client's overhead per forwarded op. With ``--tls DIR`` (a directory
made by ``jupyter-elastic-gpu tls-certs``) a second agent runs with mutual TLS and each
workload also runs through it: the ratio TLS/plaintext is the price of encryption.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from jupyter_elastic_gpu.agent.local import LocalAgent

WORKLOADS = r"""
import json, sys, time, torch
import torch.nn as nn, torch.nn.functional as F
mode, name, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if mode.startswith("remote"):
    from jupyter_elastic_gpu import remote
    sess = remote.attach(sys.argv[4], fraction=1.0)
dev = "cuda" if (mode.startswith("remote") or torch.cuda.is_available()) else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
res = {}

def timed(fn, n, warm=3):
    for _ in range(warm): fn()
    sync(); t = time.perf_counter()
    for _ in range(n): fn()
    t_issue = time.perf_counter() - t
    sync()
    return time.perf_counter() - t, t_issue

if name == "small_ops":
    x = torch.randn(256, device=dev)
    n = 2000 if quick else 20000
    def step():
        global x
        x = x * 1.0001 + 0.0001
    total, issue = timed(step, n)
    res = {"ops": 2 * n, "seconds": total, "issue_seconds": issue, "us_per_op": total / (2 * n) * 1e6,
           "client_us_per_op": issue / (2 * n) * 1e6, "unit": "ops/s", "throughput": 2 * n / total}
elif name == "transformer_step":
    d, L, T, B, V = (256, 2, 128, 8, 1000) if quick else (768, 6, 512, 16, 8192)
    class Block(nn.Module):
        def __init__(s):
            super().__init__(); s.ln1 = nn.LayerNorm(d); s.ln2 = nn.LayerNorm(d)
            s.qkv = nn.Linear(d, 3 * d); s.proj = nn.Linear(d, d)
            s.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        def forward(s, x):
            b, t, _ = x.shape
            q, k, v = s.qkv(s.ln1(x)).split(d, -1)
            q, k, v = (z.view(b, t, 12 if d % 12 == 0 else 8, -1).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + s.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + s.mlp(s.ln2(x))
    class GPT(nn.Module):
        def __init__(s):
            super().__init__(); s.emb = nn.Embedding(V, d); s.blocks = nn.Sequential(*[Block() for _ in range(L)])
            s.ln = nn.LayerNorm(d); s.head = nn.Linear(d, V)
        def forward(s, idx): return s.head(s.ln(s.blocks(s.emb(idx))))
    torch.manual_seed(0)
    m = GPT().to(dev); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    idx = torch.randint(0, V, (B, T), device=dev)
    def step():
        with torch.autocast(dev if dev == "cuda" else "cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(idx).flatten(0, 1).float(), idx.flatten())
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    n = 3 if quick else 20
    total, issue = timed(step, n)
    res = {"steps": n, "seconds": total, "unit": "steps/s", "throughput": n / total,
           "tokens_per_s": n * B * T / total}
elif name == "matmul":
    N = 1024 if quick else 8192
    a = torch.randn(N, N, device=dev, dtype=torch.bfloat16); b = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    n = 5 if quick else 50
    def step():
        global c
        c = a @ b
    total, issue = timed(step, n)
    res = {"matmuls": n, "seconds": total, "unit": "TFLOP/s", "throughput": 2 * N ** 3 * n / total / 1e12}
elif name in ("h2d", "d2h"):  # bulk transfers: where the wire (and TLS) shows
    nbytes = (16 if quick else 256) << 20
    host = torch.randn(nbytes // 4)
    gpu = host.to(dev)
    n = 3 if quick else 10
    step = (lambda: host.to(dev)) if name == "h2d" else (lambda: gpu.cpu())
    total, issue = timed(step, n, warm=2)
    res = {"bytes": nbytes * n, "seconds": total, "unit": "GB/s", "throughput": nbytes * n / total / 1e9}
if mode.startswith("remote"):
    res["ops_sent"] = sess.stats["ops"]; res["batches_sent"] = sess.stats["batches"]
    res["bytes_up"] = sess.stats["bytes_up"]; res["bytes_down"] = sess.stats["bytes_down"]
print("RESULT " + json.dumps(res))
"""


def run(mode, name, quick, address, device, tls_dir=None, script=WORKLOADS):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("ELASTIC_GPU_TLS_DIR", None)
    if mode.startswith("remote"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # the client is a CPU node
    if mode == "remote_tls":
        env["ELASTIC_GPU_TLS_DIR"] = tls_dir
    p = subprocess.run(
        [sys.executable, "-c", script, mode, name, "1" if quick else "0", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test on a CPU agent)")
    ap.add_argument("--workloads", default="small_ops,transformer_step,matmul,h2d,d2h")
    ap.add_argument("--tls", default=None, metavar="DIR", help="also measure through a TLS agent")
    opts = ap.parse_args(argv)
    agent = LocalAgent(device=opts.device, quiet=True)
    address = agent.address
    tls_agent = None
    if opts.tls:
        d = os.path.abspath(opts.tls)
        tls_agent = LocalAgent(
            "--tls-cert", f"{d}/agent.crt", "--tls-key", f"{d}/agent.key",
            "--tls-client-ca", f"{d}/ca.crt", device=opts.device, quiet=True,
        )  # fmt: skip
    try:
        results = {}
        for name in opts.workloads.split(","):
            native = run("native", name, opts.quick, address, opts.device)
            remote = run("remote", name, opts.quick, address, opts.device)
            results[name] = {
                "native": native,
                "remote": remote,
                "ratio_remote_over_native": remote["throughput"] / native["throughput"],
            }
            extra = ""
            if tls_agent is not None:
                tls = run("remote_tls", name, opts.quick, tls_agent.address, opts.device, d)
                results[name]["remote_tls"] = tls
                results[name]["ratio_tls_over_plain"] = tls["throughput"] / remote["throughput"]
                extra += f"  TLS {tls['throughput']:.4g}: TLS/plain {results[name]['ratio_tls_over_plain']:.3f}"
            if name == "small_ops":
                extra += (
                    f"  client {remote['client_us_per_op']:.1f} us/op issued, "
                    f"{remote['us_per_op']:.1f} us/op end to end (native {native['us_per_op']:.1f})"
                )
            print(
                f"{name:18s} native {native['throughput']:.4g} {native['unit']}, remote "
                f"{remote['throughput']:.4g}: ratio {results[name]['ratio_remote_over_native']:.3f}{extra}",
                flush=True,
            )
    finally:
        agent.stop()
        if tls_agent is not None:
            tls_agent.stop()
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
