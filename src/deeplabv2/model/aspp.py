"""The ASPP head of DeepLab v2: parallel atrous 3x3 convolutions whose scores are summed.

Paper Sec. 3.3 and Fig. 4 (ASPP-L): four branches at rates 6, 12, 18, 24 on the stride-8
features, each producing class scores, fused by *summation* of all four (the widely copied
PyTorch port returns after adding only the first two).
"""

from __future__ import annotations

import torch
from torch import nn


class ASPP(nn.Module):
    """``(N, in_channels, h, w)`` features -> ``(N, num_classes, h, w)`` summed branch scores."""

    def __init__(self, in_channels: int, num_classes: int,
                 atrous_rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.atrous_rates = tuple(atrous_rates)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            for r in self.atrous_rates)
        for conv in self.convs:  # cf. DeepLab-v2 train.prototxt: fc1_* gaussian std 0.01, bias 0
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out
