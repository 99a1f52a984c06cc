"""DACS (Tranheden et al., WACV 2021): a mean-teacher labels the target image, ClassMix pastes
half of the source image's classes onto it, and the student learns the mixed image against the
mixed labels, the pseudo-labelled pixels weighted by the teacher's confidence.

* :func:`classmix_masks`: per image, ``ceil(n / 2)`` of the ``n`` classes present in the
  source label, drawn at random; the mask is 1 on their pixels (DACS Sec. 3.2);
* :func:`mix`: ``mask * source + (1 - mask) * target`` for images, labels and weights alike;
* :class:`EMATeacher`: ``teacher = a * teacher + (1 - a) * student`` with
  ``a = min(1 - 1 / (it + 1), alpha)``, ``alpha = 0.99`` (released code); with
  ``model.bn: batch`` it predicts in train mode (batch statistics), as DACS's does;
* :func:`confidence_weight`: the share of target pixels whose teacher confidence is at least
  ``0.968``, used as the weight of every pseudo-labelled pixel ("threshold_uniform");
* :func:`strong_augment`: colour jitter (brightness, contrast, saturation, hue by 0.25, with
  probability 0.8) and Gaussian blur (sigma in [0.15, 1.15], kernel 10% of the image, with
  probability 0.5) on the mixed images.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

CONFIDENCE_THRESHOLD = 0.968
IGNORE_INDEX = 255


def classmix_masks(labels: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """``(N, H, W)`` source labels -> ``(N, H, W)`` float masks: 1 on the pixels of
    ``ceil(n / 2)`` of each image's ``n`` present classes (ignored pixels are no class)."""
    masks = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    for i, label in enumerate(labels):
        classes = torch.unique(label)
        classes = classes[classes != IGNORE_INDEX]
        n = classes.numel()
        if n == 0:
            continue
        pick = torch.randperm(n, generator=generator)[: (n + 1) // 2].to(classes.device)
        masks[i] = torch.isin(label, classes[pick]).float()
    return masks


def mix(masks: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``masks * source + (1 - masks) * target``; ``masks`` ``(N, H, W)`` broadcast over a
    channel axis when the data has one (images ``(N, C, H, W)``)."""
    m = masks[:, None] if source.dim() == 4 else masks
    out = m * source.float() + (1 - m) * target.float()
    return out.to(source.dtype) if not source.dtype.is_floating_point else out


def confidence_weight(teacher_probs: torch.Tensor,
                      threshold: float = CONFIDENCE_THRESHOLD) -> float:
    """The share (0..1) of pixels of ``(N, C, H, W)`` probabilities whose maximum is at least
    ``threshold``."""
    return float((teacher_probs.max(1).values >= threshold).float().mean())


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``weight * CE`` (ignored pixels count 0), as DACS's
    ``CrossEntropyLoss2dPixelWiseWeighted``."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights).mean()


class EMATeacher(nn.Module):
    """A frozen copy of the student updated as an exponential moving average of its weights.

    ``batch_stats=False`` (frozen or trainable BN): the copy predicts in eval mode and the
    student's buffers (BN statistics) are copied at each update. ``batch_stats=True``
    (``model.bn: batch``), as DACS runs its teacher (``trainUDA.py``: ``create_ema_model``
    copies the parameters only, ``ema_model.train()`` is never undone, ``update_ema_variables``
    averages ``parameters()`` only): the copy predicts in train mode, normalising by the
    batch's statistics, and only the parameters are averaged; its running statistics follow
    its own forwards and are not read by any prediction (DACS's copy starts them at 0 and 1,
    this one at the student's, which no output depends on)."""

    def __init__(self, student: nn.Module, alpha: float = 0.99, batch_stats: bool = False):
        super().__init__()
        if not 0 <= alpha < 1:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.batch_stats = bool(batch_stats)
        self.model = copy.deepcopy(student).train(self.batch_stats)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> float:
        """One EMA step after optimizer step ``iteration`` (0-based); returns the rate used."""
        a = min(1.0 - 1.0 / (iteration + 1), self.alpha)
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)
        if not self.batch_stats:
            for t, s in zip(self.model.buffers(), student.buffers()):
                t.copy_(s)
        return a

    def train(self, mode: bool = True):  # the teacher predicts in one mode whatever is asked
        super().train(mode)
        self.model.train(self.batch_stats)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        return self.model(x, **kw)


# -- strong augmentation on raw 0-255 RGB float images ------------------------------------------
def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def colour_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Brightness, contrast and saturation factors in ``[1 - s, 1 + s]`` and a hue rotation by
    up to ``s * 180`` degrees (about the grey axis), per image, on ``(N, 3, H, W)`` RGB 0-255."""
    n = images.shape[0]
    def factor():
        return (1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)).to(images)
    x = images * factor()
    mean = _grey(x).mean((-1, -2), keepdim=True)
    x = (x - mean) * factor() + mean
    grey = _grey(x)
    x = (x - grey) * factor() + grey
    # hue: rotate the chroma about the (1, 1, 1) axis (Rodrigues), angle up to strength * pi
    theta = (strength * math.pi * (2 * torch.rand(n, generator=generator) - 1)).to(images)
    cos, sin = torch.cos(theta), torch.sin(theta)
    k = 1 / math.sqrt(3)
    rot = torch.empty(n, 3, 3, dtype=images.dtype, device=images.device)
    third = (1 - cos) / 3
    for i in range(3):
        for j in range(3):
            if i == j:
                rot[:, i, j] = cos + third
            else:
                sign = 1 if (j - i) % 3 == 1 else -1
                rot[:, i, j] = third - sign * k * sin
    x = torch.einsum("nij,njhw->nihw", rot, x)
    return x.clamp(0, 255)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel about 10% of the image side (odd), reflect padding.

    Always float32, contiguous, outside autocast: it is image augmentation, not the network,
    and under bf16 autocast on channels-last input the depthwise 1xk convolution (k >= 15)
    never returns on an AMX Xeon (torch 2.13: oneDNN's brdgmm kernel generation loops; seen
    as DACS training stalling at its first blurred batch)."""
    with torch.autocast(images.device.type, enabled=False):
        return _gaussian_blur(images.float().contiguous(), sigma)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    out = images
    for axis, length in ((-2, images.shape[-2]), (-1, images.shape[-1])):
        k = max(3, int(math.ceil(0.1 * length)) // 2 * 2 + 1)
        r = torch.arange(k, dtype=images.dtype, device=images.device) - k // 2
        w = torch.exp(-0.5 * (r / sigma) ** 2)
        w = w / w.sum()
        c = images.shape[1]
        if axis == -2:
            weight = w.view(1, 1, k, 1).repeat(c, 1, 1, 1)
            pad = (0, 0, k // 2, k // 2)
        else:
            weight = w.view(1, 1, 1, k).repeat(c, 1, 1, 1)
            pad = (k // 2, k // 2, 0, 0)
        mode = "reflect" if min(out.shape[-2:]) > k // 2 else "replicate"
        out = F.conv2d(F.pad(out, pad, mode=mode), weight, groups=c)
    return out


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None,
                   jitter: float = 0.25, p_jitter: float = 0.8, p_blur: float = 0.5
                   ) -> torch.Tensor:
    """DACS's augmentation of the mixed images (raw RGB 0-255 ``(N, 3, H, W)`` floats)."""
    if float(torch.rand((), generator=generator)) < p_jitter:
        images = colour_jitter(images, jitter, generator)
    if float(torch.rand((), generator=generator)) < p_blur:
        sigma = 0.15 + float(torch.rand((), generator=generator))
        images = gaussian_blur(images, sigma)
    return images
