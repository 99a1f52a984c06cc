"""Atrous ResNet backbone of DeepLab v2 (Chen et al., TPAMI 2018, Sec. 4).

The layout follows the Caffe MSRA ResNet that the DeepLab init files were converted from
(cf. DeepLab-v2 ``prototxt/ResNet-101``):

* stem: 7x7/2 convolution, BN, ReLU, 3x3/2 max-pool with padding 1 and ``ceil_mode=True``;
* bottleneck: 1x1 (carries the stride), 3x3 dilated (padding = dilation), 1x1 expansion x4;
* layer3 and layer4 run at stride 1 with dilation 2 and 4 in *every* block, the first included,
  which gives an output stride of 8.

Weights trained with the torchvision layout (stride on the 3x3 convolution, ``ceil_mode=False``)
are supported by switching :attr:`ResNet.layout`; the parameters are the same either way.

``stem="v1c"`` builds the ResNet-101 V1c of mmcv/mmsegmentation that DAFormer, HRDA and MIC run
as their DeepLab v2 backbone (``ResNetV1c`` in ``mmseg/models/backbones/resnet.py`` of
lhoyer/DAFormer, identical in lhoyer/HRDA and lhoyer/MIC; their config
``configs/_base_/models/deeplabv2_r50-d8.py`` with depth 101):

* the "deep stem" ``stem``: three 3x3 convolutions ``3 -> width/2`` (stride 2), ``width/2 ->
  width/2``, ``width/2 -> width`` (padding 1, no bias), each followed by BN and ReLU, held as one
  ``nn.Sequential`` whose indices 0-8 are mmseg's (conv 0/3/6, BN 1/4/7, ReLU 2/5/8); then the
  3x3/2 max-pool with padding 1 and ``ceil_mode=False``;
* ``style='pytorch'``: the stride of a stage sits on the 3x3 convolution (our ``"torchvision"``
  layout, the default with this stem);
* ``strides=(1, 2, 1, 1)``, ``dilations=(1, 1, 2, 4)`` with ``contract_dilation=True``: the
  first block of a dilated stage runs at half its dilation (``ResLayer`` in
  ``mmseg/models/utils/res_layer.py``: layer3 block 0 at 1, layer4 block 0 at 2), every other
  block at the stage's 2 or 4.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

#: layout name -> (stride on the first 1x1 conv?, max-pool ceil_mode)
LAYOUTS = {"caffe": (True, True), "torchvision": (False, False)}

#: ``"caffe"``: the 7x7/2 convolution ``conv1`` + ``bn1`` of the DeepLab (MSRA) ResNet;
#: ``"v1c"``: mmseg's ResNetV1c deep stem (three 3x3 convolutions, ``stem.0`` ... ``stem.8``).
STEMS = ("caffe", "v1c")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters.

    ``weight``/``bias`` are parameters with ``requires_grad=False`` (so they are counted and
    saved like BN's) and ``running_mean``/``running_var`` are buffers that nothing updates,
    in train mode or eval mode. The DeepLab init files were trained with batch statistics that
    a batch of 10 crops cannot re-estimate (paper, Sec. 4.1), hence frozen.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scale, shift)`` such that ``bn(x) == x * scale + shift`` per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``. Under autograd with a :class:`FrozenBatchNorm2d`, computed as one
    convolution whose weight is the conv's scaled by the BN (``W * s``, bias ``t``, or
    ``b * s + t``): the same function of the same parameters, with the same gradients (the
    product is part of the graph), but the scale and shift touch the small weight tensor instead
    of two passes over the activations forward and one backward. Measured: the frozen BN's
    elementwise work is most of what a bf16 training step spends outside the convolutions
    (``benchmarks/speed_results.md``). Inference keeps the plain modules (the fast path folds
    them for good)."""
    if (isinstance(bn, FrozenBatchNorm2d) and type(conv) is nn.Conv2d and torch.is_grad_enabled()
            and conv.padding_mode == "zeros" and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()):
        scale, shift = bn.scale_shift()
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return bn(conv(x))


def _downsample(ds: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if isinstance(ds, nn.Sequential) and len(ds) == 2:
        return conv_bn(ds[0], ds[1], x)
    return x if ds is None else ds(x)


#: How the ResNet's BN layers run (``model.bn``):
#:
#: * ``"frozen"``: :class:`FrozenBatchNorm2d`, the DeepLab v2 paper's ``use_global_stats``: the
#:   init file's statistics and affine parameters, in training and at test time alike;
#: * ``"batch"``: ``nn.BatchNorm2d`` (momentum 0.1, eps 1e-5) whose affine parameters are frozen
#:   (``requires_grad=False``) but which normalises by the batch's statistics in ``train()``
#:   mode, updates its running averages with every training forward, and applies them in
#:   ``eval()`` mode: how the released UDA codes run their ResNet-101 (AdaptSegNet
#:   ``model/deeplab_multi.py``, ADVENT ``advent/model/deeplabv2.py``, FDA ``model/deeplab.py``,
#:   DACS ``model/deeplabv2.py``: ``nn.BatchNorm2d(..., affine=True)`` with its parameters'
#:   ``requires_grad = False``, the network in ``model.train()`` while training);
#: * ``"train"``: ``nn.BatchNorm2d`` trained like any layer (from scratch).
BN_MODES = ("frozen", "batch", "train")


def batch_stats_norm(num_features: int) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` with PyTorch's defaults (momentum 0.1, eps 1e-5, affine) whose scale
    and shift get no gradient: the ``"batch"`` mode of :data:`BN_MODES`."""
    bn = nn.BatchNorm2d(num_features)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    return bn


def make_norm(mode: str | bool):
    """Return the norm-layer factory of ``mode`` (one of :data:`BN_MODES`; a bool is the old
    ``frozen_bn`` flag: True "frozen", False "train")."""
    if isinstance(mode, bool):
        mode = "frozen" if mode else "train"
    if mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {mode!r}; expected one of {', '.join(BN_MODES)}")
    return {"frozen": FrozenBatchNorm2d, "batch": batch_stats_norm, "train": nn.BatchNorm2d}[mode]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm=FrozenBatchNorm2d):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def set_stride_in_1x1(self, stride_in_1x1: bool) -> None:
        """Put this block's stride on the 1x1 (Caffe) or on the 3x3 (torchvision) conv."""
        s = (self.stride, self.stride)
        self.conv1.stride, self.conv2.stride = (s, (1, 1)) if stride_in_1x1 else ((1, 1), s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = _downsample(self.downsample, x)
        out = self.relu(conv_bn(self.conv1, self.bn1, x))
        out = self.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        return self.relu(out + identity)


@contextlib.contextmanager
def _keep_running_stats(module: nn.Module):
    """The BN running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)
    of ``module`` as they were on entry, whatever runs inside: a checkpointed block's forward
    run again in the backward pass normalises by the same batch statistics, but must not move
    the running averages a second time. Restored on any exit (the non-reentrant checkpoint
    stops a recomputation early by raising once it has what the backward needs)."""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.BatchNorm2d)
             for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in saved:
                b.copy_(before)


def checkpointed(module: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` (a function of ``module``) under activation checkpointing: only ``x`` is kept
    for the backward pass, which runs ``fn`` again (``use_reentrant=False``: works with DDP,
    inputs without gradient and frozen parameters) with ``module``'s BN running statistics
    left as the first run made them (:func:`_keep_running_stats`)."""
    return torch.utils.checkpoint.checkpoint(
        fn, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _keep_running_stats(module)))


class ResNet(nn.Module):
    """Dilated ResNet returning the stride-8 ``(N, 2048, H/8, W/8)`` features of layer4.

    ``checkpoint_blocks = True`` (``train.checkpoint_backbone``) trades compute for memory
    while gradients are recorded: the stem and each bottleneck keep only their input for the
    backward pass and run their forward again there (about one more backbone forward per
    step); the results, gradients and BN running statistics are those of the plain forward.
    A forward without gradient (an EMA teacher, a frozen ImageNet copy, evaluation) is the
    plain one."""

    checkpoint_blocks = False

    def __init__(self, blocks: tuple[int, int, int, int], frozen_bn: bool = True,
                 layout: str = "caffe", width: int = 64, bn: str | None = None,
                 stem: str = "caffe", contract_dilation: bool = False):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; expected one of {', '.join(STEMS)}")
        if stem == "v1c" and width % 2:
            raise ValueError(f"the v1c stem halves the width: width must be even, got {width}")
        norm = make_norm(bn if bn is not None else frozen_bn)  # bn: one of BN_MODES
        self.blocks = tuple(blocks)
        self.stem_kind = stem
        self.contract_dilation = bool(contract_dilation)
        if stem == "caffe":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm(width)
        else:  # mmseg ResNet._make_stem_layer with deep_stem=True (stem_channels = width)
            half = width // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), norm(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False), norm(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, width, 3, stride=1, padding=1, bias=False), norm(width),
                nn.ReLU(inplace=True))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = width
        # (planes, stride, dilation) per stage; output stride 8 as in the paper (Sec. 3.1).
        stages = [(width, 1, 1), (width * 2, 2, 1), (width * 4, 1, 2), (width * 8, 1, 4)]
        for i, ((planes, stride, dilation), n) in enumerate(zip(stages, blocks), start=1):
            self.add_module(f"layer{i}", self._make_layer(planes, n, stride, dilation, norm))
        self.out_channels = width * 8 * Bottleneck.expansion
        self.layout = "caffe"
        self.set_layout(layout)

    def _make_layer(self, planes, n, stride, dilation, norm) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                norm(planes * 4))
        # contract_dilation (mmseg ResLayer): the first block of a dilated stage at half rate
        first = dilation // 2 if self.contract_dilation and dilation > 1 else dilation
        layers = [Bottleneck(self.inplanes, planes, stride, first, downsample, norm)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, dilation, None, norm) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def set_layout(self, layout: str) -> None:
        """Follow the layout that the loaded weights were trained with (see :data:`LAYOUTS`)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ResNet layout {layout!r}; expected one of {sorted(LAYOUTS)}")
        stride_in_1x1, ceil_mode = LAYOUTS[layout]
        for m in self.modules():
            if isinstance(m, Bottleneck):
                m.set_stride_in_1x1(stride_in_1x1)
        self.maxpool.ceil_mode = ceil_mode
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]

    def stem_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stem before the max-pool: 7x7/2 conv + BN + ReLU, or the v1c deep stem."""
        if self.stem_kind == "caffe":
            return self.relu(conv_bn(self.conv1, self.bn1, x))
        s = self.stem
        for i in (0, 3, 6):
            x = s[i + 2](conv_bn(s[i], s[i + 1], x))
        return x

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer3, layer4)`` stride-8 features: ``(N, 1024, h, w)`` and ``(N, 2048, h, w)``
        for ResNet-101 (layer3 feeds the multi-level auxiliary head of AdaptSegNet/ADVENT)."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return self._checkpointed_features(x)
        x = self.maxpool(self.stem_features(x))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        return x3, self.layer4(x3)

    def _checkpointed_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`features` with the stem and every bottleneck checkpointed (one segment
        each: what stays for the backward is the input of each, about 1/10 of what a
        bottleneck saves)."""
        x = checkpointed(self, lambda t: self.maxpool(self.stem_features(t)), x)
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                x = checkpointed(block, block, x)
        x3 = x
        for block in self.layer4:
            x = checkpointed(block, block, x)
        return x3, x


def set_backbone_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn :attr:`ResNet.checkpoint_blocks` on or off in every ResNet inside ``model`` (a
    DeepLab v2, an HRDA wrapper, MSC); return how many were found (0: no ResNet, e.g. VGG)."""
    found = 0
    for m in model.modules():
        if isinstance(m, ResNet):
            m.checkpoint_blocks = bool(enabled)
            found += 1
    return found
