"""The ASPP head of DeepLab v2: parallel atrous 3x3 convolutions whose scores are summed.

Paper Sec. 3.3 and Fig. 4 (ASPP-L): four branches at rates 6, 12, 18, 24 on the stride-8
features, each producing class scores, fused by *summation* of all four (the widely copied
PyTorch port returns after adding only the first two).
"""

from __future__ import annotations

import torch
from torch import nn

#: ``"aspp"``: every branch summed (the paper, ADVENT); ``"adaptsegnet"``: branches 0 and 1
#: only, the function AdaptSegNet's ``Classifier_Module`` computes (its ``return`` sits inside
#: the summing loop), so that checkpoints trained with it are reproduced. Branches 2 and 3 stay
#: in the state dict either way.
HEAD_MODES = ("aspp", "adaptsegnet")


class ASPP(nn.Module):
    """``(N, in_channels, h, w)`` features -> ``(N, num_classes, h, w)`` summed branch scores."""

    def __init__(self, in_channels: int, num_classes: int,
                 atrous_rates: tuple[int, ...] = (6, 12, 18, 24), head_mode: str = "aspp"):
        super().__init__()
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {', '.join(HEAD_MODES)}, got "
                             f"{head_mode!r}")
        self.head_mode = head_mode
        self.atrous_rates = tuple(atrous_rates)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            for r in self.atrous_rates)
        for conv in self.convs:  # cf. DeepLab-v2 train.prototxt: fc1_* gaussian std 0.01, bias 0
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def summed_convs(self) -> list[nn.Conv2d]:
        """The branches whose scores are summed (all, or the first two in AdaptSegNet mode)."""
        return list(self.convs[:2] if self.head_mode == "adaptsegnet" else self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self.summed_convs()
        out = convs[0](x)
        for conv in convs[1:]:
            out = out + conv(x)
        return out

    def classifier_parameters(self):
        """The newly initialised classifier (all of ASPP: lr x10 weights / x20 biases)."""
        return self.parameters()

    def extra_repr(self) -> str:
        return f"head_mode={self.head_mode!r}"
