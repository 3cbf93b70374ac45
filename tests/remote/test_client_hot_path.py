"""The client's per-op fast path (issue #15) gives the answers a GPU gives.

Output shapes come from a cache of meta-inference results keyed by the op and its arguments'
metadata; these tests pin down what that key must tell apart and what it may not.
"""

from __future__ import annotations

import copy

import torch

from jupyter_elastic_gpu.remote import backend


def test_metadata_changed_in_place_is_seen_by_the_next_op(remote):
    x = torch.arange(6.0, device="cuda").reshape(2, 3)
    x.t_()
    assert x.shape == (3, 2) and torch.equal(x.cpu(), torch.arange(6.0).reshape(2, 3).t())
    assert (x + torch.ones(3, 2, device="cuda")).shape == (3, 2)
    x.unsqueeze_(0)
    assert (x * 2).shape == (1, 3, 2)
    y = torch.zeros(4, device="cuda")
    y.resize_(2, 5)
    assert (y + 1).shape == (2, 5) and (y + 1).cpu().shape == (2, 5)
    y.as_strided_((2, 2), (1, 2))
    assert y.stride() == (1, 2) and (y * 1).shape == (2, 2)


def test_assigning_data_rebinds_the_tensor_as_on_cuda(remote):
    a = torch.zeros(2, 3, device="cuda")
    b = torch.ones(4, device="cuda")
    a.data = b
    assert a.shape == (4,) and torch.equal((a + 1).cpu(), torch.full((4,), 2.0))
    a.add_(1)  # .data shares storage, as it does on a GPU
    assert torch.equal(b.cpu(), torch.full((4,), 2.0))
    w = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    w.data = torch.arange(3.0, device="cuda")
    assert isinstance(w, torch.nn.Parameter) and w.tolist() == [0.0, 1.0, 2.0]


def test_float_scalars_do_not_split_the_cache_of_elementwise_ops(remote, monkeypatch):
    x = torch.randn(8, device="cuda")
    expect = x.cpu()
    inferred = []
    infer = backend._infer
    monkeypatch.setattr(backend, "_infer", lambda *a: inferred.append(a[0]) or infer(*a))
    for s in (1.5, 0.25, -3.0, 1e-8):
        assert torch.allclose((x * s + s).cpu(), expect * s + s)
    assert len(inferred) <= 2  # the first mul and add; later scalars reuse their entries


def test_the_kind_of_scalar_still_decides_the_result_type(remote):
    i = torch.arange(4, device="cuda")
    assert (i * 2).dtype == torch.int64 and (i * 2.5).dtype == torch.float32
    assert (i * 3).dtype == torch.int64 and (i * 0.5).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert (i > 1.5).dtype == torch.bool and (i > 1.5).tolist() == [False, False, True, True]


def test_adamw_steps_reuse_the_cached_metadata(remote, monkeypatch):
    # Bias corrections and scheduled learning rates are new float scalars at every step.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    local = copy.deepcopy(model)
    model.cuda()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, local)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.7) for o in opts]
    data = torch.randn(16, 4)
    inferred = []

    def step(step_no):
        if step_no == 2:
            infer = backend._infer
            monkeypatch.setattr(backend, "_infer", lambda *a: inferred.append(a[0]) or infer(*a))
        for m, o, s, d in zip((model, local), opts, scheds, (data.cuda(), data), strict=True):
            o.zero_grad()
            m(d).square().mean().backward()
            o.step()
            s.step()

    for k in range(5):
        step(k)
    assert inferred == []
    for p, q in zip(model.parameters(), local.parameters(), strict=True):
        assert torch.allclose(p.cpu(), q, rtol=1e-5, atol=1e-6)
