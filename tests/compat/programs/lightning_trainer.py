"""Lightning: ``Trainer(accelerator="gpu" | "cuda" | "auto", devices=1)`` for a few steps."""

import lightning as L
import torch
from _compat import DEVICE, report, seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(accelerator):
    seed(0)
    model = Regressor()
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    return {"device": str(trainer.strategy.root_device), "losses": model.losses}


# On a machine without a GPU a user's notebook says "cpu" where it would say "gpu"/"cuda".
explicit = ["gpu", "cuda"] if DEVICE == "cuda" else ["cpu", "cpu"]
runs = {"gpu": fit(explicit[0]), "cuda": fit(explicit[1]), "auto": fit("auto")}
report(
    {
        "device": runs["auto"]["device"],
        **{f"{k}_device": v["device"] for k, v in runs.items()},
        **{f"{k}_losses": v["losses"] for k, v in runs.items()},
    }
)
