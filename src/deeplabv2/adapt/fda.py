"""Fourier Domain Adaptation (Yang & Soatto, CVPR 2020, Sec. 3.1): a source image takes the
low-frequency amplitude spectrum of a target image and keeps its own phase, so it looks like the
target's "style" (illumination, colour cast) with the source's content.

The low-frequency band is the ``b x b`` corner blocks of the (unshifted) 2-D spectrum, with
``b = floor(min(H, W) * beta)``, as the released code swaps it; ``beta`` is 0.01, 0.05 or 0.09
for the three models of the multi-band ensemble (FDA-MBT).
"""

from __future__ import annotations

import math

import torch

BETAS = (0.01, 0.05, 0.09)


def low_frequency_size(height: int, width: int, beta: float) -> int:
    """``b``: the side of the swapped band in frequency bins."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    return int(math.floor(min(height, width) * beta))


def fda_source_to_target(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """``(N, C, H, W)`` source images with the low-frequency amplitude of ``target`` (same shape,
    or one image broadcast over N). Works on the raw 0-255 float images, before mean
    subtraction (as the released code). Returns real ``(N, C, H, W)`` float32 images (values
    may leave 0-255 slightly; clamp before display)."""
    if source.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must "
                         "have the same height and width (crop both to one size)")
    height, width = source.shape[-2:]
    b = low_frequency_size(height, width, beta)
    fs = torch.fft.fft2(source.float())
    if b == 0:
        return source.float().clone()
    amp_s, phase = fs.abs(), fs.angle()
    amp_t = torch.fft.fft2(target.float()).abs().expand_as(amp_s)
    amp = amp_s.clone()
    for rows in (slice(0, b), slice(height - b, height)):
        for cols in (slice(0, b), slice(width - b, width)):
            amp[..., rows, cols] = amp_t[..., rows, cols]
    return torch.fft.ifft2(torch.polar(amp, phase)).real
