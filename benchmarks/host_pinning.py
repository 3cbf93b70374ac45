"""What pinning host memory costs, to choose how a worker swaps a session out (issue #15).

    python benchmarks/host_pinning.py --gib 1,4

For each size: (a) ``torch.empty(pin_memory=True)`` of fresh memory, as a swap-out does today
(cudaHostAlloc: fault, zero and pin every page), (b) ``cudaHostRegister`` of a shared-memory
file that another process already filled (what a worker would do with an agent-wide arena),
(c) a second registration of the same pages in a new mapping (the next worker), and the
device-to-host copy into each. Prints one JSON line per size. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time

import torch

GiB = 1 << 30


def timed(fn):
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def d2h(dst: torch.Tensor, src: torch.Tensor) -> float:
    _, dt = timed(lambda: dst.copy_(src, non_blocking=True))
    return src.nbytes / dt / 1e9


def register(fd: int, nbytes: int):
    m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    t = torch.frombuffer(m, dtype=torch.uint8)
    rt = torch.cuda.cudart()
    _, dt = timed(lambda: rt.cudaHostRegister(t.data_ptr(), nbytes, 0))
    return m, t, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", default="1,4")
    opts = ap.parse_args()
    torch.ones(1, device="cuda")
    for g in (float(x) for x in opts.gib.split(",")):
        n = int(g * GiB)
        src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(7)
        res = {"gib": g}
        pinned, res["alloc_pinned_s"] = timed(lambda n=n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        res["d2h_into_fresh_pinned_GBps"] = d2h(pinned, src)
        res["d2h_into_pinned_again_GBps"] = d2h(pinned, src)
        del pinned
        fd = os.memfd_create("egpu-arena-bench")
        os.ftruncate(fd, n)
        t = time.perf_counter()
        filler = mmap.mmap(fd, n, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        res["populate_shared_s"] = time.perf_counter() - t
        m1, t1, res["register_first_s"] = register(fd, n)
        res["d2h_into_registered_GBps"] = d2h(t1, src)
        m2, t2, res["register_second_mapping_s"] = register(fd, n)
        res["d2h_into_second_mapping_GBps"] = d2h(t2, src)
        assert bool((t2[:1 << 20] == 7).all())
        rt = torch.cuda.cudart()
        for t_ in (t1, t2):
            rt.cudaHostUnregister(t_.data_ptr())
        del t1, t2
        for m_ in (m1, m2, filler):
            m_.close()
        os.close(fd)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
