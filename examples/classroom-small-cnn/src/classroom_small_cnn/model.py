"""The network: small_cnn, whose `head` gives 10-class logits."""

from __future__ import annotations

from torch import Tensor, nn

from .config import Config


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it supplies the shift.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Five top-level children, so freezing by name or by index reads naturally."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.block1 = nn.Sequential(conv_bn_relu(16, 32), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(conv_bn_relu(32, 64), nn.MaxPool2d(2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.block2(self.block1(self.stem(x)))))


def build_model(config: Config) -> nn.Module:
    return SmallCNN(config.model.num_classes)
