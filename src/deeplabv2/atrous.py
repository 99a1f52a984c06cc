"""Dilated 3x3 convolutions as one undilated Winograd convolution (CPU inference).

A 3x3 convolution with dilation ``d`` (padding ``d``, stride 1) reads, for the output pixel
``(i, j)``, only input pixels congruent to ``(i, j)`` modulo ``d``. It is therefore ``d * d``
independent *undilated* 3x3 convolutions, one per sub-grid ``x[..., a::d, b::d]``: the
"space to batch" of the original DeepLab (``atrous`` in Caffe, Sec. 3.1 of the paper). We lay
the ``d * d`` sub-grids side by side in one image, each in a border of zeros one pixel wide
(the zeros its own padding would read), run one undilated convolution on that image with
NNPACK's Winograd kernels, and put the outputs back in place. Winograd F(6x6, 3x3) on 8x8
tiles needs 64 multiplications per output tile and channel pair where the direct convolution
needs 324 (the transforms take back part of that); oneDNN has no Winograd kernel for AVX2 CPUs,
where it runs dilated 3x3 convolutions directly.

Only fp32, CPU, stride 1, groups 1 and ``padding == dilation`` ("same" size) are handled:
:func:`winograd_eligible` says which convolutions qualify, and :func:`use_atrous_winograd`
replaces those in a model. The results agree with ``F.conv2d`` to about 1e-5 relative
(Winograd's rounding; tests), and the layout of the input (NCHW or channels-last) is kept.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def nnpack_available() -> bool:
    """Whether this torch has NNPACK (the call also initialises it, which NNPACK needs)."""
    try:
        return bool(torch.backends.nnpack.is_available())
    except (AttributeError, RuntimeError):
        return False


def winograd_eligible(conv: nn.Module, min_channels: int = 128) -> bool:
    """A dilated 3x3 fp32 convolution of stride 1 with "same" padding and enough channels
    (below ``min_channels`` the direct oneDNN kernels win on their own)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.dilation[0] == conv.dilation[1] > 1
            and conv.padding == conv.dilation and conv.padding_mode == "zeros"
            and conv.weight.dtype == torch.float32
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def worth_tiling(height: int, width: int, dilation: int, min_pixels: int = 64 * 64,
                 max_overhead: float = 1.5) -> bool:
    """Whether the Winograd path should pay on a ``height x width`` map: large enough, and the
    zero borders around the sub-grids add at most ``max_overhead`` times the work (at
    512x1024, rate 2 adds 9% and rate 4 19%; the VGG head's rate 24 would add 120%)."""
    h, w = -(-height // dilation), -(-width // dilation)
    return height * width >= min_pixels and (h + 2) * (w + 2) <= max_overhead * h * w


def atrous_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 ``weight``,
    computed as one undilated NNPACK (Winograd) convolution over the tiled sub-grids."""
    if not nnpack_available():
        raise RuntimeError("atrous_conv3x3 needs NNPACK, which this torch build lacks")
    n, c, height, width = x.shape
    d = int(dilation)
    h, w = -(-height // d), -(-width // d)  # the largest sub-grid (the first row/column)
    # Tiled input: sub-grid (a, b) at rows a*(h+2)+1 .. and columns b*(w+2)+1 .., zeros around
    # (a sub-grid shorter than h or w keeps zeros where the padding would be read); two extra
    # zero rows/columns at the end make the valid output exactly d*(h+2) x d*(w+2).
    tiled = x.new_zeros(n, c, d * (h + 2) + 2, d * (w + 2) + 2)
    blocks = tiled[:, :, :d * (h + 2), :d * (w + 2)].view(n, c, d, h + 2, d, w + 2)
    for a in range(d):
        for b in range(d):
            sub = x[:, :, a::d, b::d]
            blocks[:, :, a, 1:1 + sub.shape[2], b, 1:1 + sub.shape[3]] = sub
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    y = torch._nnpack_spatial_convolution(tiled, weight.contiguous(), bias, [0, 0], [1, 1])
    y = y.view(n, y.shape[1], d, h + 2, d, w + 2)  # (n, co, a, p, b, q)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty(n, y.shape[1], height, width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else
                      torch.contiguous_format)
    for a in range(d):
        for b in range(d):
            sub = out[:, :, a::d, b::d]
            sub.copy_(y[:, :, a, :sub.shape[2], b, :sub.shape[3]])
    return out


class AtrousWinogradConv2d(nn.Module):
    """Inference-only stand-in for a dilated 3x3 ``nn.Conv2d`` (see the module docstring).

    Maps smaller than ``min_pixels`` (height x width), or whose sub-grids are so small that
    their zero borders would add over half the work (:func:`worth_tiling`), take the direct
    convolution: there Winograd's 8x8 tiles do not pay for the two rearrangements (measured on
    ResNet-101's layer3/layer4 shapes: Winograd 0.6-0.7x at 41x41, 1.0-1.2x at 65x65, 1.1-1.8x
    at 65x129, up to 2x at 129x257, on a 2-core AVX2 CPU)."""

    def __init__(self, conv: nn.Conv2d, min_pixels: int = 64 * 64, max_overhead: float = 1.5):
        super().__init__()
        if not winograd_eligible(conv, min_channels=1):
            raise ValueError(f"not a dilated 3x3 stride-1 fp32 convolution with same padding: "
                             f"{conv}")
        self.dilation = conv.dilation[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.min_pixels, self.max_overhead = int(min_pixels), float(max_overhead)
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else \
            nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
                or not worth_tiling(x.shape[-2], x.shape[-1], self.dilation, self.min_pixels,
                                    self.max_overhead)):
            return F.conv2d(x, self.weight, self.bias, padding=self.dilation,
                            dilation=self.dilation)
        return atrous_conv3x3(x, self.weight, self.bias, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), "
                f"dilation={self.dilation}, Winograd (NNPACK)")


def use_atrous_winograd(model: nn.Module, min_channels: int = 128, min_pixels: int = 64 * 64,
                        max_overhead: float = 1.5) -> int:
    """Replace, in place, every :func:`winograd_eligible` convolution of ``model`` by an
    :class:`AtrousWinogradConv2d`; returns how many were replaced (0 without NNPACK)."""
    if not nnpack_available():
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if winograd_eligible(child, min_channels):
                setattr(module, name, AtrousWinogradConv2d(child, min_pixels, max_overhead))
                replaced += 1
    return replaced
