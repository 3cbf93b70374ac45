"""Mixed precision the way the PyTorch AMP recipe writes it: autocast + ``torch.amp.GradScaler``."""

import torch
from _compat import DEVICE, checksum, report, seed
from torch import nn

seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(DEVICE)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
x, y = torch.randn(32, 16), torch.randn(32, 4)

losses, scales = [], []
for _ in range(4):
    with torch.autocast(device_type=DEVICE, dtype=torch.float16):
        out = model(x.to(DEVICE))
        loss = nn.functional.mse_loss(out.float(), y.to(DEVICE))
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(optimizer)
    scaler.update()
    losses.append(loss.item())
    scales.append(scaler.get_scale())

report(
    {
        "device": str(out.device),
        "autocast_dtype": str(out.dtype),
        "losses": losses,
        "scales": scales,
        "checksum": checksum(model),
    },
    rtol=5e-3,  # fp16 matmuls: CPU and the agent may round partial sums differently
    atol=1e-3,
)
