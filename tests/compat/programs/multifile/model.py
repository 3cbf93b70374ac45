"""The model module of a two-file project: ``train.py`` imports it as a sibling."""

from torch import nn


class TinyGRUClassifier(nn.Module):
    def __init__(self, vocab=30, d=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        _, h = self.gru(self.emb(tokens))
        return self.head(h[-1])
