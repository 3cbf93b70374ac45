"""Run PyTorch's OpInfo sample inputs through the remote device and compare with local results.

Usage: ``python tests/remote/opinfo_sweep.py AGENT_ADDRESS OUT.json [--samples N] [--dtype float32]``.
Runs as its own process so that an op which crashes the client cannot take the test run down.
Each sample counts as passed (same values as on the local CPU), failed (wrong values or an
error the local run did not raise) or skipped (the local run itself rejects the sample, or
the op is random).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
from torch.utils._pytree import tree_map


def to_remote(x):
    return x.to("cuda") if isinstance(x, torch.Tensor) else x


def to_local(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("agent")
    p.add_argument("--agent-device", default="cpu", help="what the agent runs on, for the report")
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", default=None, help="comma-separated op names")
    p.add_argument("--markdown", default=None, help="also write the per-op table here")
    opts = p.parse_args(argv)
    dtype = getattr(torch, opts.dtype)

    from torch.testing._internal.common_methods_invocations import op_db

    from jupyter_elastic_gpu import remote

    remote.attach(opts.agent, fraction=1.0)
    only = set(opts.only.split(",")) if opts.only else None
    results = {}
    t0 = time.monotonic()
    for op in op_db:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        if only and op.name not in only:
            continue
        if dtype not in op.supported_dtypes("cpu"):
            continue
        rec = results[name] = {"passed": 0, "failed": 0, "skipped": 0, "errors": []}
        if (
            getattr(op, "is_factory_function", False)
            or "rand" in op.name
            or "dropout" in op.name
            or op.name
            in (
                "bernoulli",
                "multinomial",
                # in-place samplers: on a CUDA agent they draw from the GPU's generator, whose
                # stream differs from the CPU reference's for the same seed
                "cauchy",
                "exponential",
                "geometric",
                "log_normal",
                "nn.functional.rrelu",
                "normal",
                "uniform",
                "empty",
                "empty_like",
                "new_empty",
                "new_empty_strided",
                "empty_strided",
                "empty_permuted",
            )
        ):
            rec["skipped"] += 1  # random or uninitialised results: nothing to compare
            continue
        try:
            samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))[: opts.samples]
        except Exception:
            rec["skipped"] += 1
            continue
        for s in samples:
            try:
                torch.manual_seed(0)
                expected = op(s.input, *s.args, **s.kwargs)
            except Exception:
                rec["skipped"] += 1
                continue
            try:
                rin, rargs, rkwargs = tree_map(to_remote, (s.input, s.args, s.kwargs))
                torch.manual_seed(0)
                got = tree_map(to_local, op(rin, *rargs, **rkwargs))
                torch.testing.assert_close(
                    got,
                    expected,
                    equal_nan=True,
                    rtol=1.3e-6 * 10,
                    atol=1e-5,
                    check_device=False,
                    check_stride=False,
                )
                rec["passed"] += 1
            except Exception as e:
                rec["failed"] += 1
                if len(rec["errors"]) < 2:
                    rec["errors"].append(
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        if str(e)
                        else traceback.format_exc(limit=1)[-200:]
                    )
                try:  # a failed op's async error must not be charged to the next one
                    torch.cuda.synchronize()
                except Exception:
                    pass
    summary = {
        "dtype": opts.dtype,
        "seconds": round(time.monotonic() - t0, 1),
        "torch": torch.__version__,
        "passed": sum(r["passed"] for r in results.values()),
        "failed": sum(r["failed"] for r in results.values()),
        "skipped": sum(r["skipped"] for r in results.values()),
    }
    summary["pass_rate"] = round(
        summary["passed"] / max(1, summary["passed"] + summary["failed"]), 4
    )
    with open(opts.out, "w") as f:
        json.dump({"summary": summary, "ops": results}, f, indent=1, sort_keys=True)
    print(json.dumps(summary))
    if opts.markdown:
        write_markdown(opts.markdown, summary, results, opts.agent_device)
    remote.detach()
    return 0


def write_markdown(path, summary, results, device):
    lines = [
        "# OpInfo coverage of the remote device",
        "",
        "Generated by `python tests/remote/opinfo_sweep.py AGENT OUT.json --markdown docs/opinfo-coverage.md`:",
        "PyTorch's own OpInfo sample inputs (`op_db`, up to 3 samples per op) run through the remote",
        f"device (agent on **{device}**, {summary['dtype']}, torch {summary['torch']}) and compared",
        "with the same op run locally on the CPU. Skipped: samples the local run rejects, random ops.",
        "",
        f"**{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped: "
        f"{100 * summary['pass_rate']:.1f}% of compared samples pass.** CI fails if this drops below",
        "the baseline in `tests/remote/opinfo_baseline.json`.",
        "",
        "## Ops with failing samples",
        "",
        "| op | passed | failed | first error |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, r in sorted(results.items()):
        if r["failed"]:
            err = (r["errors"] or [""])[0].replace("|", "\\|")[:160]
            lines.append(f"| `{name}` | {r['passed']} | {r['failed']} | {err} |")
    lines += [
        "",
        "Harness artifacts, not user-visible: OpInfo's `__getitem__` calls `TensorBase.__getitem__`",
        "directly, past the remote tensor's own `__getitem__` that turns list indices (`x[[0, 2]]`)",
        "into index tensors (tested in `test_cuda_semantics.py`); `tensor_split`'s split-point tensor",
        "is moved to the device by the sweep, which CUDA refuses the same way.",
        "",
        "## All ops",
        "",
        "| op | passed | failed | skipped |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in sorted(results.items()):
        lines.append(f"| `{name}` | {r['passed']} | {r['failed']} | {r['skipped']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
