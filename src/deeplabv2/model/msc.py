"""Multi-scale inputs with max fusion ("MSC", paper Sec. 3.3 and 4.1; DeepLab-v2
``train.prototxt`` of the ``*_MSC`` models: ``Interp`` shrink layers, shared ``res*``/``fc1``
weights, an ``Eltwise`` MAX of the scores and one ``SoftmaxWithLoss`` per branch).

The input is resized to each scale, every copy goes through the *same* network, and the score
maps are fused by taking, at each position, the maximum over scales. Training sums the
cross-entropy of every branch and of the fused map, each against labels shrunk to its own
score map. Sizes, resizing and label shrinking follow the model's
:class:`~deeplabv2.model.alignment.Alignment` (Caffe's ``Interp`` by default: 321 -> 241 and
161 at 0.75 and 0.5, score maps 41/31/21, corner-aligned bilinear resizing).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .alignment import Alignment, get_alignment
from .deeplab import NetworkWrapper

PAPER_SCALES = (1.0, 0.75, 0.5)


def check_scales(scales) -> tuple[float, ...]:
    """A scale or a list of them as a tuple of positive floats; ValueError naming a bad one."""
    if isinstance(scales, (int, float)):
        scales = (scales,)
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales must name at least one scale, got an empty list")
    for s in scales:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scales must be positive, got {s} in {list(scales)}")
    return scales


class MSC(NetworkWrapper):
    """Wraps a DeepLab model to run it at several input scales and fuse the scores by max.

    * train mode: ``msc(x)`` returns ``[s_1, ..., s_k, fused]``: the stride-8 scores
      ``(N, C, h_i, w_i)`` of each scale, in ``scales`` order and at their own sizes, then their
      element-wise max after resizing (bilinearly) to the largest scale's score map (scale 1 in
      the paper). Feed it to :func:`msc_loss` with :meth:`input_sizes`.
    * eval mode: ``msc(x)`` returns the fused scores upsampled to the input size, like the
      plain model, so evaluation and prediction take it unchanged (the paper's test-time MSC,
      ``Eltwise MAX`` in the released test prototxt); ``upsample=False`` returns the fused
      stride-8 scores.

    ``preprocess``, ``preprocessing``, ``alignment``, ``config`` and ``num_classes`` are the
    wrapped model's as it is when wrapped (a :class:`~.deeplab.NetworkWrapper`: set the
    model's alignment or load its weights before wrapping it); ``param_groups`` and ``layout``
    ask the wrapped model. The weights are those of ``msc.model``: save and load ``msc.model``
    (its state dict has no ``model.`` prefix).
    """

    def __init__(self, model: nn.Module, scales=PAPER_SCALES):
        super().__init__(model)
        self.model = model
        self.scales = check_scales(scales)

    # -- the wrapped model's training interface ------------------------------------------------
    @property
    def layout(self) -> str:
        return self.model.layout

    def param_groups(self, lr: float, weight_decay: float = 5e-4,
                     style: str = "deeplab") -> list[dict]:
        return self.model.param_groups(lr, weight_decay, style)

    # -- forward -------------------------------------------------------------------------------
    def input_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The input size each output of train mode was computed from: every scale's resized
        input, then the largest one's for the fused map (321 -> [321, 241, 161, 321])."""
        sizes = [self.alignment.scaled_size(height, width, s) for s in self.scales]
        return [*sizes, max(sizes, key=lambda hw: hw[0] * hw[1])]

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stride-8 scores of ``x`` resized (bilinearly) by each scale, in ``scales`` order."""
        return [self.model(self.alignment.rescale(x, s), upsample=False) for s in self.scales]

    def fuse(self, branches: list[torch.Tensor]) -> torch.Tensor:
        """Element-wise max of the score maps, each resized bilinearly to the largest one."""
        size = max((b.shape[-2:] for b in branches), key=lambda hw: hw[0] * hw[1])
        fused = None
        for b in branches:
            b = self.alignment.resize(b, size)
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
        return self.alignment.upsample(fused, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"scales={self.scales}"


def msc_loss(outputs: list[torch.Tensor], labels: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             input_sizes: list[tuple[int, int]] | None = None,
             alignment: Alignment | str | None = None) -> torch.Tensor:
    """Sum over MSC's outputs (each branch and the fused map) of ``loss_fn(scores, labels_i)``,
    where ``labels_i`` are the ``(N, H, W)`` labels (255 = ignore) shrunk to that output's
    ``(h_i, w_i)`` cells by ``alignment`` (paper Sec. 3.3: one loss per scale plus the fused
    one). ``input_sizes`` (from :meth:`MSC.input_sizes`) tells where each output's cells sit;
    without it every output is taken as computed from the labels' own size. ``loss_fn`` is
    e.g. ``lambda s, y: segmentation_loss(s, y, "stride8")``.
    """
    align = get_alignment(alignment)
    sizes = input_sizes or [None] * len(outputs)
    if len(sizes) != len(outputs):
        raise ValueError(f"{len(outputs)} MSC outputs but {len(sizes)} input sizes")
    total = None
    for scores, size in zip(outputs, sizes):
        target = labels
        if labels.shape[-2:] != scores.shape[-2:]:
            target = align.shrink_labels(labels, scores.shape[-2:], input_size=size)
        term = loss_fn(scores, target)
        total = term if total is None else total + term
    return total
