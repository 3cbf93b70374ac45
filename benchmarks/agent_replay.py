"""The agent's CPU time per op on real training steps: record what a client sends, replay it.

    python benchmarks/agent_replay.py                      # record (CPU agent) + replay on CPU
    python benchmarks/agent_replay.py --device cuda        # replay on the GPU (the agent's view)
    python benchmarks/agent_replay.py --replay-only DIR    # replay an earlier recording

Recording runs each workload (a tiny GPT-2 from transformers with AdamW under bf16 autocast, a
small CNN with BatchNorm and AdamW) as a client against a local CPU agent and keeps every frame
the client encodes (``remote.session.encode_frame``): batches, calls, fetches, syncs. Replaying feeds
those frames, from the session's first op, into a fresh in-process ``SessionExecutor`` the way
the worker does (``messages.parse``, ``run_batch`` with a control-socket ``interrupted`` poll,
``call``, ``fetch``), and times the steps recorded between two marks, best of ``--repeat``.

Printed per op of the timed steps (µs of this thread's CPU time, which other processes on a
shared machine disturb less than wall time; one intra-op thread): the replay's total, the aten calls alone (the same
calls, captured once and re-issued bare: what native PyTorch would spend), the agent's own
overhead (the difference), the JSON decode of the batch headers (``recv_frame``'s part, not in
the total), and the overhead split by phase (cProfile's shares of it, scaled to the measured
overhead: the profiler inflates small Python functions, so only its proportions are used).
``--baseline TREE`` replays another checkout's executor interleaved with this one (an A/B in
one process); ``--cuda-bookkeeping`` keeps a CUDA agent's books on the CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import select
import socket
import subprocess
import sys
import tempfile
import time

CLIENT = r"""
import json, os, sys
import torch
import torch.nn.functional as F
workload, address, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if workload == "gpt2":
    import transformers
    from transformers import GPT2LMHeadModel  # noqa: F401  (lazy modules, before attach)
from jupyter_elastic_gpu import remote
from jupyter_elastic_gpu.remote import session as session_module

frames, blob = [], open(os.path.join(out, "bufs.bin"), "wb")
encode = session_module.encode_frame

# Every frame the session sends is encoded here (batches, requests), just before it is sent.
def recording_encode(header, bufs=()):
    lengths = []
    for b in bufs:
        raw = memoryview(b).cast("B")
        blob.write(raw)
        lengths.append(len(raw))
    frames.append([json.dumps(header, separators=(",", ":")), lengths])
    return encode(header, bufs)

session_module.encode_frame = recording_encode
sess = remote.attach(address, fraction=1.0)
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
if workload == "gpt2":
    nodrop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                  n_positions=64, **nodrop)
    model = transformers.GPT2LMHeadModel(cfg).cuda()
    data = [[torch.randint(0, 1000, (2, 32), generator=g)] for _ in range(2)]
    loss_fn = lambda m, ids: m(input_ids=ids, labels=ids).loss
    autocast = True
else:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).cuda()
    data = [[torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)]
            for _ in range(2)]
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    autocast = False
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

def step(i):
    xs = [t.to("cuda") for t in data[i % 2]]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model, *xs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

for i in range(3):
    step(i)
torch.cuda.synchronize()
frames.append(["mark", []])
ops0 = sess.stats["ops"]
losses = [step(i) for i in range(steps)]
torch.cuda.synchronize()
frames.append(["mark", []])
ops = sess.stats["ops"] - ops0
print(f"{workload}: {ops / steps:.0f} ops/step, losses {float(losses[0]):.4f} .. {float(losses[-1]):.4f}")
blob.close()
with open(os.path.join(out, "frames.json"), "w") as f:
    json.dump({"workload": workload, "steps": steps, "ops": ops, "frames": frames}, f)
sess.close()
"""

PHASES = [  # (phase, substrings of "file:function" that belong to it), first match wins
    # Kernels registered in Python (attention's CPU kernels) count as the op, as aten's do.
    (
        "op call (aten)",
        ["torch._ops.", "_ops.py:__call__", "aten_kernel", "attention.py", "cpu_kernels.py"],
    ),
    ("parse (messages)", ["messages.py"]),
    ("resolve", ["executor.py:__call__", "executor.py:_plan", "executor.py:plan"]),
    ("decode args", ["values.py", "executor.py:tensor", "executor.py:_fill", "_sig_kwargs"]),
    ("layout checks", ["layouts.py", "_ops.py:__hash__", "_ops.py:__eq__"]),
    (
        "store/account",
        ["executor.py:_store", "executor.py:_account", "executor.py:_flat", "executor.py:_fail"],
    ),
    ("free", ["executor.py:free"]),
    ("run-ahead marks", ["_bound_run_ahead"]),
    ("interrupt poll", ["agent_replay.py:interrupted"]),
    ("run/run_batch loop", ["executor.py:run", "executor.py:_run"]),
]


def record(workloads, steps, out_root):
    from jupyter_elastic_gpu.agent.local import LocalAgent

    agent = LocalAgent(device="cpu", quiet=True)
    dirs = []
    try:
        for w in workloads:
            d = os.path.join(out_root, w)
            os.makedirs(d, exist_ok=True)
            subprocess.run(
                [sys.executable, "-c", CLIENT, w, agent.address, d, str(steps)],
                check=True,
                env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
            )
            dirs.append(d)
    finally:
        agent.stop()
    return dirs


def load(d):
    with open(os.path.join(d, "frames.json")) as f:
        rec = json.load(f)
    with open(os.path.join(d, "bufs.bin"), "rb") as f:
        blob = f.read()
    frames, pos = [], 0
    for head, lengths in rec["frames"]:
        bufs = []
        for n in lengths:
            bufs.append(blob[pos : pos + n])
            pos += n
        frames.append((head, bufs))
    return rec, frames


class Replayer:
    """Feeds recorded frames to a fresh executor the way ``agent/worker.py`` does."""

    registered = False

    def __init__(self, frames, device, package="jupyter_elastic_gpu", cuda_bookkeeping=False):
        import importlib

        import torch

        executor = importlib.import_module(f"{package}.agent.executor")
        worker = importlib.import_module(f"{package}.agent.worker")
        m = importlib.import_module(f"{package}.protocol.messages")
        if not Replayer.registered:  # the kernels a worker registers at start (agent/worker.py)
            from jupyter_elastic_gpu.agent import attention, cpu_kernels

            if device == "cpu":
                cpu_kernels.register()
            attention.register(device)
            Replayer.registered = True

        self.torch, self.m, self.frames = torch, m, frames
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # as a worker names its GPUs
        self.executor_type = executor.SessionExecutor
        self.marks = [i for i, (h, _) in enumerate(frames) if h == "mark"]
        self.cuda_bookkeeping = cuda_bookkeeping
        # The worker polls its control socket for interrupts (at most every POLL_SECONDS where
        # that tree's worker has one); so does the replay.
        self.ctl, self.peer = socket.socketpair()
        self.poll_every, self.next_poll = getattr(worker, "POLL_SECONDS", 0.0), 0.0

    def close(self):
        self.ctl.close()
        self.peer.close()

    def interrupted(self):
        now = time.monotonic()
        if now >= self.next_poll:
            self.next_poll = now + self.poll_every
            while select.select([self.ctl], [], [], 0)[0]:
                self.ctl.recv(1 << 16)
        return False

    def fresh(self):
        ex = self.executor_type([self.device])
        # As the worker sets it: only a CPU agent counts bytes against the cap itself.
        ex.cap_bytes = 64 << 30 if self.device.type == "cpu" else None
        if self.cuda_bookkeeping:
            ex.cap_bytes, ex.accounting = None, False
        headers = [
            (None if h == "mark" else json.loads(h), [bytearray(b) for b in bufs])
            for h, bufs in self.frames
        ]
        return ex, headers

    def run(self, ex, headers, lo, hi):
        m, torch = self.m, self.torch
        for header, bufs in headers[lo:hi]:
            if header is None:
                continue
            op = header["op"]
            if op == "batch":
                msg = m.parse(header)
                if getattr(msg, "sigs", None):  # as the worker defines them (agent/worker.py)
                    ex.define_signatures(msg.sigs)
                ex.run_batch(msg.ops, bufs, msg.free, self.interrupted)
            elif op == "call":
                msg = m.parse(header)
                ex.call(msg.name, msg.args, msg.kwargs, bufs)
            elif op == "fetch":
                ex.fetch(m.parse(header).t)
            elif op == "sync" and self.device.type == "cuda":
                torch.cuda.synchronize()
            if ex.error is not None:
                raise RuntimeError(f"replay failed: {ex.error}")

    def timed(self):
        """Seconds to replay the marked steps (set-up replayed untimed first)."""
        ex, headers = self.fresh()
        a, b = self.marks[0], self.marks[1]
        self.run(ex, headers, 0, a)
        self._sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        self.run(ex, headers, a, b)
        issue = time.thread_time() - c0
        self._sync()
        return issue, time.perf_counter() - t0

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def capture_aten(self):
        """The marked steps' aten calls, captured once: re-issuing them bare (``reissue``)
        costs what native PyTorch would spend on them."""
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = []

        class Capture(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append((func, args, kwargs or {}))
                return func(*args, **(kwargs or {}))

        ex, headers = self.fresh()
        a, b = self.marks[0], self.marks[1]
        self.run(ex, headers, 0, a)
        with Capture():
            self.run(ex, headers, a, b)
        return calls

    def reissue(self, calls):
        self._sync()
        t0 = time.thread_time()
        for func, args, kwargs in calls:
            func(*args, **kwargs)
        return time.thread_time() - t0

    def profile(self):
        ex, headers = self.fresh()
        plan = getattr(ex, "_plan", None)
        if plan is not None:
            # The executor calls kernels directly, which cProfile cannot see: a Python frame
            # around each (as OpOverload.__call__ is) bills their time to "op call".
            def profiled_plan(name):
                op, kernel, kind = plan(name)

                def aten_kernel(*a, **k):
                    return kernel(*a, **k)

                ex._plans[name] = (op, aten_kernel, kind)
                return ex._plans[name]

            ex._plan = profiled_plan
        a, b = self.marks[0], self.marks[1]
        self.run(ex, headers, 0, a)
        prof = cProfile.Profile()
        prof.enable()
        self.run(ex, headers, a, b)
        self._sync()
        prof.disable()
        return pstats.Stats(prof)

    def json_decode_seconds(self, repeat):
        a, b = self.marks[0], self.marks[1]
        heads = [h for h, _ in self.frames[a:b] if h != "mark"]
        best = float("inf")
        for _ in range(repeat):
            t0 = time.thread_time()
            for h in heads:
                json.loads(h)
            best = min(best, time.thread_time() - t0)
        return best


def _phase(key: str) -> str:
    for phase, needles in PHASES:
        if any(n in key for n in needles):
            return phase
    return "other"


def phases(stats: pstats.Stats) -> dict[str, float]:
    """Profiled seconds by phase; a builtin's time (dict.get, untyped_storage...) goes to the
    phases of the functions that called it."""
    out = {p: 0.0 for p, _ in PHASES}
    out["other"] = 0.0
    for (file, _line, func), (_cc, _nc, tottime, _ct, callers) in stats.stats.items():
        key = f"{os.path.basename(file)}:{func}"
        if file == "~" and not key.startswith("~:<built-in method torch._ops.") and callers:
            for (cfile, _cl, cfunc), caller_stats in callers.items():
                out[_phase(f"{os.path.basename(cfile)}:{cfunc}")] += caller_stats[2]
        else:
            out[_phase(key)] += tottime
    return out


def load_baseline(tree: str) -> str:
    """Import another checkout's package under another name, for an A/B in one process."""
    import importlib.util

    alias = "baseline_jupyter_elastic_gpu"
    where = os.path.join(os.path.abspath(tree), "jupyter_elastic_gpu")
    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(where, "__init__.py"), submodule_search_locations=[where]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return alias


def count_ops(frames, marks):
    n = 0
    for h, _ in frames[marks[0] : marks[1]]:
        if h != "mark" and h.startswith('{"op":"batch"'):
            n += sum(1 for r in json.loads(h)["ops"] if type(r) is list)
        elif h != "mark" and h.startswith('{"op":"call"'):
            n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="the agent's device for the replay")
    p.add_argument("--workloads", default="gpt2,cnn")
    p.add_argument("--steps", type=int, default=5, help="timed training steps recorded")
    p.add_argument("--repeat", type=int, default=7, help="replays timed (best of)")
    p.add_argument("--record-to", help="keep the recording in this folder")
    p.add_argument("--replay-only", help="replay the recordings in this folder")
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--cuda-bookkeeping",
        action="store_true",
        help="on the CPU, keep the books as a CUDA agent does (no per-op byte accounting, the "
        "allocator enforces the cap): the agent's overhead on a GPU, without one",
    )
    p.add_argument(
        "--baseline",
        metavar="TREE",
        help="also replay with the executor of this checkout (e.g. a `git archive` of main), "
        "interleaved with this one's in the same process, and print both",
    )
    opts = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the agent's per-op overhead, not the CPU kernels' threading
    workloads = opts.workloads.split(",")
    if opts.replay_only:
        root, dirs = opts.replay_only, [os.path.join(opts.replay_only, w) for w in workloads]
    else:
        root = opts.record_to or tempfile.mkdtemp(prefix="agent_replay_")
        dirs = record(workloads, opts.steps, root)
        print(f"recorded into {root}")
    results = {}
    for d in dirs:
        rec, frames = load(d)
        r = Replayer(frames, opts.device, cuda_bookkeeping=opts.cuda_bookkeeping)
        base = (
            Replayer(frames, opts.device, load_baseline(opts.baseline), opts.cuda_bookkeeping)
            if opts.baseline
            else None
        )
        try:
            n = count_ops(frames, r.marks)
            r.timed()  # warm: first use of each op and overload
            calls = r.capture_aten()
            ncalls = len(calls)
            runs, base_runs, bare = [], [], []
            for _ in range(opts.repeat):  # interleaved, so that all see the same load
                runs.append(r.timed())
                bare.append(r.reissue(calls))
                if base is not None:
                    base_runs.append(base.timed())
            del calls
            issue = min(x[0] for x in runs)
            total = min(x[1] for x in runs)
            aten = min(bare)
            decode = r.json_decode_seconds(opts.repeat)
            split = phases(r.profile())
            split.pop("op call (aten)")  # measured without the profiler: "aten calls alone"
        finally:
            r.close()
            if base is not None:
                base.close()
        us = 1e6 / n
        res = {
            "ops": n,
            "ops_per_step": n / rec["steps"],
            "agent_us_per_op": issue * us,
            "with_gpu_sync_us_per_op": total * us,
            "aten_only_us_per_op": aten * us,
            "aten_calls": ncalls,
            "overhead_us_per_op": (issue - aten) * us,
            "json_decode_us_per_op": decode * us,
            # The profiler inflates small Python functions: its shares, scaled to the overhead.
            "overhead_split_us_per_op": {
                k: v / sum(split.values()) * (issue - aten) * us for k, v in split.items()
            },
        }
        if base_runs:
            res["baseline_agent_us_per_op"] = min(x[0] for x in base_runs) * us
            res["baseline_overhead_us_per_op"] = res["baseline_agent_us_per_op"] - aten * us
        results[rec["workload"]] = res
        print(
            f"\n{rec['workload']} on {opts.device}: {n} ops in {rec['steps']} steps "
            f"({res['ops_per_step']:.0f}/step), best of {opts.repeat}\n"
            f"  agent (replay, issue)  {res['agent_us_per_op']:7.2f} us/op CPU"
            f"   (wall incl. the GPU's tail {res['with_gpu_sync_us_per_op']:.2f})"
            + (
                f"\n  baseline agent         {res['baseline_agent_us_per_op']:7.2f} us/op CPU"
                f"   (overhead {res['baseline_overhead_us_per_op']:.2f})"
                if base_runs
                else ""
            )
            + f"\n  aten calls alone       {res['aten_only_us_per_op']:7.2f} us/op"
            f" ({ncalls} calls)\n"
            f"  agent overhead         {res['overhead_us_per_op']:7.2f} us/op\n"
            f"  JSON header decode     {res['json_decode_us_per_op']:7.2f} us/op (recv_frame, "
            "not in the above)\n  overhead by phase (cProfile's shares of it):"
        )
        for k, v in sorted(res["overhead_split_us_per_op"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:22s} {v:7.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
