"""The image models of the study (LEAF's FEMNIST and CelebA CNNs), exactly as SPEC §6 sizes them.

They take batches as the data cache stores them (uint8 pixels) and scale them
themselves, so a node's data stays 4x smaller in memory than float copies would be.
Pixels become [0, input_scale]: [0, 1] by default (SPEC §6). The reference system fed
CelebA's pixels to its CNN unscaled (0..255), and the study's CelebA learning rate
(0.001) was tuned for that, so the `celeba` preset sets `model.input_scale=255`.
"""

from __future__ import annotations

import torch
from torch import nn


def _scaled(images: torch.Tensor, input_scale: float) -> torch.Tensor:
    # What torchvision's to_dtype(scale=True) computes, without importing torchvision:
    # its import pulls in torch._dynamo and cost 2.5 s of every run's start-up.
    pixels = images.to(torch.float32)
    if not images.is_floating_point():
        pixels.mul_(1.0 / torch.iinfo(images.dtype).max)
    return pixels if input_scale == 1.0 else pixels * input_scale


class FemnistCNN(nn.Module):
    """conv5x5(32) relu pool, conv5x5(64) relu pool, fc 3136->512 relu, fc 512->62: 1,690,046 parameters."""

    def __init__(self, num_classes: int = 62, input_scale: float = 1.0):
        super().__init__()
        self.input_scale = input_scale
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (batch, 28, 28)."""
        return self.classifier(self.features(_scaled(images, self.input_scale).unsqueeze(1)))


class CelebaCNN(nn.Module):
    """Four blocks conv3x3(32, same) pool relu (84->42->21->10->5), fc 800->2: 30,242 parameters."""

    def __init__(self, num_classes: int = 2, channels: int = 32, input_scale: float = 1.0):
        super().__init__()
        self.input_scale = input_scale
        blocks, in_channels = [], 3
        for _ in range(4):
            blocks += [
                nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            in_channels = channels
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(5 * 5 * channels, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (batch, 84, 84, 3), channels last as decoded."""
        return self.classifier(self.features(_scaled(images, self.input_scale).permute(0, 3, 1, 2)))
