"""The client's cost of issuing one op (issue #15): microseconds of the kernel's CPU per op.

    python benchmarks/client_op.py [--device cpu|cuda] [--reps 20] [--profile]

On the GPU machine: ``python benchmarks/client_op.py --device cuda`` (the agent takes the GPU;
this process hides CUDA from itself, as a kernel on a CPU node would).

Starts an agent on loopback and attaches this process to it (CUDA hidden, as on a CPU node),
then times how long the Python thread spends issuing ops, not how long they take to run:

* ``elementwise``: ``x = x * 1.0001 + 0.0001`` on 256 floats, 2000 iterations a rep;
* ``gpt2_step``: a tiny ``transformers`` GPT2LMHeadModel (2 layers, 64 wide) under bf16
  autocast, forward + backward + AdamW step, the op mix of a real training step.

Each reports the best rep (other processes share the machine) as µs per op. The agent runs
alongside, so on a machine with few cores its work competes with the client's; a sync between
reps keeps its backlog out of the next rep. ``--profile`` adds a cProfile table of each loop
(µs per op by function, own time), which shows the split by phase; it sees the main thread
only (autograd runs backward ops on its device thread): ``py-spy record --threads`` sees both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: the client is a CPU node

import torch  # noqa: E402

from jupyter_elastic_gpu.agent.local import LocalAgent  # noqa: E402


def elementwise(n=2000):
    x = torch.randn(256, device="cuda")

    def rep():
        nonlocal x
        for _ in range(n):
            x = x * 1.0001 + 0.0001

    return rep


def gpt2_step(steps=2):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=1000,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device="cuda")

    def rep():
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return rep


def measure(sess, rep, reps):
    """Best issue time per op of ``rep`` over ``reps`` runs, after two warm-ups."""
    best = float("inf")
    for i in range(reps + 2):
        torch.cuda.synchronize()
        ops = sess.stats["ops"]
        t = time.perf_counter()
        rep()
        dt = time.perf_counter() - t
        n = sess.stats["ops"] - ops
        if i >= 2:
            best = min(best, dt / n * 1e6)
    torch.cuda.synchronize()
    return best, n


def profile(sess, rep, top=25):
    import cProfile
    import pstats

    torch.cuda.synchronize()
    ops = sess.stats["ops"]
    pr = cProfile.Profile()
    pr.enable()
    rep()
    pr.disable()
    n = sess.stats["ops"] - ops
    torch.cuda.synchronize()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"  {'own us/op':>9} {'cum us/op':>9} {'calls/op':>8}  function")
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{os.path.basename(file)}:{line}({fn})" if line else fn
        print(f"  {tt / n * 1e6:9.2f} {ct / n * 1e6:9.2f} {nc / n:8.2f}  {where}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="the agent's device (cuda on a GPU machine)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", choices=["elementwise", "gpt2_step"])
    a = ap.parse_args()
    agent = LocalAgent(device=a.device, quiet=True)
    try:
        from jupyter_elastic_gpu import remote

        sess = remote.attach(agent.address, fraction=1.0)
        res = {}
        for name, make, reps in (
            ("elementwise", elementwise, a.reps),
            ("gpt2_step", gpt2_step, max(3, a.reps // 2)),
        ):
            if a.only and name != a.only:
                continue
            try:
                rep = make()
            except ImportError as e:
                print(f"{name}: skipped ({e})")
                continue
            us, n = measure(sess, rep, reps)
            res[name] = {"client_us_per_op": round(us, 2), "ops_per_rep": n}
            print(f"{name}: {us:.2f} us/op issued (best of {reps} x {n} ops)", flush=True)
            if a.profile:
                profile(sess, rep)
        print("RESULT " + json.dumps({"torch": torch.__version__, **res}))
        remote.detach()
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
