"""The network: small_cnn with a new 10-class head at `head`."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from .config import Config

HEAD = "head"
# The model's blocks are its top-level children (train.layer_decay, train.grad_checkpointing and plan/suggest
# count them); name containers here to count theirs.
BLOCK_CONTAINERS: tuple[str, ...] = ()
# ImageNet statistics: images are normalised with them (and resized to
# image_size via a 256/224 larger resize, then a centre crop).
IMAGE_PREPROCESSING = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_fraction": 224 / 256,
}


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # The conv has no bias: the BatchNorm right after it supplies the shift.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Five top-level children, so freezing by name or index reads naturally."""

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


def preprocessing() -> dict:
    return IMAGE_PREPROCESSING


def blocks_with_parameters(model: nn.Module) -> list[str]:
    """The blocks that hold parameters, in depth order; the last holds the head.

    Top-level children, with each container of model.BLOCK_CONTAINERS
    replaced by its children (a ViT's encoder layers, a CNN's stages).
    """

    def expand(prefix: str, module: nn.Module) -> Iterator[str]:
        for name, child in module.named_children():
            if any(True for _ in child.parameters()):
                full = prefix + name
                yield from expand(full + ".", child) if full in BLOCK_CONTAINERS else [full]

    return list(expand("", model))
