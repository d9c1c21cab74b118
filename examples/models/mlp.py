"""A small MLP over a feature vector."""

from torch import nn

from .layers import mlp_block


class MLP(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(mlp_block(features, hidden), mlp_block(hidden, hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def build(features: int = 16, hidden: int = 64, classes: int = 10) -> MLP:
    return MLP(features, hidden, classes)
