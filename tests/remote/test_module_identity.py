"""Moving a module to the remote GPU keeps its parameters the same objects, as on CUDA.

On a real GPU ``model.to("cuda")`` changes each ``Parameter`` in place, so code that holds
parameters from before the move (an optimizer, tied weights, a list of frozen weights)
keeps working. These are the CUDA behaviours that code relies on.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def test_an_optimizer_built_before_the_move_trains_the_moved_model(remote):
    model = _mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)  # before .to("cuda"), as accelerate does
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    model.to("cuda")
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(4):
        loss = F.mse_loss(model(x.cuda()), y.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = F.mse_loss(reference(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert all(p.is_cuda for g in opt.param_groups for p in g["params"])
    torch.testing.assert_close(model[0].weight.cpu(), reference[0].weight.detach())


def test_parameters_are_the_same_objects_and_stay_parameters(remote):
    model = _mlp()
    model[3].bias.requires_grad_(False)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    model.cuda()
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, p in after.items():
        assert p is before[name], name
        assert isinstance(p, nn.Parameter) and p.is_cuda and p.is_leaf
    assert not model[3].bias.requires_grad and model[0].weight.requires_grad
    assert list(model.state_dict()) == keys
    # Buffers are new tensors, as on CUDA, and on the GPU.
    assert model[1].running_mean.is_cuda and model[1].num_batches_tracked.is_cuda


def test_tied_weights_stay_tied(remote):
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight  # as Hugging Face LMs tie input and output

        def forward(self, ids):
            return self.head(self.embed(ids))

    lm = TinyLM()
    count = len(list(lm.parameters()))
    lm.to("cuda")
    assert lm.head.weight is lm.embed.weight and lm.embed.weight.is_cuda
    assert len(list(lm.parameters())) == count  # named_parameters() still dedups
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    F.cross_entropy(lm(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    torch.testing.assert_close(lm.head.weight.cpu(), lm.embed.weight.cpu())


def test_hooks_survive_the_move(remote):
    model = _mlp()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.device))
    model.eval().cuda()
    model(torch.randn(2, 4, device="cuda"))
    assert seen == [torch.device("cuda", 0)]


def test_gradients_move_with_their_parameters(remote):
    model = nn.Linear(3, 2)
    model(torch.randn(5, 3)).sum().backward()
    grad = model.weight.grad.clone()
    model.cuda()
    assert model.weight.grad.is_cuda
    torch.testing.assert_close(model.weight.grad.cpu(), grad)
    model.cpu()
    assert model.weight.grad.device.type == "cpu"
    torch.testing.assert_close(model.weight.grad, grad)


def test_moving_back_to_the_cpu_keeps_the_objects_and_the_values(remote):
    model = _mlp()
    weight = model[0].weight
    values = weight.detach().clone()
    model.cuda()
    model.cpu()
    assert model[0].weight is weight and type(weight) is nn.Parameter
    assert weight.device.type == "cpu" and weight.requires_grad
    torch.testing.assert_close(weight.detach(), values)


def test_dtype_changes_on_the_gpu_keep_objects_and_values(remote):
    model = nn.Linear(4, 3)
    weight = model.weight
    expected = weight.detach().to(torch.float16)
    model.cuda().half()
    assert model.weight is weight and weight.dtype == torch.float16 and weight.is_cuda
    assert torch.equal(weight.cpu(), expected)
    model.to("cuda", torch.float64)
    assert model.weight is weight and torch.equal(weight.cpu(), expected.double())


def test_to_empty_materialises_a_meta_model_on_the_gpu(remote):
    model = nn.Linear(4, 3, device="meta")
    model.to_empty(device="cuda")
    assert model.weight.is_cuda and model.weight.shape == (3, 4)
    nn.init.ones_(model.weight)
    assert model.weight.sum().item() == 12.0


def test_a_weakly_referenced_parameter_still_moves(remote):
    # swap_tensors refuses weakly referenced tensors: such a module still moves, with new
    # Parameter objects (torch's behaviour for tensor types it cannot swap).
    model = nn.Linear(2, 2)
    ref = weakref.ref(model.weight)
    values = model.weight.detach().clone()
    model.cuda()
    assert model.weight.is_cuda and isinstance(model.weight, nn.Parameter)
    torch.testing.assert_close(model.weight.cpu(), values)
    assert ref() is not model.weight


def test_cpu_only_moves_are_left_to_torch(remote):
    model = nn.Linear(2, 2)
    weight = model.weight
    model.double()
    assert model.weight is weight and type(weight) is nn.Parameter
    assert weight.dtype == torch.float64


def test_a_parameter_held_by_a_live_graph_still_moves(remote):
    model = nn.Linear(2, 1)
    out = model(torch.ones(1, 2))  # its graph holds the CPU weight
    model.cuda()
    assert model.weight.is_cuda
    out.sum().backward()  # the CPU graph still runs
