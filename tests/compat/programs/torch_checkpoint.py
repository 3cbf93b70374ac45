"""Activation checkpointing (``torch.utils.checkpoint``), reentrant and not, through dropout.

The recomputed forward must draw the same dropout masks as the first one (checkpoint saves
and restores the GPU's RNG state), so its gradients equal a plain backward's from the same
seed. The masks come from the device's own generator: the gradients' values are compared
within each run, not between runs."""

import torch
from _compat import DEVICE, report, seed
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 16))

    def forward(self, x):
        return x + self.ff(x)


seed(0)
blocks = nn.ModuleList(Block() for _ in range(3)).to(DEVICE)
x = torch.randn(8, 16)


def grads(mode):
    torch.manual_seed(5)
    if DEVICE == "cuda":
        torch.cuda.manual_seed_all(5)
    blocks.zero_grad()
    h = x.to(DEVICE).requires_grad_()
    for b in blocks:
        h = b(h) if mode == "plain" else checkpoint(b, h, use_reentrant=mode == "reentrant")
    h.square().mean().backward()
    return torch.cat([p.grad.flatten() for p in blocks.parameters()]).cpu()


plain = grads("plain")
gaps = {m: (grads(m) - plain).abs().max().item() for m in ("reentrant", "non_reentrant")}
with torch.no_grad():
    blocks.eval()
    h = x.to(DEVICE)
    for b in blocks:
        h = b(h)

report(
    {
        "device": str(h.device),
        "replays_dropout": all(g < 1e-6 for g in gaps.values()),
        "max_gap": gaps,
        "eval_out": h.sum().item(),
    },
    atol=1e-6,
)
