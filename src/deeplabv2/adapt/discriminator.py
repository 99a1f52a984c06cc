"""AdaptSegNet's fully convolutional discriminator (Tsai et al., CVPR 2018, Sec. 3.1) and the
adversarial terms built on it (also ADVENT's AdvEnt, Vu et al., CVPR 2019, Sec. 3.2).

Five 4x4 convolutions with stride 2 (64, 128, 256, 512, 1 channels), leaky ReLU 0.2 between
them: a ``(N, C, h, w)`` map in, a ``(N, 1, ~h/32, ~w/32)`` map of domain logits out
(source = 0, target = 1, as both papers label them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SOURCE, TARGET = 0.0, 1.0


class FCDiscriminator(nn.Module):
    """``(N, in_channels, h, w)`` -> ``(N, 1, h', w')`` domain logits (``h' = h / 32`` rounded as
    five stride-2, padding-1, 4x4 convolutions give)."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1)
                                   for a, b in zip(chans[:-1], chans[1:]))
        self.classifier = nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


def domain_loss(logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Binary cross-entropy of domain logits against ``domain`` (:data:`SOURCE` 0 or
    :data:`TARGET` 1) at every position, averaged."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, domain))


def adversarial_loss(discriminator: nn.Module, target_map: torch.Tensor) -> torch.Tensor:
    """The segmentation network's adversarial term: the discriminator, frozen for this term
    (its parameters get no gradient), should take the target map for a source one."""
    requires = [p.requires_grad for p in discriminator.parameters()]
    for p in discriminator.parameters():
        p.requires_grad_(False)
    try:
        return domain_loss(discriminator(target_map), SOURCE)
    finally:
        for p, r in zip(discriminator.parameters(), requires):
            p.requires_grad_(r)


def discriminator_loss(discriminator: nn.Module, source_map: torch.Tensor,
                       target_map: torch.Tensor) -> torch.Tensor:
    """The discriminator's own term on detached maps: source -> 0, target -> 1, each halved
    (AdaptSegNet, ADVENT)."""
    return 0.5 * (domain_loss(discriminator(source_map.detach()), SOURCE)
                  + domain_loss(discriminator(target_map.detach()), TARGET))
