"""Plain nn.Module builders. A net is called as `builder(input_shape, num_outputs, **config)`.

A user's own net plugs in the same way: any importable callable with those two arguments
(see README, "Your own model").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from kiln.errors import InvalidArgument, require


def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    hidden_sizes: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> nn.Sequential:
    """Flatten, then Linear-ReLU(-Dropout) blocks and a linear head."""
    require(
        all(size >= 1 for size in hidden_sizes),
        "hidden_sizes",
        f"sizes must be >= 1, got {list(hidden_sizes)}",
    )
    require(0 <= dropout < 1, "dropout", f"must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (16, 32),
    hidden_size: int = 64,
    dropout: float = 0.25,
) -> nn.Sequential:
    """3x3 conv-ReLU blocks, one 2x2 max-pool, then a small MLP head. Input: (channels, height, width)."""
    if len(input_shape) == 1:
        raise InvalidArgument(
            "input_shape",
            f"a CNN needs images (channels, height, width), but the data gives flat feature vectors "
            f"of {input_shape[0]} values; use model=mlp for tables and feature vectors",
        )
    require(
        len(input_shape) == 3,
        "input_shape",
        f"a CNN needs images (channels, height, width), got {tuple(input_shape)}",
    )
    require(
        len(channels) >= 1 and all(c >= 1 for c in channels),
        "channels",
        f"must be positive, got {list(channels)}",
    )
    require(0 <= dropout < 1, "dropout", f"must be in [0, 1), got {dropout}")
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers += [nn.MaxPool2d(2), nn.Flatten()]
    flat = in_channels * (height // 2) * (width // 2)
    layers += [
        nn.Linear(flat, hidden_size),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_size, num_outputs),
    ]
    return nn.Sequential(*layers)
