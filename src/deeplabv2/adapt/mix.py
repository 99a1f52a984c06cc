"""DACS (Tranheden et al., WACV 2021): a mean-teacher labels the target image, ClassMix pastes
half of the source image's classes onto it, and the student learns the mixed image against the
mixed labels, the pseudo-labelled pixels weighted by the teacher's confidence.

* :func:`classmix_masks`: per image, ``ceil(n / 2)`` of the ``n`` values present in the
  source label, drawn at random; the mask is 1 on their pixels (DACS Sec. 3.2). As in the
  released trainUDA.py, the ignore value 255 counts as one of the ``n`` and may be drawn: the
  ignored source pixels are then pasted, labelled 255 (see the function);
* :func:`mix`: ``mask * source + (1 - mask) * target`` for images, labels and weights alike;
* :class:`EMATeacher`: ``teacher = a * teacher + (1 - a) * student`` with
  ``a = min(1 - 1 / (it + 1), alpha)``, ``alpha = 0.99`` (released code); with
  ``model.bn: batch`` it predicts in train mode (batch statistics), as DACS's does;
* :func:`confidence_weight`: the share of target pixels whose teacher confidence is at least
  ``0.968``, used as the weight of every pseudo-labelled pixel ("threshold_uniform");
* :func:`strong_augment`: on the mixed images, kornia's colour jitter as DACS ran it
  (brightness shift, contrast and saturation factors, hue shift, all of strength 0.25, in a
  random order per image; probability 0.8 per step), then a Gaussian blur (sigma in
  [0.15, 1.15] per image, kernel side the odd number at or below 10% of the image side;
  probability 0.5 per step).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

CONFIDENCE_THRESHOLD = 0.968
IGNORE_INDEX = 255


def classmix_masks(labels: torch.Tensor, generator: torch.Generator | None = None,
                   ignored_is_a_class: bool = True, classes_of_batch: bool = False
                   ) -> torch.Tensor:
    """``(N, H, W)`` source labels -> ``(N, H, W)`` float masks: 1 on the pixels of
    ``ceil(n / 2)`` of the ``n`` values present in each image's label.

    As DACS's trainUDA.py does (``torch.unique(labels[i])`` with the filter
    ``classes != ignore_label`` commented out, then ``np.random.choice(n, ceil(n / 2))``), the
    ignore value 255 is one of the ``n`` values and may be drawn: its source pixels are then
    pasted onto the target, image and label 255 alike, and the mixed label ignores them (the
    target pixels they cover get no pseudo-label loss either). That changes what a step trains
    on, so it is kept as released; ``ignored_is_a_class=False`` draws among the real classes
    only (the commented-out filter).

    ``classes_of_batch=True`` is DAFormer's ``get_class_masks``
    (mmseg/models/utils/dacs_transforms.py): inside its loop over the images it takes
    ``torch.unique(labels)``, the values of the whole *batch*, so each image draws
    ``ceil(n / 2)`` of the batch's ``n`` values (255 among them) and its mask covers those of
    them it holds; a drawn class absent from the image pastes nothing."""
    masks = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    for i, label in enumerate(labels):
        classes = torch.unique(labels if classes_of_batch else label)
        if not ignored_is_a_class:
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
# DACS (trainUDA.py strongTransform: mix, then transformsgpu.colorJitter, then
# transformsgpu.gaussian_blur; flip is off in configs/configUDA.json) runs kornia's ColorJitter
# and GaussianBlur2d. requirements.txt lists ``kornia`` without a version (code pushed August
# 2020). kornia 0.2.1 (April 2020) to 0.4.0 (August 2020) define them exactly as below
# (augmentation/random_generator.py random_color_jitter_generator, augmentation/functional.py
# apply_color_jitter and apply_adjust_*, color/adjust.py, color/hsv.py, filters/kernels.py
# gaussian, filters/filter.py filter2D); 0.4.1 to 0.5.x keep the same ranges, steps and order
# (0.4.1 rewrote the HSV conversion, same values up to rounding). Only 0.2.0 differed: its hue
# range was in radians, not turns.

def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` in [0, 1], channel 0 read as red -> ``(h, s, v)``, ``h`` in radians
    [0, 2 pi). ``s = 0`` where ``v = 0``, ``h = 0`` where the channels are equal; where two
    channels share the maximum, red wins over green, green over blue (kornia's rgb_to_hsv)."""
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    lo, _ = x.min(-3)
    delta = v - lo
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(r == v, bc - gc, torch.where(g == v, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6.0, 1.0) * (2 * math.pi)
    return torch.stack([h, s, v], -3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv` (any real ``h``, read modulo 2 pi)."""
    h, s, v = x.unbind(-3)
    h6 = h / (2 * math.pi) * 6
    sector = torch.remainder(torch.floor(h6), 6)
    f = torch.remainder(h6, 6) - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    # (r, g, b) per sector 0..5
    table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(table):
        here = sector == k
        out = [torch.where(here, c, o) for c, o in zip(rgb, out)]
    return torch.stack(out, -3)


def adjust_brightness(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Additive: ``clamp(x + shift, 0, 1)``, ``shift`` per image ``(N,)``."""
    return (x + shift.view(-1, 1, 1, 1).to(x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiplicative about 0 (no mean): ``clamp(x * factor, 0, 1)``."""
    return (x * factor.view(-1, 1, 1, 1).to(x)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV saturation times ``factor``, clamped to [0, 1]."""
    h, s, v = rgb_to_hsv(x).unbind(-3)
    s = (s * factor.view(-1, 1, 1).to(x)).clamp(0, 1)
    return hsv_to_rgb(torch.stack([h, s, v], -3))


def adjust_hue(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """HSV hue plus ``radians`` (``fmod`` by 2 pi, as kornia; the sign is kept and
    :func:`hsv_to_rgb` reads it modulo 2 pi)."""
    h, s, v = rgb_to_hsv(x).unbind(-3)
    h = torch.fmod(h + radians.view(-1, 1, 1).to(x), 2 * math.pi)
    return hsv_to_rgb(torch.stack([h, s, v], -3))


#: the four adjustments, indexed as kornia's ``order`` permutation indexes them
JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")


def jitter_parameters(n: int, strength: float, generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
    """kornia ``ColorJitter(s, s, s, s)``'s draw for ``n`` images, each its own:
    brightness factor ``U(1 - s, 1 + s)`` (bounds clamped to [0, 2]; applied as the shift
    ``factor - 1``), contrast and saturation ``U(max(0, 1 - s), 1 + s)``, hue ``U(-s, s)``
    (clamped to [-0.5, 0.5]) in turns, applied as ``hue * 2 pi`` radians, and the order of the
    four steps, a random permutation per image (DACS jitters each mixed image in its own call, so
    kornia's one ``randperm(4)`` per call is one per image). Returned as ``brightness`` (the
    shift), ``contrast``, ``saturation``, ``hue`` (radians), each ``(n,)``, and ``order``
    ``(n, 4)`` indices into :data:`JITTER_STEPS`."""
    if strength < 0:
        raise ValueError(f"colour jitter strength must be >= 0, got {strength}")
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    brightness = uniform(max(0.0, 1 - strength), min(2.0, 1 + strength)) - 1
    contrast = uniform(max(0.0, 1 - strength), 1 + strength)
    hue = uniform(max(-0.5, -strength), min(0.5, strength)) * (2 * math.pi)
    saturation = uniform(max(0.0, 1 - strength), 1 + strength)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)]) if n else \
        torch.zeros(0, 4, dtype=torch.int64)
    return {"brightness": brightness.float(), "contrast": contrast.float(),
            "saturation": saturation.float(), "hue": hue.float(), "order": order}


def apply_colour_jitter(images: torch.Tensor, params: dict[str, torch.Tensor],
                        kornia_order: str = "bgr") -> torch.Tensor:
    """:func:`jitter_parameters`' jitter of ``(N, 3, H, W)`` RGB 0-255 images, computed as DACS
    computes it: DACS's images are BGR with the mean subtracted; ``colorJitter`` adds the mean
    back and divides by 255, so kornia (which reads channel 0 as red) gets BGR in [0, 1]. The
    same here: BGR / 255, the four steps in the image's order, back to RGB 0-255. No clamp
    beyond the steps' own (brightness and contrast clamp to [0, 1]).

    ``kornia_order="rgb"``: the channel order kornia gets is RGB, as in DAFormer (mmseg's
    ``img_norm_cfg`` ``to_rgb=True``; ``denorm_`` hands kornia RGB in [0, 1]), where the
    saturation and hue steps then act on the true colours."""
    if kornia_order not in ("bgr", "rgb"):
        raise ValueError(f"kornia_order must be 'bgr' or 'rgb', got {kornia_order!r}")
    flip = kornia_order == "bgr"
    x = (images.float().flip(1) if flip else images.float()) / 255
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        for step in params["order"][i].tolist():
            name = JITTER_STEPS[step]
            value = params[name][i:i + 1]
            xi = {"brightness": adjust_brightness, "contrast": adjust_contrast,
                  "saturation": adjust_saturation, "hue": adjust_hue}[name](xi, value)
        out.append(xi)
    if not out:
        return images
    out = torch.cat(out) * 255
    return (out.flip(1) if flip else out).to(images.dtype)


def colour_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                  kornia_order: str = "bgr") -> torch.Tensor:
    """kornia ``ColorJitter(strength, strength, strength, strength)`` as DACS applies it, on
    ``(N, 3, H, W)`` RGB 0-255 (see :func:`jitter_parameters`, :func:`apply_colour_jitter`)."""
    return apply_colour_jitter(images, jitter_parameters(images.shape[0], strength, generator),
                               kornia_order)


def blur_kernel_size(length: int) -> int:
    """DACS's kernel side for an image side ``length``: ``ceil(0.1 length)`` if odd, else one
    less (``floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) % 2)``): 51 for 512, 103 for 1024; 1 (no blur)
    for sides up to 10."""
    c = math.ceil(0.1 * length)
    return c if c % 2 else c - 1


def gaussian_blur(images: torch.Tensor, sigma) -> torch.Tensor:
    """Gaussian blur as kornia's ``GaussianBlur2d((kh, kw), (sigma, sigma))`` in DACS: kernel
    sides :func:`blur_kernel_size` of the image's height and width, weights
    ``exp(-d^2 / (2 sigma^2))`` normalised, reflect padding (replicate where the image is too
    small to reflect, where kornia would fail). ``sigma`` a number or one per image ``(N,)``.

    Always float32, contiguous, outside autocast: it is image augmentation, not the network,
    and under bf16 autocast on channels-last input the depthwise 1xk convolution (k >= 15)
    never returns on an AMX Xeon (torch 2.13: oneDNN's brdgmm kernel generation loops; seen
    as DACS training stalling at its first blurred batch)."""
    with torch.autocast(images.device.type, enabled=False):
        x = images.float().contiguous()
        sig = torch.as_tensor(sigma, dtype=torch.float32).flatten()
        if sig.numel() == 1:
            return _gaussian_blur(x, float(sig))
        if sig.numel() != x.shape[0]:
            raise ValueError(f"gaussian_blur: {sig.numel()} sigmas for {x.shape[0]} images")
        return torch.cat([_gaussian_blur(x[i:i + 1], float(s)) for i, s in enumerate(sig)])


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    # the 2-D kernel is the outer product of two 1-D ones: two 1-D passes compute it
    out = images
    for axis, length in ((-2, images.shape[-2]), (-1, images.shape[-1])):
        k = blur_kernel_size(length)
        if k <= 1:
            continue
        r = torch.arange(k, dtype=images.dtype, device=images.device) - k // 2
        w = torch.exp(-r ** 2 / (2 * sigma ** 2))
        w = w / w.sum()
        c = images.shape[1]
        if axis == -2:
            weight = w.view(1, 1, k, 1).repeat(c, 1, 1, 1)
            pad = (0, 0, k // 2, k // 2)
        else:
            weight = w.view(1, 1, 1, k).repeat(c, 1, 1, 1)
            pad = (k // 2, k // 2, 0, 0)
        mode = "reflect" if out.shape[axis] > k // 2 else "replicate"
        out = F.conv2d(F.pad(out, pad, mode=mode), weight, groups=c)
    return out


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None,
                   jitter: float = 0.25, p_jitter: float = 0.8, p_blur: float = 0.5,
                   kornia_order: str = "bgr") -> torch.Tensor:
    """DACS's augmentation of the mixed images (raw RGB 0-255 ``(N, 3, H, W)`` floats): colour
    jitter, then blur. As trainUDA.py draws them: one coin for the batch per step
    (``ColorJitter`` drawn ``U(0, 1)``, jitter where above 0.2; ``GaussianBlur`` above 0.5),
    the jitter's parameters and order per image (kornia, one call per image), and per image a
    blur sigma ``U(0.15, 1.15)`` (``np.random.uniform`` in each ``gaussian_blur`` call).
    DAFormer (mmseg/models/utils/dacs_transforms.py, configs/_base_/uda/dacs.py) draws the same
    way with ``color_jitter_strength=0.2``, ``color_jitter_probability=0.2`` (jitter where the
    coin is above 0.2: ``p_jitter=0.8``) and RGB channels (``kornia_order="rgb"``)."""
    if float(torch.rand((), generator=generator)) < p_jitter:
        # DACS's call keeps its three arguments (the form tests substitute)
        extra = {} if kornia_order == "bgr" else {"kornia_order": kornia_order}
        images = colour_jitter(images, jitter, generator, **extra)
    if float(torch.rand((), generator=generator)) < p_blur:
        sigma = 0.15 + torch.rand(images.shape[0], generator=generator)
        images = gaussian_blur(images, sigma)
    return images
