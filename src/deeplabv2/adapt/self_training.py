"""The self-training core shared by DACS and DAFormer's training strategy (and the methods built
on them): teacher pseudo-labels with the confidence-share weight and its margins, and DAFormer's
thing-class ImageNet feature distance. The EMA teacher, ClassMix and the strong augmentation
are in :mod:`.mix`; :class:`~deeplabv2.adapt.methods.SelfTraining` puts them on the loop.

* :func:`pseudo_labels`: the teacher's arg-max labels and one weight per pixel, the share of
  the batch's pixels whose confidence is at least the threshold (DACS "threshold_uniform";
  DAFormer mmseg/models/uda/dacs.py: ``torch.sum(ps_large_p) / ps_size`` over the batch),
  with :func:`apply_margins`: zero in the crop's top/bottom rows and left/right columns
  (DAFormer experiments.py ``plcrop``: ``pseudo_weight_ignore_top=15``,
  ``pseudo_weight_ignore_bottom=120``: rectification artefacts at the top, the ego car at the
  bottom of Cityscapes), or with :func:`apply_image_margins` in the rows/columns of the whole
  target image the crop was cut from (HRDA's plcrop 'v2', ``crop_pseudo_margins``
  [30, 240, 30, 30]: lhoyer/HRDA mmseg/datasets/cityscapes.py sets a ``valid_pseudo_mask`` of
  the 1024x2048 image to 0 in its margins before the pipeline crops and flips it with the
  image; uda/dacs.py multiplies the pseudo-weight by it);
* :func:`downscale_labels_by_majority`: DAFormer's ``downscale_label_ratio``
  (mmseg/utils/utils.py): each cell of the feature grid takes the most frequent value of its
  ``s x s`` block of labels (255 counted as a value of its own), and 255 where that value covers
  less than ``min_ratio`` of the block;
* :func:`feature_distance`: ``calc_feat_dist``/``masked_feat_dist`` of the same file: the L2
  norm over channels of the student's minus the frozen ImageNet backbone's last-stage features,
  averaged over the cells whose downscaled label is a thing class.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .mix import IGNORE_INDEX, confidence_weight

#: DAFormer's thing classes in the 19 Cityscapes train ids (configs/_base_/uda/
#: dacs_a999_fdthings.py ``imnet_feature_dist_classes``): traffic light, traffic sign, person,
#: rider, car, truck, bus, train, motorcycle, bicycle
THING_CLASSES_19 = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
#: DAFormer's pseudo-label margins [top, bottom, left, right] (experiments.py ``plcrop``)
DAFORMER_MARGINS = (15, 120, 0, 0)


def apply_margins(weights: torch.Tensor, margins) -> torch.Tensor:
    """Zero ``(N, H, W)`` ``weights`` in the first ``top`` and last ``bottom`` rows and the first
    ``left`` and last ``right`` columns (in place; returned). ``margins`` ``[top, bottom, left,
    right]`` or None (nothing)."""
    if margins is None:
        return weights
    top, bottom, left, right = (int(v) for v in margins)
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pseudo-label margins must be >= 0, got {list(margins)}")
    if top:
        weights[:, :top, :] = 0
    if bottom:
        weights[:, -bottom:, :] = 0
    if left:
        weights[:, :, :left] = 0
    if right:
        weights[:, :, -right:] = 0
    return weights


def apply_image_margins(weights: torch.Tensor, margins, crop_boxes: torch.Tensor
                        ) -> torch.Tensor:
    """Zero ``(N, H, W)`` crop ``weights`` where the crop covers the first ``top`` / last
    ``bottom`` rows or the first ``left`` / last ``right`` columns of the whole image it was
    cut from (in place; returned). ``crop_boxes`` ``(N, 5)``: per crop ``(top, left, height,
    width, flipped)`` as :class:`~deeplabv2.data.transforms.TrainTransform` gives them, the
    corner in the (flipped, when ``flipped``) image and that image's size; ``margins`` are of
    the image before the flip, so a flipped image has its ``left`` margin on the right.
    Crop pixels past the image (padding) count as outside it (> its last row/column)."""
    if margins is None:
        return weights
    top, bottom, left, right = (int(v) for v in margins)
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pseudo-label margins must be >= 0, got {list(margins)}")
    if crop_boxes.ndim != 2 or crop_boxes.shape != (weights.shape[0], 5):
        raise ValueError(f"crop boxes must be (N, 5) for {weights.shape[0]} crops, got "
                         f"{tuple(crop_boxes.shape)}")
    h, w = weights.shape[-2:]
    rows = torch.arange(h, device=weights.device)
    cols = torch.arange(w, device=weights.device)
    for i, (y0, x0, ih, iw, flipped) in enumerate(crop_boxes.tolist()):
        lo, hi = (right, left) if flipped else (left, right)
        y, x = rows + y0, cols + x0
        out_rows = (y < top) | ((y >= ih - bottom) if bottom else torch.zeros_like(y, dtype=bool))
        out_cols = (x < lo) | ((x >= iw - hi) if hi else torch.zeros_like(x, dtype=bool))
        weights[i][out_rows[:, None] | out_cols[None, :]] = 0
    return weights


@torch.no_grad()
def pseudo_labels(teacher_logits: torch.Tensor, threshold: float, margins=None,
                  crop_boxes: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(N, C, H, W)`` teacher logits -> ``(labels, weights, share)``: the arg-max labels
    ``(N, H, W)``, the per-pixel weights ``(N, H, W)`` (``share`` everywhere, 0 in the margins)
    and ``share``, the fraction of the batch's pixels whose softmax maximum is at least
    ``threshold``. The margins are of the crop (:func:`apply_margins`), or with
    ``crop_boxes`` of the image each crop was cut from (:func:`apply_image_margins`)."""
    probs = F.softmax(teacher_logits.float(), dim=1)
    confidence, labels = probs.max(1)
    share = confidence_weight(probs, threshold)
    weights = torch.full_like(confidence, share)
    if crop_boxes is None:
        weights = apply_margins(weights, margins)
    else:
        weights = apply_image_margins(weights, margins, crop_boxes)
    return labels, weights, share


def downscale_labels_by_majority(labels: torch.Tensor, factor: int, min_ratio: float,
                                 num_classes: int, size=None) -> torch.Tensor:
    """``(N, H, W)`` labels -> ``(N, h, w)``: per ``factor x factor`` block the most frequent
    value (255 a value of its own; a tie goes to the lower class, 255 last), 255 where it covers
    less than ``min_ratio`` of the block.

    ``size=None`` gives ``(H // factor, W // factor)`` blocks from the top-left corner, as
    DAFormer's ``downscale_label_ratio`` (where the features are exactly ``H / factor``:
    mmseg's ResNet-V1c on a 512 crop gives 64 cells). ``size=(h, w)`` is our network's grid:
    the caffe-style ResNet gives ``H // 8 + 1`` cells (65 on a 512 crop), cell ``i`` the block
    ``[8 i, 8 i + 8)``; blocks that run past the image are filled with 255 (the last row and
    column: mostly ignore, so never a thing cell), blocks beyond ``size`` dropped."""
    if factor < 1:
        raise ValueError(f"label downscale factor must be >= 1, got {factor}")
    n, height, width = labels.shape
    h, w = (height // factor, width // factor) if size is None else (int(size[0]), int(size[1]))
    x = labels.long().clone()
    bad = (x != IGNORE_INDEX) & ((x < 0) | (x >= num_classes))
    if bad.any():
        raise ValueError(f"labels hold values outside 0..{num_classes - 1} and "
                         f"{IGNORE_INDEX}: {torch.unique(x[bad]).tolist()[:5]}")
    x[x == IGNORE_INDEX] = num_classes
    x = x[:, : h * factor, : w * factor]
    pad_h, pad_w = h * factor - x.shape[1], w * factor - x.shape[2]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=num_classes)
    one_hot = F.one_hot(x, num_classes + 1).permute(0, 3, 1, 2).float()
    share, out = F.avg_pool2d(one_hot, factor).max(1)
    out[out == num_classes] = IGNORE_INDEX
    out[share < min_ratio] = IGNORE_INDEX
    return out


def thing_mask(cell_labels: torch.Tensor, classes) -> torch.Tensor:
    """``(N, h, w)`` bool: cells whose label is one of ``classes`` (None: every cell)."""
    if classes is None:
        return torch.ones_like(cell_labels, dtype=torch.bool)
    chosen = torch.as_tensor(list(classes), device=cell_labels.device, dtype=cell_labels.dtype)
    return torch.isin(cell_labels, chosen)


def feature_distance(student: torch.Tensor, imagenet: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the cells of ``mask`` (``(N, h, w)`` bool; None: all) of the L2 norm over
    channels of ``student - imagenet`` (``(N, D, h, w)`` each), in float32.

    With no cell in the mask DAFormer takes the mean of nothing: NaN in the logs, a zero
    gradient. Here the value is 0 (kept in the graph, zero gradient), so that a batch without
    things does not read as a diverged run."""
    dist = torch.linalg.vector_norm(student.float() - imagenet.float(), ord=2, dim=1)
    if mask is None:
        return dist.mean()
    if mask.shape != dist.shape:
        raise ValueError(f"feature-distance mask {tuple(mask.shape)} does not match the "
                         f"feature grid {tuple(dist.shape)}")
    if not mask.any():
        return dist.sum() * 0.0
    return dist[mask].mean()


class FrozenBackbone(nn.Module):
    """A frozen copy of a backbone as it is now (DAFormer's ``imnet_model``: the network built
    again from the ImageNet init file), always in eval mode (its BN statistics are the init
    file's, as ``calc_feat_dist`` calls ``.eval()``), without gradients."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

