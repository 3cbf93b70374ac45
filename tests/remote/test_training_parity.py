"""Training loops give the same losses on the remote GPU as locally on the CPU.

Each model is built once on the CPU, copied, and trained for a few steps locally and with
``.to("cuda")`` (which is the agent). On a CPU agent the kernels are the same, so the
tolerance is tight; on a real GPU it allows for different kernels (TF32 convs...).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import AGENT_DEVICE

RTOL = 1e-5 if AGENT_DEVICE == "cpu" else 2e-3
ATOL = 1e-6 if AGENT_DEVICE == "cpu" else 1e-4
# Dropout masks only match bit for bit when the agent draws them from the CPU generator.
P_DROP = 0.1 if AGENT_DEVICE == "cpu" else 0.0


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Dropout(P_DROP), nn.Linear(64, 5))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.02)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(P_DROP), nn.Linear(4 * d, d)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        b, t = idx.shape
        x = self.emb(idx) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.lnf(x))


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)
        self.out = nn.Linear(16, 30)

    def forward(self, idx):
        h, _ = self.lstm(self.emb(idx))
        return self.out(h)


def _data(kind, g):
    if kind == "mlp":
        return torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
    if kind == "cnn":
        return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    idx = torch.randint(0, 50 if kind == "transformer" else 30, (4, 12), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


CASES = {
    "mlp": (MLP, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "cnn": (CNN, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4)),
    "transformer": (TinyTransformer, lambda p: torch.optim.AdamW(p, lr=3e-3)),
    "lstm": (LSTMTagger, lambda p: torch.optim.Adam(p, lr=1e-2)),
}


def train(model, make_opt, device, kind, steps=4):
    model = model.to(device)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    losses = []
    if device == "cuda":
        torch.cuda.manual_seed(7)
    else:
        torch.manual_seed(7)
    x, y = (t.to(device) for t in _data(kind, g))  # one batch: the loss must fall
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(CASES))
def test_training_matches_local(remote, kind):
    cls, make_opt = CASES[kind]
    torch.manual_seed(0)
    model = cls()
    local_losses, local_state = train(copy.deepcopy(model), make_opt, "cpu", kind)
    remote_losses, remote_state = train(copy.deepcopy(model), make_opt, "cuda", kind)
    torch.testing.assert_close(remote_losses, local_losses, rtol=RTOL, atol=ATOL)
    # Adam divides by sqrt(v): gradients that are ~0 in theory (the key bias under softmax)
    # turn rounding differences between attention kernels into 1e-3-sized steps.
    for name, value in local_state.items():
        torch.testing.assert_close(remote_state[name], value, rtol=1e-2, atol=2e-3)
    assert local_losses[-1] < local_losses[0]


def test_optimizers_take_the_foreach_path(remote):
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [torch.zeros(3, device="cuda", requires_grad=True)]
    assert _default_to_fused_or_foreach(params, differentiable=False, use_fused=False) == (
        False,
        True,
    )


def test_autocast_bf16_runs_matmuls_in_bf16_and_trains(remote):
    torch.manual_seed(0)
    model = TinyTransformer().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    x, y = (t.cuda() for t in _data("transformer", g))
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            assert loss.dtype == torch.float32  # cross entropy is on the float32 list
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.qkv.weight.dtype == torch.float32 and model.qkv.weight.grad.dtype == torch.float32
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_under_autocast_recomputes_in_the_same_dtypes(remote, reentrant):
    # torch.utils.checkpoint saves the autocast state of the inputs' device ("cuda") and
    # recomputes under it: the recomputation must cast as the forward did (it used to run in
    # float32 and abort the process on the mismatch).
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).cuda()
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    grads = []
    for use_checkpoint in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = checkpoint(block, x, use_reentrant=reentrant) if use_checkpoint else block(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append([p.grad.cpu() for p in block.parameters()] + [x.grad.cpu()])
        block.zero_grad()
        x.grad = None
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_no_grad_and_inplace_views_alias_like_cuda(remote):
    x = torch.arange(12.0).reshape(3, 4)
    r = x.clone().cuda()
    with torch.no_grad():
        r[1].mul_(10)
        r[:, 2] += 1
        r.t()[0].zero_()
    x[1].mul_(10)
    x[:, 2] += 1
    x.t()[0].zero_()
    torch.testing.assert_close(r.cpu(), x)
    v = r.view(-1)
    v[0] = 42
    assert r[0, 0].item() == 42


def test_inplace_on_view_of_leaf_backprops(remote):
    a = torch.randn(4, 3, requires_grad=True)
    b = a.detach().clone().cuda().requires_grad_()
    for t in (a, b):
        y = t * 2
        y[1:3].mul_(3)
        y.sum().backward()
    torch.testing.assert_close(b.grad.cpu(), a.grad)


def test_dropout_is_seeded_remotely(remote):
    x = torch.ones(1000, device="cuda")
    torch.cuda.manual_seed(123)
    a = F.dropout(x, 0.5).cpu()
    torch.cuda.manual_seed(123)
    b = F.dropout(x, 0.5).cpu()
    torch.cuda.manual_seed(124)
    c = F.dropout(x, 0.5).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attention_ships_as_one_fused_op_each_way(remote):
    names = []
    orig, orig_sig = remote.enqueue, remote.enqueue_sig
    remote.enqueue = lambda name, *a: (names.append(name), orig(name, *a))[1]
    # A signature record names its op through the session's table.
    remote.enqueue_sig = lambda rec: (
        names.append(remote.sigs[rec[0]]["name"]),
        orig_sig(rec),
    )[1]
    try:
        q = torch.randn(2, 4, 16, 32, device="cuda", requires_grad=True)
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()
    finally:
        remote.enqueue, remote.enqueue_sig = orig, orig_sig
    attn = [n for n in names if "attention" in n]
    assert attn == [
        "aten::_scaled_dot_product_fused_attention_overrideable.default",
        "aten::_scaled_dot_product_fused_attention_overrideable_backward.default",
    ]
    assert not any("bmm" in n or "softmax" in n for n in names)
