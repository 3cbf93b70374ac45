"""A project split over files: ``python train.py`` imports ``model.py`` from beside it (and
the shared helpers one folder up), and loads batches with DataLoader workers."""

import os
import sys

import torch
from model import TinyGRUClassifier  # the sibling module
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _compat import DEVICE, checksum, report, seed  # noqa: E402


def main():
    seed(0)
    model = TinyGRUClassifier().to(DEVICE)
    tokens = torch.randint(0, 30, (40, 7))
    data = TensorDataset(tokens, tokens[:, 0] % 3)
    loader = DataLoader(data, batch_size=10, num_workers=2)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    losses = []
    for xb, yb in loader:
        loss = torch.nn.functional.cross_entropy(model(xb.to(DEVICE)), yb.to(DEVICE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    report(
        {
            "device": str(next(model.parameters()).device),
            "losses": losses,
            "checksum": checksum(model),
        }
    )


if __name__ == "__main__":
    main()
