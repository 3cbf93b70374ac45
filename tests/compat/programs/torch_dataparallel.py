"""``nn.DataParallel`` on one GPU, as older training scripts wrap every model."""

import torch
from _compat import DEVICE, checksum, report, seed
from torch import nn

seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 5)
)
model = nn.DataParallel(model).to(DEVICE)
# On one GPU it wraps cuda:0; without a GPU it is a plain pass-through.
assert model.device_ids == ([0] if DEVICE == "cuda" else []), model.device_ids
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))

losses = []
for _ in range(3):
    loss = nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

report(
    {
        "device": str(next(model.module.parameters()).device),
        "losses": losses,
        "running_mean": model.module[1].running_mean.cpu().tolist(),
        "checksum": checksum(model.module),
    }
)
