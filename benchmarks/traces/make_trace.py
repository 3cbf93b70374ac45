"""Generate the notebook-session trace that ``benchmarks/density.py`` replays.

    python benchmarks/traces/make_trace.py [--sessions 32] [--minutes 30] [--seed 17]
        [--out benchmarks/traces/notebook-sessions.json]

Each session is one user at a GPU kernel: cells separated by think times. The shape (why
these distributions and parameters) is argued in docs/benchmarks.md, "Users per GPU":

- think time before a cell: Pareto (heavy tail: reading output, editing, a coffee),
  ``xm`` seconds and shape ``alpha``, clipped to [1 s, 15 min];
- cell duration: log-normal (milliseconds for a tensor peek, minutes for a training
  loop), median and sigma below, clipped to [5 ms, 5 min];
- ``gpu_share`` of cells touch the GPU (the rest are plotting, pandas, prints and take
  no lease: the lease is taken at a cell's first GPU op);
- the session's resident GPU memory (model, optimizer state, a batch), as a share of one
  GPU's memory: log-normal, clipped to [0.5 %, 20 %], so it fits a 0.25 slice.

Any file of the same format can replace the output: real traces, other parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

DEFAULTS = {
    "think_xm_s": 12.0,
    "think_alpha": 1.4,
    "think_clip_s": [1.0, 900.0],
    "cell_median_s": 1.5,
    "cell_sigma": 1.5,
    "cell_clip_s": [0.005, 300.0],
    "gpu_share": 0.8,
    "memory_median": 0.03,
    "memory_sigma": 0.8,
    "memory_clip": [0.005, 0.2],
}


def clip(x, bounds):
    return min(max(x, bounds[0]), bounds[1])


def session(rng: random.Random, minutes: float, p: dict) -> dict:
    cells, t = [], 0.0
    while True:
        think = clip(p["think_xm_s"] * rng.paretovariate(p["think_alpha"]), p["think_clip_s"])
        dur = clip(
            rng.lognormvariate(math.log(p["cell_median_s"]), p["cell_sigma"]), p["cell_clip_s"]
        )
        if t + think + dur > minutes * 60:
            break
        cells.append(
            {
                "think": round(think, 4),
                "duration": round(dur, 4),
                "gpu": rng.random() < p["gpu_share"],
            }
        )
        t += think + dur
    memory = clip(
        rng.lognormvariate(math.log(p["memory_median"]), p["memory_sigma"]), p["memory_clip"]
    )
    return {"memory_share": round(memory, 4), "cells": cells}


def duty(sessions: list) -> float:
    """GPU-cell time over session time, all sessions together."""
    gpu = sum(c["duration"] for s in sessions for c in s["cells"] if c["gpu"])
    total = sum(c["duration"] + c["think"] for s in sessions for c in s["cells"])
    return gpu / total if total else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=30.0, help="length of each session")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--out", default=str(Path(__file__).with_name("notebook-sessions.json")))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    sessions = [session(rng, args.minutes, DEFAULTS) for _ in range(args.sessions)]
    for i, s in enumerate(sessions):
        s["id"] = f"s{i:02d}"
    trace = {
        "format": "elastic-gpu-notebook-trace/1",
        "generator": "benchmarks/traces/make_trace.py "
        f"--sessions {args.sessions} --minutes {args.minutes:g} --seed {args.seed}",
        "params": DEFAULTS,
        "gpu_duty": round(duty(sessions), 4),
        "sessions": sessions,
    }
    Path(args.out).write_text(json.dumps(trace, indent=1) + "\n")
    cells = [c for s in sessions for c in s["cells"]]
    print(f"{len(sessions)} sessions, {len(cells)} cells, GPU duty {trace['gpu_duty']:.1%}")


if __name__ == "__main__":
    main()
