"""Ops go to the agent as signature records (protocol/messages.py ``SigDef``/``SigUse``): a
training loop gives the answers it gives locally, however its table is cut up, sent again or
started afresh, and memory freed between ops is reused in stream order."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jupyter_elastic_gpu.protocol import messages as m
from jupyter_elastic_gpu.remote import backend


def train(model, steps, device, between=lambda step: None):
    torch.manual_seed(0)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)  # a new lr float every step
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randn(8, 6, generator=g).to(device)
        y = torch.randn(8, 1, generator=g).to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
        between(step)
    return [float(v) for v in losses], [p.detach().cpu() for p in model.parameters()]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.LayerNorm(16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 1),
    )


def assert_same_training(remote_run, local_run):
    (rl, rp), (ll, lp) = remote_run, local_run
    assert rl == pytest.approx(ll, rel=1e-5, abs=1e-6)
    for p, q in zip(rp, lp, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def records(sess):
    """Count the records the session queues, by kind, while the block runs."""
    seen = {"sig": 0, "run": 0, "free": 0}
    orig_sig, orig_run = sess.enqueue_sig, sess.enqueue

    def enqueue_sig(rec):
        seen["sig"] += 1
        return orig_sig(rec)

    def enqueue(*a):
        seen["run"] += 1
        seen["free"] += bool(sess.freed)
        return orig_run(*a)

    sess.enqueue_sig, sess.enqueue = enqueue_sig, enqueue
    return seen, lambda: sess.__dict__.update(enqueue_sig=orig_sig, enqueue=orig_run)


def test_a_training_loop_runs_as_signature_uses_with_local_results(remote):
    net = model()
    local = train(copy.deepcopy(net), 4, "cpu")
    seen, restore = records(remote)
    try:
        got = train(net, 4, "cuda")
    finally:
        restore()
    assert_same_training(got, local)
    # Only the uploads (parameters, then x and y each step: their bytes ride in the frame) are
    # self-contained records.
    assert seen["run"] == len(local[1]) + 2 * 4 and seen["sig"] > 10 * seen["run"]


def test_a_table_started_afresh_many_times_gives_the_same_results(remote, monkeypatch):
    net = model()
    local = train(copy.deepcopy(net), 3, "cpu")
    remote.synchronize()
    monkeypatch.setattr(m, "SIG_MAX", 5)  # the client starts afresh every 5 signatures
    monkeypatch.setattr(backend, "_OPS", {})  # and every op defines its signatures anew
    tables = set()
    got = train(net, 3, "cuda", lambda step: tables.add(id(remote.sigs)))
    assert_same_training(got, local)
    assert len(remote.sigs) <= 5 and len(tables) == 3
    monkeypatch.undo()
    remote.synchronize()


def test_a_new_connection_is_sent_the_table_again(remote):
    net = model()
    local = train(copy.deepcopy(net), 4, "cpu")

    def reconnect(step):
        if step in (1, 2):
            # The connection drops between steps (as a network blip would); the session and its
            # tensors stay on the agent, and its next op opens a new connection.
            remote.synchronize()
            defined = len(remote.sigs)
            remote._hang_up()
            remote.attached = False
            remote.lease_provider.release()
            assert defined and remote._sig_sent == 0

    got = train(net, 4, "cuda", reconnect)
    assert_same_training(got, local)
    assert remote._sig_sent == len(remote.sigs)


def test_frees_ride_on_the_next_op_and_memory_is_reused_within_a_batch(agent, own_session):
    with own_session(agent.address) as sess:
        x = torch.zeros(1 << 20, device="cuda")  # 4 MiB
        torch.cuda.synchronize()
        base = torch.cuda.max_memory_allocated()
        seen, restore = records(sess)
        try:
            for _ in range(50):  # one batch: no sync point, fewer ops than BATCH_MAX_OPS
                x = x + 1
        finally:
            restore()
        assert seen == {"sig": 50, "run": 0, "free": 0}
        assert float(x[0]) == 50.0
        # Each x + 1 found the previous x freed before it ran: at most two alive at a time.
        assert torch.cuda.max_memory_allocated() <= base + 2 * (4 << 20)


def test_no_float_is_baked_into_a_signature(remote):
    # 0.0 and -0.0 share a cache key (NaNs miss theirs): every float goes in the use record,
    # and a complex constant's key tells the signs of its zeros apart.
    for v in (-0.0, 0.0, -0.0, float("inf"), float("nan"), 2.5):
        got = torch.full((2,), v, device="cuda").cpu()
        want = torch.full((2,), v)
        assert torch.equal(got.signbit(), want.signbit()), v
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all()), v
    for c in (complex(1, -0.0), complex(1, 0.0)):
        got = torch.full((1,), c, device="cuda").cpu()
        assert bool(got.imag.signbit()) == (math.copysign(1, c.imag) < 0), c


def test_an_agent_that_reads_no_signatures_is_sent_run_records(agent, own_session):
    with own_session(agent.address) as sess:
        recv = sess._recv

        def older_agent():  # its hello reply lacks "signatures"
            reply, bufs = recv()
            reply.pop("signatures", None)
            return reply, bufs

        sess._recv = older_agent
        seen, restore = records(sess)
        try:
            x = torch.arange(4.0, device="cuda")
            for _ in range(3):
                x = x * 2.0 + 1.0
            assert x.tolist() == [7.0, 15.0, 23.0, 31.0]
        finally:
            restore()
        assert seen["sig"] == 0 and seen["run"] == sess.stats["ops"] > 6 and sess.sigs == []
