"""Building blocks shared by the example models (a helper imported transitively)."""

import torch
from torch import nn


def mlp_block(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width_out), nn.GELU())


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5
