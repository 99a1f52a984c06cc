"""MIC, masked image consistency (Hoyer et al., CVPR 2023), as an option of the self-training
methods (``adapt.mic``; :class:`~deeplabv2.adapt.methods.SelfTraining` runs it as an extra
pass). What it adds, read from lhoyer/MIC ``seg/``:

* the target batch, colour-augmented as the host method augments its mixed images
  (``mask_mode`` ``separatetrgaug``: ``mmseg/models/uda/masking_consistency_module.py`` calls
  ``strong_transform`` with ``mix=None`` and the host's ``color_jitter_strength``/
  ``color_jitter_probability``, blur drawn ``U(0, 1) > 0.5``), but in *one* call for the whole
  batch: kornia's ``ColorJitter`` draws its factors per image and one order of the four steps
  for the batch, and ``gaussian_blur`` one sigma for the batch (:func:`augment_batch`);
* then masked by a random block mask (:func:`block_mask`, ``mmseg/models/utils/
  masking_transforms.py`` ``BlockMaskGenerator``): a grid of ``round(H / b) x round(W / b)``
  cells, each *kept* where ``U(0, 1) > mask_ratio`` (so ``mask_ratio`` is the expected masked
  share), upsampled to the image by nearest neighbour; the image is multiplied by it in the
  network's input space (mmseg's normalised image: a masked pixel is 0, i.e. the mean colour);
* the student's prediction of the masked image is trained with the weighted cross-entropy
  against the pseudo-labels the EMA teacher gave the *unmasked* target image in the host's
  pass, with the same per-pixel weight (confidence share, 0 in the margins): MIC's
  ``mask_alpha='same'`` and ``mask_pseudo_threshold='same'`` share the host's labels
  (``dacs.py`` forward_train passes ``pseudo_label, pseudo_weight`` to the module), times
  ``lambda`` (``mask_lambda`` 1).

Released values (``seg/experiments.py``): ``mask_ratio`` 0.7; ``block_size`` 64 on HRDA's
1024x1024 crops (id 80, ``configs/mic/gtaHR2csHR_mic_hrda.py``) and 32 on the 512x512 crops of
the DeepLab v2 / DAFormer-strategy rows (id 81: "half the patch size when training with half
resolution"); ``lambda`` 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .mix import apply_colour_jitter, gaussian_blur, jitter_parameters

#: the keys of ``adapt.mic`` and their defaults (MIC's released values on its 1024 crops)
MIC_DEFAULTS = {"mask_ratio": 0.7, "block_size": 64, "lambda": 1.0, "augment": True}


@dataclass(frozen=True)
class MICSettings:
    """``adapt.mic`` read: ``mask_ratio`` (expected masked share of the cells, in [0, 1)),
    ``block_size`` (cell side in pixels of the crop), ``weight`` (``lambda``: the loss factor),
    ``augment`` (colour-augment the target before masking: ``separatetrgaug``; false is
    MIC's ``separatetrg`` ablation)."""

    mask_ratio: float = 0.7
    block_size: int = 64
    weight: float = 1.0
    augment: bool = True

    def as_config(self) -> dict:
        return {"mask_ratio": self.mask_ratio, "block_size": self.block_size,
                "lambda": self.weight, "augment": self.augment}


def mic_settings(value, key: str = "adapt.mic") -> MICSettings | None:
    """``adapt.mic`` (None: off; a mapping of :data:`MIC_DEFAULTS`' keys, the missing ones
    taking their defaults) -> :class:`MICSettings`; a ValueError naming ``key`` otherwise."""
    if value is None:
        return None
    if isinstance(value, MICSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of {', '.join(MIC_DEFAULTS)} (or null: "
                         f"off), got {value!r}")
    unknown = [k for k in value if k not in MIC_DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key {key}.{unknown[0]}; valid keys: {', '.join(MIC_DEFAULTS)}")
    v = {**MIC_DEFAULTS, **value}

    def number(name):
        x = v[name]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{key}.{name} must be a number, got {x!r}")
        return x

    ratio, size, weight = number("mask_ratio"), number("block_size"), number("lambda")
    if not 0 <= ratio < 1:
        raise ValueError(f"{key}.mask_ratio must be in [0, 1) (the masked share), got {ratio!r}")
    if float(size) != int(size) or size < 1:
        raise ValueError(f"{key}.block_size must be a positive integer (pixels), got {size!r}")
    if weight < 0:
        raise ValueError(f"{key}.lambda must be >= 0, got {weight!r}")
    if not isinstance(v["augment"], bool):
        raise ValueError(f"{key}.augment must be true or false, got {v['augment']!r}")
    return MICSettings(float(ratio), int(size), float(weight), v["augment"])


def block_grid(height: int, width: int, block_size: int) -> tuple[int, int]:
    """The mask's grid for a ``height x width`` image: ``(round(H / b), round(W / b))`` with
    Python's ``round`` (half to even) as ``BlockMaskGenerator.generate_mask``. A side shorter
    than half a block rounds to 0 cells, where the released generator fails in its resize:
    here a ValueError naming ``adapt.mic.block_size``."""
    h, w = round(height / block_size), round(width / block_size)
    if h < 1 or w < 1:
        raise ValueError(f"adapt.mic.block_size={block_size} gives a {h}x{w} mask grid on a "
                         f"{height}x{width} crop: use a block size of at most "
                         f"{2 * min(height, width)} pixels")
    return h, w


def block_mask(n: int, height: int, width: int, block_size: int, mask_ratio: float,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``(n, 1, height, width)`` float mask, 1 where the image is kept: per image a
    :func:`block_grid` of cells, each kept where ``U(0, 1) > mask_ratio``, upsampled by nearest
    neighbour (``F.interpolate`` mode ``nearest``: cell ``floor(y * h / H)`` of row ``y``, so
    with a side not divisible by the block the cells differ by a pixel). Drawn on the CPU
    (from ``generator``, or the global RNG the loop seeds per iteration), then moved to
    ``device``: the same mask on every device, and a resumed run draws it again."""
    h, w = block_grid(height, width, block_size)
    cells = (torch.rand((n, 1, h, w), generator=generator) > mask_ratio).float()
    return F.interpolate(cells, size=(height, width), mode="nearest").to(device)


def augment_batch(images: torch.Tensor, jitter: float, kornia_order: str,
                  generator: torch.Generator | None = None, p_jitter: float = 0.8,
                  p_blur: float = 0.5) -> torch.Tensor:
    """MIC's colour augmentation of the target batch (raw RGB 0-255 ``(N, 3, H, W)``), the
    host's jitter (strength ``jitter``, ``kornia_order``) in one kornia call for the batch:
    one coin (jitter where it falls below ``p_jitter``), the factors per image, one order of the
    four steps for all images; then one coin for the blur and one sigma ``U(0.15, 1.15)`` for
    all images (``gaussian_blur`` draws ``np.random.uniform`` once per call). Compare
    :func:`~deeplabv2.adapt.mix.strong_augment`, which calls per image."""
    n = images.shape[0]
    if float(torch.rand((), generator=generator)) < p_jitter:
        params = jitter_parameters(n, jitter, generator)
        params["order"] = params["order"][:1].expand(n, -1)  # one permutation per call
        images = apply_colour_jitter(images, params, kornia_order)
    if float(torch.rand((), generator=generator)) < p_blur:
        sigma = 0.15 + float(torch.rand((), generator=generator))
        images = gaussian_blur(images, sigma)
    return images
