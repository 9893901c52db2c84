"""Small models for the benchmarks: cheap enough to train on two CPU cores.

* :class:`SmallCNN` — two 5x5 conv layers with max-pooling and two Linear layers, for 28x28
  (Fashion-MNIST) or any other small single-channel image; about 0.9 M multiply-adds a sample.
* :class:`MLP` — large Linear layers only: the case sufficient factors are made for (SFB; Xie
  et al., "Lighter-communication distributed machine learning via sufficient factor
  broadcasting", UAI 2016), where ``batch * (in + out)`` is far below ``in * out``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "linear_layers"]


class SmallCNN(nn.Module):
    """conv5x5(c1) -> ReLU -> maxpool2 -> conv5x5(c2) -> ReLU -> maxpool2 -> Linear -> ReLU ->
    Linear(classes). Padding keeps an 8x8 input usable (the digits fallback)."""

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: tuple[int, int] = (8, 16),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (channels, height, width) >= 1, got {in_shape}")
        c_in, height, width = in_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * (height // 4) * (width // 4)
        if flat == 0:
            raise ValueError(f"input {height}x{width} is too small for two 2x2 poolings")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear(classes)."""

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (1024, 1024), num_classes: int = 10
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        if min(widths) < 1 or num_classes < 1:
            raise ValueError(f"layer widths must be >= 1, got {widths} and {num_classes} classes")
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in itertools.pairwise(widths):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules by qualified name (the layers SFB applies to)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
