"""timm: a tiny ViT and a ResNet built by name (random init), a few training steps each.

requires: timm"""

import timm
import torch
from _compat import DEVICE, checksum, report, seed

results = {}
for name, kw in [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)),
    ("resnet18", dict()),
]:
    seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    results[name] = {"losses": losses, "checksum": checksum(model)}

report(
    {"device": str(next(model.parameters()).device), **results},
    rtol=1e-3,
    atol=1e-4,
)
