"""Multi-scale inputs with max fusion ("MSC", paper Sec. 3.3 and 4.1; DeepLab-v2
``train.prototxt`` of the ``*_MSC`` models: ``Interp`` shrink layers, shared ``res*``/``fc1``
weights, an ``Eltwise`` MAX of the scores and one ``SoftmaxWithLoss`` per branch).

The input is resized to each scale, every copy goes through the *same* network, and the score
maps are fused by taking, at each position, the maximum over scales. Training sums the
cross-entropy of every branch and of the fused map, each against labels downsampled (nearest)
to its own score map.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..inference import check_scales, scaled_size

PAPER_SCALES = (1.0, 0.75, 0.5)


class MSC(nn.Module):
    """Wraps a DeepLab model to run it at several input scales and fuse the scores by max.

    * train mode: ``msc(x)`` returns ``[s_1, ..., s_k, fused]``: the stride-8 scores
      ``(N, C, h_i, w_i)`` of each scale, in ``scales`` order and at their own sizes, then their
      element-wise max after resizing (bilinearly) to the largest scale's score map (scale 1 in
      the paper). Feed it to :func:`msc_loss`.
    * eval mode: ``msc(x)`` returns the fused scores upsampled bilinearly to the input size,
      like the plain model, so evaluation and prediction take it unchanged; ``upsample=False``
      returns the fused stride-8 scores.

    ``param_groups``, ``preprocess``, ``preprocessing``, ``config``, ``num_classes`` and
    ``layout`` are the wrapped model's. The weights are those of ``msc.model``: save and load
    ``msc.model`` (its state dict has no ``model.`` prefix).
    """

    def __init__(self, model: nn.Module, scales=PAPER_SCALES):
        super().__init__()
        self.model = model
        self.scales = check_scales(scales)

    # -- the wrapped model's interface ---------------------------------------------------------
    @property
    def preprocessing(self):
        return self.model.preprocessing

    @property
    def config(self) -> dict:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def layout(self) -> str:
        return self.model.layout

    def preprocess(self, images) -> torch.Tensor:
        return self.model.preprocess(images)

    def param_groups(self, lr: float, weight_decay: float = 5e-4) -> list[dict]:
        return self.model.param_groups(lr, weight_decay)

    # -- forward -------------------------------------------------------------------------------
    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stride-8 scores of ``x`` resized (bilinearly) by each scale, in ``scales`` order."""
        height, width = x.shape[-2:]
        outputs = []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(height, width, s),
                                                  mode="bilinear", align_corners=False)
            outputs.append(self.model(xs, upsample=False))
        return outputs

    @staticmethod
    def fuse(branches: list[torch.Tensor]) -> torch.Tensor:
        """Element-wise max of the score maps, each resized bilinearly to the largest one."""
        size = max((b.shape[-2:] for b in branches), key=lambda hw: hw[0] * hw[1])
        fused = None
        for b in branches:
            if b.shape[-2:] != size:
                b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
            fused = b if fused is None else torch.maximum(fused, b)
        return fused

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The fused stride-8 scores ``(N, C, h, w)`` at the largest scale's size."""
        return self.fuse(self.branches(x))

    def forward(self, x: torch.Tensor, upsample: bool = True):
        branches = self.branches(x)
        fused = self.fuse(branches)
        if self.training:
            return [*branches, fused]
        if not upsample:
            return fused
        return F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scales={self.scales}"


def msc_loss(outputs: list[torch.Tensor], labels: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over MSC's outputs (each branch and the fused map) of ``loss_fn(scores, labels_i)``,
    where ``labels_i`` are the ``(N, H, W)`` labels (255 = ignore) resized with nearest
    neighbour to that output's ``(h_i, w_i)`` (paper Sec. 3.3: one loss per scale plus the
    fused one). ``loss_fn`` is e.g. ``lambda s, y: segmentation_loss(s, y, "stride8")``.
    """
    total = None
    for scores in outputs:
        target = labels
        if labels.shape[-2:] != scores.shape[-2:]:
            target = F.interpolate(labels[:, None].float(), size=scores.shape[-2:],
                                   mode="nearest")[:, 0].to(labels.dtype)
        term = loss_fn(scores, target)
        total = term if total is None else total + term
    return total
