"""The ASPP head of DeepLab v2: parallel atrous 3x3 convolutions whose scores are summed.

Paper Sec. 3.3 and Fig. 4 (ASPP-L): four branches at rates 6, 12, 18, 24 on the stride-8
features, each producing class scores, fused by *summation* of all four (the widely copied
PyTorch port returns after adding only the first two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: ``"aspp"``: every branch summed (the paper, ADVENT); ``"adaptsegnet"``: branches 0 and 1
#: only, the function AdaptSegNet's ``Classifier_Module`` computes (its ``return`` sits inside
#: the summing loop), so that checkpoints trained with it are reproduced and it is trained as
#: AdaptSegNet (``model/deeplab_multi.py``) and DACS (``model/deeplabv2.py``) train it; ADVENT
#: and FDA sum all four. DAFormer/HRDA/MIC's "dlv2red" head (``DLV2Head`` with
#: ``dilations=(6, 12)``, ``configs/_base_/models/deeplabv2red_r50-d8.py``) computes the same
#: function with only those two convolutions in its state dict: ``"aspp"`` with
#: ``atrous_rates=(6, 12)``. Branches 2 and 3 stay in the state dict either way; in
#: ``"adaptsegnet"`` mode they get ``requires_grad=False``: they receive no gradient in the
#: released code, whose SGD skips a parameter whose ``grad`` is None (no update, no weight
#: decay), and DDP then sees no unused parameter.
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
        for conv in self.convs[len(self.summed_convs()):]:  # outside the function: frozen
            conv.requires_grad_(False)

    def summed_convs(self) -> list[nn.Conv2d]:
        """The branches whose scores are summed (all, or the first two in AdaptSegNet mode)."""
        return list(self.convs[:2] if self.head_mode == "adaptsegnet" else self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self.summed_convs()
        if x.device.type == "cpu" and torch.is_grad_enabled() and \
                not torch.jit.is_tracing() and not torch.jit.is_scripting():
            return summed_taps(convs, x)
        out = convs[0](x)
        for conv in convs[1:]:
            out = out + conv(x)
        return out

    def classifier_parameters(self):
        """The newly initialised classifier (all of ASPP: lr x10 weights / x20 biases)."""
        return self.parameters()

    def extra_repr(self) -> str:
        return f"head_mode={self.head_mode!r}"


def tap_weight(convs: list[nn.Conv2d]) -> torch.Tensor:
    """The 9 taps of each 3x3 convolution of ``convs`` stacked as one ``(9 * len(convs) * C,
    Cin, 1, 1)`` 1x1 weight, in the order of :func:`tap_shifts` (differentiable)."""
    return torch.cat([conv.weight[:, :, i, j] for conv in convs
                      for i in range(3) for j in range(3)])[:, :, None, None]


def tap_shifts(convs: list[nn.Conv2d]) -> list[tuple[int, int]]:
    """``(dy, dx)`` of each tap of :func:`tap_weight`: where in the input it reads."""
    return [((i - 1) * conv.dilation[0], (j - 1) * conv.dilation[1])
            for conv in convs for i in range(3) for j in range(3)]


def summed_taps(convs: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """The sum of the 3x3 convolutions ``convs`` (padding = dilation, stride 1) of ``x``, as
    *one* 1x1 convolution of their 9 taps each, shifted and summed in float32; differentiable,
    with the gradients reaching the convolutions' own weights and biases.

    A branch of rate ``d`` is ``out[y, x] = sum_ij w[:, :, i, j] @ x[y + (i-1) d, x + (j-1) d]``
    (zero outside): each tap a 1x1 convolution, shifted. The same FLOPs as the four dilated
    convolutions, but as one GEMM-like convolution with ``36 * num_classes`` outputs, where
    oneDNN's kernels for 2048 -> 19-21 dilated convolutions are slow: measured for one training
    step's ASPP (2 x 2048 x 41 x 41, forward + backward) on an AMX Xeon, 403 -> 236 ms in
    float32 and 547 -> 153 ms under bf16 autocast. The model uses it for CPU training; inference
    runs :class:`deeplabv2.deploy.fast.TapsASPP`, the same idea without autograd.
    """
    c = convs[0].out_channels
    y = F.conv2d(x, tap_weight(convs))
    out_dtype = y.dtype
    y = y.float()
    n, _, h, w = y.shape
    out = None
    for k, (dy, dx) in enumerate(tap_shifts(convs)):
        if abs(dy) >= h or abs(dx) >= w:
            continue  # the tap reads only zero padding
        tap = y[:, k * c:(k + 1) * c]
        # out[y, x] += tap[y + dy, x + dx]: pad the far side, crop the near one
        tap = F.pad(tap, (max(0, -dx), max(0, dx), max(0, -dy), max(0, dy)))
        tap = tap[:, :, max(0, dy):max(0, dy) + h, max(0, dx):max(0, dx) + w]
        out = tap if out is None else out + tap
    biases = [conv.bias.float() for conv in convs if conv.bias is not None]
    if biases:
        out = out + sum(biases).view(1, c, 1, 1)
    return out.to(out_dtype)
