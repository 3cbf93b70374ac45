"""The pytorch/examples MNIST script's shape, on synthetic digits: a ``DataLoader`` with two
worker processes feeding a CNN on the GPU (workers only make CPU batches)."""

import torch
import torch.nn.functional as F
from _compat import DEVICE, checksum, report, seed
from torch import nn
from torch.utils.data import DataLoader, Dataset


class SyntheticDigits(Dataset):
    """Deterministic per index, so every worker makes the same samples as the main process."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(1, 12, 12, generator=g), i % 10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


def main():
    seed(0)
    model = Net().to(DEVICE)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    loader = DataLoader(
        SyntheticDigits(), batch_size=16, num_workers=2, pin_memory=DEVICE == "cuda"
    )
    losses = []
    for _epoch in range(2):
        model.train()
        for data, target in loader:
            data, target = data.to(DEVICE), target.to(DEVICE)
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    report({"device": str(data.device), "losses": losses, "checksum": checksum(model)})


if __name__ == "__main__":
    main()
