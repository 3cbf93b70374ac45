"""Forked and spawned children (DataLoader workers, multiprocessing, os.fork) never hang and
never touch the parent's connection to the agent; they follow CUDA's fork rules."""

from __future__ import annotations

import multiprocessing as mp
import os
import select

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from jupyter_elastic_gpu.remote.session import FORKED_MESSAGE

# A regression (a child waiting on the parent's socket) must fail, not hang the suite.
pytestmark = pytest.mark.timeout(240)
WORKER_TIMEOUT = 60  # seconds a DataLoader waits for one batch before raising


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x @ torch.randn(8, 1, generator=g))


def _train(loader) -> list[float]:
    torch.manual_seed(0)
    model = nn.Linear(8, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _epoch in range(3):
        total = torch.zeros((), device="cuda")
        for x, y in loader:
            assert x.device.type == "cpu"  # workers hand over CPU batches
            x, y = x.to("cuda"), y.to("cuda")
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
        losses.append(total.item())
    return losses


def _parent_still_works():
    x = torch.arange(4.0, device="cuda")
    assert (x * 2).sum().item() == 12.0
    torch.cuda.synchronize()
    assert not torch.cuda._is_in_bad_fork()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_feed_a_remote_training_loop(remote, start_method):
    loader = DataLoader(
        _data(),
        batch_size=16,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=start_method,
        timeout=WORKER_TIMEOUT,
    )
    losses = _train(loader)
    assert losses[-1] < losses[0]
    _parent_still_works()


def test_workers_match_the_main_process(remote):
    # Same shuffling seed, same data: workers change where batches are made, nothing else.
    def loader(workers):
        kw = {"timeout": WORKER_TIMEOUT, "multiprocessing_context": "fork"} if workers else {}
        return DataLoader(
            _data(), batch_size=16, shuffle=True, num_workers=workers,
            generator=torch.Generator().manual_seed(1), **kw,
        )  # fmt: skip

    assert _train(loader(2)) == pytest.approx(_train(loader(0)), rel=1e-5)


def _spawned_child(batch, conn):
    # A spawned child is a plain CPU process: no facade, no session of the parent.
    # (On a GPU machine it may see that machine's own GPU: what matters is whose torch.cuda.)
    conn.send((batch.device.type, batch.sum().item(), torch.cuda.is_available.__module__))


def test_remote_tensors_reach_a_spawned_child_as_cpu_copies(remote):
    x = torch.arange(6.0, device="cuda").view(2, 3)
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    p = ctx.Process(target=_spawned_child, args=(x, child_end))
    p.start()
    try:
        assert parent_end.poll(120), "the spawned child did not answer"
        assert parent_end.recv() == ("cpu", 15.0, "torch.cuda")
    finally:
        p.join(30)
    assert p.exitcode == 0
    _parent_still_works()


def _in_fork(body) -> str:
    """Run ``body()`` in an os.fork child; return what it wrote, or fail if it hangs."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's atexit/cleanup
        os.close(r)
        try:
            out = body()
        except BaseException as e:
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        if not ready:
            os.kill(pid, 9)
            pytest.fail("the forked child hung")
        return os.read(r, 1 << 16).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_forked_child_seeds_lazily_as_cuda_does(remote):
    def seed():
        torch.manual_seed(3)
        torch.cuda.manual_seed_all(3)
        torch.cuda.manual_seed(3)
        return f"seeded bad_fork={torch.cuda._is_in_bad_fork()}"

    assert _in_fork(seed) == "seeded bad_fork=True"
    _parent_still_works()


@pytest.mark.parametrize(
    "use",
    [
        lambda: torch.ones(2, device="cuda"),
        lambda: torch.ones(2).cuda(),
        lambda: torch.cuda.synchronize(),
        lambda: torch.cuda.memory_allocated(),
    ],
    ids=["factory", "copy", "synchronize", "memory"],
)
def test_gpu_use_in_a_forked_child_raises_cudas_error(remote, use):
    torch.ones(1, device="cuda").sum().item()  # the parent is attached when it forks
    assert _in_fork(lambda: repr(use())) == f"RuntimeError: {FORKED_MESSAGE}"
    assert "spawn" in FORKED_MESSAGE and "remote" in FORKED_MESSAGE
    _parent_still_works()


def test_parents_tensors_are_off_limits_in_a_forked_child(remote):
    x = torch.arange(3.0, device="cuda")
    assert _in_fork(lambda: repr(x.cpu())) == f"RuntimeError: {FORKED_MESSAGE}"
    assert x.tolist() == [0.0, 1.0, 2.0]


def _mp_child(q):
    torch.manual_seed(0)
    try:
        torch.zeros(1, device="cuda")
        q.put("no error")
    except RuntimeError as e:
        q.put(str(e))


def test_multiprocessing_fork_child(remote):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_mp_child, args=(q,))
    p.start()
    try:
        assert q.get(timeout=60) == FORKED_MESSAGE
    finally:
        p.join(30)
    assert p.exitcode == 0
    _parent_still_works()
