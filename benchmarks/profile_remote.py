"""Where a remote training step's time goes: py-spy samples of the client and its session's
worker while a real model trains through the agent (issue #15's "profile first").

    python benchmarks/profile_remote.py --device cuda [--workload gpt2_train] [--seconds 10]
    python benchmarks/profile_remote.py --device cpu --quick        # a smoke run, tiny model

Starts an agent on loopback, a client process that trains the model on ``device="cuda"``
(remote: CUDA hidden), lets it warm up, then records both processes with ``py-spy record``
(all threads, raw stacks) for ``--seconds`` and prints, per process, the share of samples by
leaf frame and by function anywhere on the stack (inclusive), plus the client's steps/s and
ops per step. Needs ``py-spy`` on PATH (``pip install py-spy``; not a project dependency).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from jupyter_elastic_gpu.agent.local import LocalAgent
from jupyter_elastic_gpu.protocol.client import query_inventory

CLIENT = textwrap.dedent("""
    import json, sys, time, torch
    import torch.nn.functional as F
    name, quick, address = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    if name == "gpt2_train":
        import transformers
    else:
        import torchvision
    from jupyter_elastic_gpu import remote
    sess = remote.attach(address, fraction=1.0)
    torch.manual_seed(0)
    if name == "gpt2_train":
        kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg = (transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                       n_positions=64, **kw) if quick else transformers.GPT2Config(**kw))
        B, T = (2, 32) if quick else (8, 512)
        model = transformers.GPT2LMHeadModel(cfg).cuda()
        batch = lambda: [torch.randint(0, cfg.vocab_size, (B, T))]
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = (torchvision.models.resnet18() if quick else torchvision.models.resnet50()).cuda()
        B, S = (2, 64) if quick else (64, 224)
        batch = lambda: [torch.randn(B, 3, S, S), torch.randint(0, 1000, (B,))]
        loss_fn = lambda x, y: F.cross_entropy(model(x).float(), y)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    def step():
        args = [t.to("cuda") for t in batch()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(*args)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    for _ in range(3):
        step()
    print("warm", flush=True)
    n, ops0, t0 = 0, sess.stats["ops"], time.perf_counter()
    while time.perf_counter() - t0 < float(sys.argv[4]):
        step()
        n += 1
    dt = time.perf_counter() - t0
    print("RESULT " + json.dumps({"steps_per_s": n / dt, "ops_per_step": (sess.stats["ops"] - ops0) / max(n, 1)}), flush=True)
""")


def summarize(path: str, top: int) -> dict:
    leaf, incl, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            n, frames = int(n), stack.split(";")
            total += n
            leaf[frames[-1][:120]] += n
            for name in {fr.split(" (")[0] for fr in frames}:
                incl[name] += n
    share = lambda c: [(k, round(v / total, 3)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "leaf": share(leaf), "inclusive": share(incl)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workload", default="gpt2_train", choices=["gpt2_train", "resnet50"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    opts = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not on PATH (pip install py-spy)")
    agent = LocalAgent(device=opts.device, quiet=True)
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the client is a CPU node's kernel
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, opts.workload, "1" if opts.quick else "0", agent.address,
         str(opts.seconds + 4)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert client.stdout.readline().strip() == "warm", "the client did not start"
        worker = query_inventory(agent.address)["sessions"][0]["pid"]
        spies = {
            who: subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(opts.seconds)),
                 "--rate", "250", "--format", "raw", "--threads", "--nonblocking",
                 "--output", f"{tmp}/{who}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for who, pid in (("client", client.pid), ("worker", worker))
        }
        for p in spies.values():
            p.wait()
        result = json.loads(client.stdout.readline().removeprefix("RESULT "))
        client.wait(120)
    finally:
        if client.poll() is None:
            client.kill()
        agent.stop()
    summary = {"workload": opts.workload, "device": opts.device, **result}
    for who in spies:
        summary[who] = summarize(f"{tmp}/{who}.txt", opts.top)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{opts.workload}: {result['steps_per_s']:.2f} steps/s remote, "
          f"{result['ops_per_step']:.0f} ops/step")
    for who in spies:
        s = summary[who]
        print(f"\n== {who}: {s['samples']} samples; by leaf frame")
        for k, v in s["leaf"]:
            print(f"{v:6.1%}  {k}")
        print(f"-- {who}: inclusive")
        for k, v in s["inclusive"]:
            print(f"{v:6.1%}  {k}")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
