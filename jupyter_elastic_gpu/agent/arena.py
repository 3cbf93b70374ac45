"""The swap arena: host memory, pinned ahead of time, where idle sessions' tensors wait.

Moving an idle session off the GPU used to allocate and pin fresh host memory for its whole
footprint (cudaHostAlloc faults, zeroes and pins every page: about 0.55 s per GiB on an H100,
where the copy itself takes 0.018 s). The agent instead keeps one shared-memory file, filled
once when it starts; each worker maps it and, where it may create its CUDA context early,
registers it with CUDA before its session exists (about 0.05 s per GiB, off the swap's path).
A swap-out then only copies, at PCIe speed, into the extent the agent hands it. The agent
owns the allocation (first fit over one file), so workers never see each other's extents
as anything but bytes they are told to write. ``benchmarks/host_pinning.py`` measures both.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

log = logging.getLogger("jupyter_elastic_gpu.agent")

ALIGN = 2 << 20  # extents start on huge-page boundaries; storages inside them on 64 bytes


class HostArena:
    """Agent side: the file, and which extents of it sessions hold."""

    def __init__(self, nbytes: int):
        self.size = nbytes // ALIGN * ALIGN
        self.fd = os.memfd_create("elastic-gpu-swap-arena", 0)
        os.ftruncate(self.fd, self.size)
        self._free = [(0, self.size)]  # (offset, length), sorted, coalesced
        self._lock = threading.Lock()
        # Pages are created on first touch: fill them now, in the background, so neither a
        # worker's registration nor a swap-out pays for zeroing them.
        threading.Thread(target=self._populate, daemon=True, name="swap-arena-fill").start()

    def _populate(self) -> None:
        try:
            m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            m.close()
        except (OSError, ValueError) as e:
            log.warning("could not fill the swap arena (%s): swap-outs will fill it as they go", e)

    def take(self, nbytes: int) -> tuple[int, int] | None:
        """An extent of at least ``nbytes`` (offset, length), or None if none is free."""
        n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= n:
                    self._free[i] = (off + n, length - n)
                    if length == n:
                        del self._free[i]
                    return off, n
        return None

    def give(self, extent: tuple[int, int]) -> None:
        off, n = extent
        with self._lock:
            self._free.append((off, n))
            self._free.sort()
            merged = [self._free[0]]
            for o, ln in self._free[1:]:
                po, pl = merged[-1]
                if po + pl == o:
                    merged[-1] = (po, pl + ln)
                else:
                    merged.append((o, ln))
            self._free = merged

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def close(self) -> None:
        os.close(self.fd)


class WorkerArena:
    """Worker side: the same file mapped as one uint8 tensor (and pinned, once registered)."""

    def __init__(self, fd: int, nbytes: int):
        import torch

        self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.pinned = False

    def pin(self) -> None:
        """Register the mapping with CUDA, so copies into it run at PCIe speed. Creates the
        CUDA context if there is none yet: call it only where that is allowed (see the
        worker's warm-up), or at the first swap-out."""
        if self.pinned:
            return
        import torch

        err = torch.cuda.cudart().cudaHostRegister(
            self.tensor.data_ptr(), self.tensor.numel(), 1  # cudaHostRegisterPortable
        )
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister of the swap arena failed ({err})")
        self.pinned = True

    def extent(self, off: int, n: int):
        if not (0 <= off and 0 < n and off + n <= self.tensor.numel()):
            raise ValueError(f"swap extent {off}+{n} is outside the arena")
        return self.tensor[off:off + n]
