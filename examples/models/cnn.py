"""A small CNN for 32x32 images."""

from torch import nn

from .layers import ConvBlock


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(ConvBlock(3, channels), nn.MaxPool2d(2), ConvBlock(channels, 2 * channels), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, image):
        return self.head(self.features(image).flatten(1))


def build(channels: int = 16, classes: int = 10) -> SmallCNN:
    return SmallCNN(channels, classes)
