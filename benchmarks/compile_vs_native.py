"""``torch.compile`` on the remote GPU vs native eager and native compiled, in one run.

    python benchmarks/compile_vs_native.py --device cuda --out compile_vs_native.json
    python benchmarks/compile_vs_native.py --device cuda --autocast bf16 --out compile_bf16.json
    python benchmarks/compile_vs_native.py --device cpu --quick     # CPU smoke run

Each workload (HF GPT-2 small training, torchvision ResNet-50 training; ``--quick``: tiny
configurations) runs in fresh processes through the machinery of ``remote_vs_native.py``:
natively eager, natively ``torch.compile``d, and remotely ``torch.compile``d (CUDA hidden,
``device="cuda"`` is an agent on loopback) twice: the first remote run compiles on the agent,
the second (a new process, so a new session and worker) finds the graphs in the agent's
compile cache. Reported: steps/s of the timed steps, the first step's time (which holds the
compile), the agent's per-graph compile times and cache answers, and the ratios the issue
targets (remote compiled / native eager >= 1.3, remote compiled / native compiled >= 0.9).
Precision (``--autocast``): ``float32`` (the default) trains in float32; ``bf16`` runs each
step's forward and loss under ``torch.autocast(device, dtype=torch.bfloat16)`` and the
backward and optimizer step outside it, as the AMP recipe (and HF's Trainer) writes it, in
every mode alike: remotely the casts are traced into the compiled graphs (remote/compile.py),
natively Dynamo traces them the same way (``--device cpu`` uses CPU autocast natively, whose
cast policy differs from CUDA's: the smoke run's native losses are no reference there).
Parameters and optimizer state stay float32. Native and agent use separate, fresh inductor
caches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from remote_vs_native import run  # noqa: E402

from jupyter_elastic_gpu.agent.local import LocalAgent  # noqa: E402

SCRIPT = r"""
import contextlib, json, os, sys, time, warnings
import torch
import torch.nn.functional as F
mode, name, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
try:
    import transformers  # before attach, as in real_models.py
except ImportError:
    transformers = None
sess = None
if mode.startswith("remote"):
    from jupyter_elastic_gpu import remote
    sess = remote.attach(sys.argv[4], fraction=1.0)
dev = "cuda" if (mode.startswith("remote") or torch.cuda.is_available()) else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
precision = os.environ.get("COMPILE_BENCH_AUTOCAST", "float32")
amp = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if precision == "bf16" else (
    contextlib.nullcontext)

seen = set()  # the model outputs' dtypes: bfloat16 shows the autocast took effect

def skip(why):
    print("RESULT " + json.dumps({"skipped": why})); sys.exit(0)

def build():
    if name == "gpt2_train":
        if transformers is None:
            skip("transformers is not installed")
        # No dropout (losses must match across modes); no KV cache object in training outputs.
        nodrop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        cfg = (transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                       n_positions=64, **nodrop) if quick
               else transformers.GPT2Config(**nodrop))
        B, T = (2, 32) if quick else (8, 512)
        model = transformers.GPT2LMHeadModel(cfg)
        batch = lambda g: [torch.randint(0, cfg.vocab_size, (B, T), generator=g)]
        def loss(m, ids):
            out = m(input_ids=ids, labels=ids)
            seen.add(str(out.logits.dtype))
            return out.loss
        return model, batch, loss, "adamw", 1e-4
    try:
        import torchvision as tv
    except ImportError:
        if not quick:
            skip("torchvision is not installed")
        tv = None
    B, S = (2, 32) if quick else (64, 224)
    if tv is not None:
        model = tv.models.resnet18(num_classes=10) if quick else tv.models.resnet50()
    else:  # the CPU smoke run needs no torchvision: a small residual-free CNN
        nn = torch.nn
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    classes = 10 if quick else 1000
    batch = lambda g: [torch.randn(B, 3, S, S, generator=g),
                       torch.randint(0, classes, (B,), generator=g)]
    def loss(m, x, y):
        out = m(x)
        seen.add(str(out.dtype))
        return F.cross_entropy(out, y)
    return model, batch, loss, "sgd", 0.01

torch.manual_seed(0)
model, batch, loss_fn, opt_name, lr = build()
gen = torch.Generator().manual_seed(1)
data = [batch(gen) for _ in range(2)]
model = model.to(dev)
opt = (torch.optim.AdamW(model.parameters(), lr=lr) if opt_name == "adamw"
       else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
run_model = model if mode == "native_eager" else torch.compile(model)

def step(i):
    xs = [t.to(dev) for t in data[i % 2]]
    with amp():  # forward and loss only; backward and step outside, as the AMP recipe
        loss = loss_fn(run_model, *xs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t = time.perf_counter(); step(0); sync(); first = time.perf_counter() - t
    for i in range(1, 3):
        step(i)
    sync()
    steps = 3 if quick else 15
    t = time.perf_counter()
    out = [step(i) for i in range(steps)]
    sync()
    dt = time.perf_counter() - t
res = {"precision": precision, "output_dtypes": sorted(seen), "steps": steps, "seconds": dt,
       "unit": "steps/s", "throughput": steps / dt,
       "first_step_s": first, "losses": [float(l) for l in out],
       "warnings": sorted({str(w.message)[:300] for w in caught if "eager" in str(w.message)})}
c = getattr(run_model, "_compiled", None)
if c is not None:
    res["graphs"] = c.compiles
    res["compile_stats"] = c.stats
if sess is not None:
    res["ops_sent"] = sess.stats["ops"]
print("RESULT " + json.dumps(res))
"""

MODES = ["native_eager", "native_compiled", "remote_compiled", "remote_compiled_cached"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke test on a CPU agent)")
    ap.add_argument("--workloads", default="gpt2_train,resnet50")
    ap.add_argument(
        "--autocast",
        default="float32",
        choices=["float32", "bf16"],
        help="bf16: forward and loss under torch.autocast(bfloat16) in every mode",
    )
    opts = ap.parse_args(argv)
    os.environ["COMPILE_BENCH_AUTOCAST"] = opts.autocast  # read by each workload process
    caches = tempfile.mkdtemp(prefix="compile-bench-")
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the agent picks its own, under caches
    agent = LocalAgent(
        device=opts.device,
        quiet=True,
        env={"ELASTIC_GPU_COMPILE_CACHE": os.path.join(caches, "agent")},
    )
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(caches, "native")  # native processes
    results = {}
    try:
        for name in opts.workloads.split(","):
            r = results[name] = {}
            for mode in MODES:
                r[mode] = run(mode, name, opts.quick, agent.address, opts.device, script=SCRIPT)
                if "skipped" in r[mode]:
                    print(f"{name}: skipped ({r[mode]['skipped']})", flush=True)
                    break
                m = r[mode]
                graphs = ", ".join(
                    f"{g['handle'][:8]} {g['seconds']:.1f}s {g['cache']}"
                    for g in m.get("graphs", [])
                )
                print(
                    f"{name:11s} {opts.autocast} {mode:23s} {m['throughput']:8.3f} steps/s  first step "
                    f"{m['first_step_s']:7.2f} s  {graphs}  out {','.join(m['output_dtypes'])}  "
                    f"{' '.join(m['warnings'])}",
                    flush=True,
                )
            else:
                remote = r["remote_compiled_cached"]["throughput"]
                r["remote_compiled_over_native_eager"] = remote / r["native_eager"]["throughput"]
                r["remote_compiled_over_native_compiled"] = (
                    remote / r["native_compiled"]["throughput"]
                )
                if r["remote_compiled_cached"]["warnings"]:
                    print(f"{name:11s} NOTE: the remote runs fell back to eager (see above)")
                print(
                    f"{name:11s} remote compiled / native eager "
                    f"{r['remote_compiled_over_native_eager']:.3f} (target >= 1.3), "
                    f"/ native compiled {r['remote_compiled_over_native_compiled']:.3f} "
                    "(target >= 0.9)",
                    flush=True,
                )
    finally:
        agent.stop()
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
