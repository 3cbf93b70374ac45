"""accelerate: ``Accelerator()`` picks the GPU; ``prepare``, ``backward``, a few steps."""

import torch
from _compat import DEVICE, checksum, report, seed
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

accelerator = Accelerator()
seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 3))
x = torch.randn(48, 10)
data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
loader = DataLoader(data, batch_size=12, shuffle=False)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

losses = []
for _epoch in range(2):
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()).item())

report(
    {
        "device": str(accelerator.device),
        "batch_device": str(xb.device),
        "losses": losses,
        "checksum": checksum(accelerator.unwrap_model(model)),
    }
)
assert accelerator.device.type == DEVICE
