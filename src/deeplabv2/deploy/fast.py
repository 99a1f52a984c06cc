"""Faster inference: batch norm folded into the convolutions, channels-last, fused ResNet
blocks, Winograd atrous convolutions, bf16/fp16, compile.

* :func:`fold_batchnorm` returns a copy in which every BN that directly follows a convolution
  is merged into that convolution (``W' = W * s``, ``b' = b * s + t`` with ``bn(y) = y * s + t``)
  and replaced by ``nn.Identity``: the same function, 53 fewer elementwise passes over the
  feature maps of ResNet-101.
* :class:`FusedBottleneck` runs a folded ResNet block's ReLUs and residual sum as post-ops of
  its oneDNN convolutions (CPU), whose weights are reordered into oneDNN's blocked layout once
  (:func:`_packed_weight`), not at every call; :class:`PrepackedConv2d` does the same for the
  other convolutions.
* :class:`TapsASPP` runs the summed ASPP head as one 1x1 convolution of its 36 taps and
  shifted sums (oneDNN has no efficient kernel for 2048->19 dilated convolutions, in bf16
  least of all).
* :mod:`deeplabv2.deploy.atrous` runs the dilated 3x3 convolutions of layer3/layer4 as one Winograd
  convolution over the tiled sub-grids (CPU, fp32): NNPACK's on AVX2 CPUs, F(6x6, 3x3)
  through torch's GEMM on AVX-512 ones (:func:`winograd_backend`).
* :func:`optimize_for_inference` puts these together with the memory layout, the precision
  and ``torch.compile``, and returns an :class:`InferenceModel` that takes and returns
  ``float32`` tensors. ``deeplabv2 evaluate`` and ``predict`` run it by default
  (``--precision``, ``--eager``, ``--compile``).

Which BN "follows a conv" is read from the module structure, not traced: inside an
``nn.Sequential`` a BN right after a conv, and elsewhere a child ``bn<k>`` next to a child
``conv<k>`` (the naming of :mod:`deeplabv2.model.resnet`, where ``bn<k>`` is always applied to
the output of ``conv<k>`` and to nothing else).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .atrous import AtrousWinogradConv2d, nnpack_available, use_atrous_winograd
from ..model.aspp import ASPP, tap_shifts, tap_weight
from ..model.deeplab import NetworkWrapper
from ..model.resnet import Bottleneck, FrozenBatchNorm2d

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of a foldable BN, or None (a training-mode or stat-less BatchNorm)."""
    if isinstance(bn, FrozenBatchNorm2d):
        return bn.scale_shift()
    if isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None:
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift
    return None


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names ``(conv, bn)`` of the direct children of ``module`` where the BN follows the conv."""
    children = dict(module.named_children())
    pairs = []
    if isinstance(module, nn.Sequential):
        names = list(children)
        pairs = [(a, b) for a, b in zip(names, names[1:])]
    else:
        pairs = [(f"conv{name[2:]}", name) for name in children if name.startswith("bn")]
    return [(c, b) for c, b in pairs
            if isinstance(children.get(c), nn.Conv2d)
            and isinstance(children.get(b), (FrozenBatchNorm2d, nn.BatchNorm2d))]


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    if conv.out_channels != scale.numel():
        raise ValueError(f"cannot fold a BN of {scale.numel()} channels into a conv with "
                         f"{conv.out_channels} output channels")
    dtype = conv.weight.dtype
    # float64 so that the product is rounded once, to the conv's dtype.
    scale64, shift64 = scale.double(), shift.double()
    weight = conv.weight.double() * scale64.view(-1, 1, 1, 1)
    bias = shift64 if conv.bias is None else conv.bias.double() * scale64 + shift64
    conv.weight.copy_(weight.to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with each conv -> BN pair merged into the conv.

    Folded: every :class:`FrozenBatchNorm2d`, and every ``nn.BatchNorm2d`` in eval mode (its
    running statistics are what it applies then); a BatchNorm2d in training mode normalises by
    batch statistics and is left as it is. The BN is replaced by ``nn.Identity`` and the conv
    gains a bias, so the parameter count drops by ``num_features`` per folded BN (scale and
    shift, ``2 * C``, become a conv bias of ``C``). The result equals the original up to float
    rounding; ``model`` itself is not changed.
    """
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            bn = getattr(module, bn_name)
            scale_shift = _bn_scale_shift(bn)
            if scale_shift is None:
                continue
            _fold_into(getattr(module, conv_name), *scale_shift)
            setattr(module, bn_name, nn.Identity())
    return folded


def winograd_backend() -> str | None:
    """Which Winograd form of the dilated 3x3 convolutions (:mod:`deeplabv2.deploy.atrous`) beats
    oneDNN's direct kernels on this CPU, by PyTorch's best vector ISA: ``"nnpack"`` on AVX2
    (NNPACK's kernels; measured 1.1-2x per layer on a 2-core AVX2 AMD EPYC, where oneDNN has no
    Winograd kernel), ``"gemm"`` on AVX-512 (F(6x6, 3x3) through torch's batched GEMM: 1.26x
    oneDNN's direct kernels on ResNet-101 at 512x1024 on a 2-core Xeon with AMX, whose fp32
    runs on the same AVX-512 units as on one without; NNPACK, AVX2 only, is slower than oneDNN
    there), and None elsewhere (not measured). The GEMM form's weights take 64/9 of the 3x3
    weights' memory: ~0.6 GB more for ResNet-101. Results in ``benchmarks/winograd_results.md``."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return "nnpack" if nnpack_available() else None
    return "gemm" if capability.startswith("AVX512") else None


class _PackedWeights(dict):
    """dtype -> (source weight, packed weight); copies and pickles start empty (opaque oneDNN
    tensors have no storage to copy, and the copy packs its own on its first call)."""

    def __deepcopy__(self, memo):
        return _PackedWeights()

    def __reduce__(self):
        return (_PackedWeights, ())


def _packed_weight(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv.weight`` reordered once into oneDNN's blocked layout for inputs like ``x``
    (cached on the module per dtype), as Inductor's freezing does: a plain weight is reordered
    again on every call, which costs up to half the time of a bf16 1x1 convolution. The cached
    copy is an opaque ``torch._mkldnn`` tensor, not a parameter: state dicts do not see it."""
    cache = conv.__dict__.setdefault("_onednn_weights", _PackedWeights())
    packed = cache.get(x.dtype)
    if packed is None or packed[0] is not conv.weight:
        w = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, list(x.shape))
        packed = cache[x.dtype] = (conv.weight, w)
    return packed[1]


def _mkldnn_conv(conv: nn.Conv2d, x: torch.Tensor, unary: str = "none",
                 other: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """``conv(x)``, then ``+ other`` if given, then ``unary`` ("relu" or "none"), in one
    oneDNN convolution with post-ops and a prepacked weight (the CPU kernels
    ``torch.compile`` with freezing also lowers to)."""
    args = (_packed_weight(conv, x), conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *args, unary, [], "")
    if inplace:  # oneDNN's "sum" post-op accumulates into ``other``: measured 1.2-1.8x faster
        return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, *args, "add", 1.0,
                                                               unary, [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *args, "add", 1.0, unary,
                                                          [], "")


def _fusable(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution takes ``x`` (bf16 only on CPUs with native bf16)."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.is_contiguous(memory_format=torch.channels_last)
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16
                                              and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


class FusedBottleneck(nn.Module):
    """A BN-folded :class:`~deeplabv2.model.resnet.Bottleneck` whose ReLUs and residual sum run
    as post-ops of its convolutions on the CPU: conv1+ReLU, conv2+ReLU and conv3+identity+ReLU
    each in one pass, where the plain block makes separate passes over its 256-2048-channel
    maps for every ReLU and for the sum. Same function (tests); other devices, dtypes, layouts
    and autograd take the plain path."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        if not all(isinstance(getattr(block, f"bn{k}"), nn.Identity) for k in (1, 2, 3)):
            raise ValueError("FusedBottleneck needs a block whose BNs are folded")
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        ds = block.downsample
        if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2
                                   and isinstance(ds[0], nn.Conv2d)
                                   and isinstance(ds[1], nn.Identity)):
            raise ValueError("FusedBottleneck needs a folded (conv, Identity) downsample")
        self.downsample = None if ds is None else ds[0]
        # The residual sum may overwrite the identity in place when it is the downsample's
        # output, or when the block's input is an intermediate nobody else reads (set by
        # fuse_bottlenecks for blocks after the first of a layer).
        self.input_is_private = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fusable(x):
            identity = x if self.downsample is None else self.downsample(x)
            out = torch.relu(self.conv1(x))
            out = torch.relu(self.conv2(out))
            return torch.relu(self.conv3(out) + identity)
        identity = x if self.downsample is None else _mkldnn_conv(self.downsample, x)
        out = _mkldnn_conv(self.conv1, x, "relu")
        if isinstance(self.conv2, AtrousWinogradConv2d):  # its ReLU fused into its last pass
            out = self.conv2(out, relu=True)
        else:
            out = _mkldnn_conv(self.conv2, out, "relu")
        inplace = self.downsample is not None or self.input_is_private
        return _mkldnn_conv(self.conv3, out, "relu", other=identity, inplace=inplace)


def fuse_bottlenecks(model: nn.Module) -> int:
    """Replace, in place, every BN-folded Bottleneck of ``model`` by a :class:`FusedBottleneck`;
    returns how many (0 where this torch has no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    replaced = 0
    for module in list(model.modules()):
        previous = None
        for name, child in list(module.named_children()):
            if isinstance(child, Bottleneck):
                try:
                    fused = FusedBottleneck(child)
                except ValueError:
                    previous = None
                    continue
                # inside a Sequential, a block after a fused block reads only its output
                fused.input_is_private = isinstance(module, nn.Sequential) and \
                    isinstance(previous, FusedBottleneck)
                setattr(module, name, fused)
                previous = fused
                replaced += 1
            else:
                previous = child
    return replaced


class TapsASPP(nn.Module):
    """The summed ASPP head as *one* 1x1 convolution and shifted sums.

    A branch ``w`` of rate ``d`` computes ``out[y, x] = sum_ij w[:, :, i, j] @ x[y + (i-1) d,
    x + (j-1) d]`` (zero outside the map): each of its 9 taps is a 1x1 convolution of ``x``,
    shifted. All 36 taps of the 4 branches are stacked into one 1x1 convolution of
    ``36 * num_classes`` output channels (the same FLOPs, but one large GEMM-like convolution
    instead of four dilated ones with 19-21 output channels, for which oneDNN has no efficient
    kernel: a bf16 2048->19 rate-12 convolution at 65x129 took 480 ms on an AMX Xeon where this
    form takes a few tens), then the tap maps are shifted and summed in float32, with the
    branches' biases. Same function up to float rounding (tests); autograd and other inputs
    take the branch convolutions."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        if not convs or not all(_aspp_branch(c) for c in convs):
            raise ValueError("TapsASPP needs 3x3 stride-1 convolutions with padding == dilation")
        self.branches = nn.ModuleList(convs)
        c, cin = convs[0].out_channels, convs[0].in_channels
        weight = tap_weight(convs)
        self.taps = nn.Conv2d(cin, weight.shape[0], 1, bias=False).to(weight.device, weight.dtype)
        self.taps.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.shifts = tap_shifts(convs)
        bias = sum(conv.bias.detach().float() for conv in convs if conv.bias is not None)
        self.register_buffer("bias", torch.zeros(c) + bias)
        self.num_classes = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            out = self.branches[0](x)
            for conv in self.branches[1:]:
                out = out + conv(x)
            return out
        y = _mkldnn_conv(self.taps, x) if _fusable(x) else self.taps(x)
        n, _, h, w = y.shape
        c = self.num_classes
        # channels last: tap k of a pixel is the k-th run of c values (a view of oneDNN's
        # channels-last output; 5x faster to sum than after a copy to NCHW planes)
        y = y.permute(0, 2, 3, 1).reshape(n, h, w, len(self.shifts), c)
        out = self.bias.expand(n, h, w, c).contiguous()
        for k, (dy, dx) in enumerate(self.shifts):
            if abs(dy) >= h or abs(dx) >= w:
                continue  # the tap reads only padding
            y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
            out[:, y0:y1, x0:x1] += y[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx, k]
        out = out.permute(0, 3, 1, 2).to(x.dtype)  # (n, c, h, w), stored channels-last
        if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            out = out.contiguous()
        return out


def _aspp_branch(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding == conv.dilation
            and conv.padding_mode == "zeros")


def fuse_aspp(model: nn.Module) -> int:
    """Replace, in place, every summed :class:`~deeplabv2.model.aspp.ASPP` head of ``model``
    by a :class:`TapsASPP`; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ASPP):
                try:
                    setattr(module, name, TapsASPP(child.summed_convs()))
                    replaced += 1
                except ValueError:
                    pass
    return replaced


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that, for CPU inference on channels-last fp32/bf16 input, runs as a
    oneDNN convolution with its weight prepacked once (:func:`_packed_weight`): the stem and
    any other convolution outside the fused blocks. Autograd and other inputs: ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and _fusable(x):
            return _mkldnn_conv(self, x)
        return super().forward(x)


def prepack_convolutions(model: nn.Module) -> int:
    """Turn, in place, every plain ``nn.Conv2d`` of ``model`` into a :class:`PrepackedConv2d`
    (same parameters; call it after the fusions, which take plain convolutions); returns how
    many (0 where this torch has no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    for conv in convs:
        conv.__class__ = PrepackedConv2d
    return len(convs)


class InferenceModel(NetworkWrapper):
    """A model prepared by :func:`optimize_for_inference`.

    ``forward(x, upsample=True)`` takes the usual preprocessed ``float32`` ``(N, 3, H, W)``
    input, converts it to the model's layout and dtype, and returns ``float32`` logits
    ``(N, C, H, W)`` (or the stride-8 scores with ``upsample=False``), possibly stored
    channels-last. ``.model`` is the folded network (or its compiled wrapper); the facts
    (config, preprocessing, ...) are ``source``'s, which is not kept.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool,
                 source: nn.Module):
        super().__init__(source)
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x, upsample=upsample).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-8 ``float32`` scores ``(N, C, H // 8 + 1, W // 8 + 1)``."""
        return self(x, upsample=False)


def optimize_for_inference(model: nn.Module, *, precision: str = "fp32",
                           channels_last: bool = True, fuse: bool | None = None,
                           winograd: bool | str | None = None,
                           compile: bool = False) -> InferenceModel:
    """An eval-mode, BN-folded copy of ``model`` for inference only (``model`` is unchanged).

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"``. Reduced precision converts the *weights*
    once (``model.to(bfloat16)``) and the input at each call, rather than running under
    ``torch.autocast``: autocast re-casts every conv weight on every call, and on the CPU that
    costs time without saving any (see ``benchmarks/speed_results.md``). The logits come back
    as float32; expect ~1e-2 relative differences from fp32. On a CPU without native bf16
    bf16 convolutions are emulated and slower than fp32, and on one with AVX512-BF16 but no AMX
    bf16 is still measured slower than fp32: :func:`deeplabv2.precision.bf16_pays` says
    where it pays (``--precision auto``); fp16 is slower still.

    ``channels_last`` stores weights and activations NHWC, the layout oneDNN convolutions run
    in natively. ``fuse`` runs each ResNet block's ReLUs and residual sum as post-ops of its
    convolutions (:class:`FusedBottleneck`), the ASPP as :class:`TapsASPP` and every
    convolution with a prepacked weight (``None``: on for channels-last on the CPU).
    ``winograd`` runs the dilated 3x3 convolutions of layer3/layer4 as tiled
    Winograd convolutions (:mod:`deeplabv2.deploy.atrous`; ~1e-5 relative rounding per layer):
    ``"nnpack"`` or ``"gemm"``, ``True`` for this CPU's choice (``"gemm"`` where it has none),
    ``None`` (default) for fp32 on the CPU where one is measured to pay
    (:func:`winograd_backend`: NNPACK on AVX2, GEMM on AVX-512).
    ``compile=True`` wraps the network in ``torch.compile`` with freezing on the CPU (needs a
    C++ compiler there; the first call then takes 20-60 s for ResNet-101 on 2 cores), in
    place of ``fuse`` and ``winograd``.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    was_training = model.training
    net = fold_batchnorm(model.eval()).eval()  # eval first: BatchNorm2d folds its running stats
    model.train(was_training)
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.to(DTYPES[precision])
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if winograd is None:
        winograd = on_cpu and precision == "fp32" and not compile and winograd_backend()
    elif winograd is True:
        winograd = winograd_backend() or "gemm"
    if winograd:  # after the layout change: NNPACK wants its weights NCHW, kept as they are
        if not on_cpu or precision != "fp32":
            raise ValueError("winograd needs an fp32 model on the CPU")
        use_atrous_winograd(net, backend=winograd)
    if fuse is None:
        fuse = on_cpu and channels_last and not compile
    if fuse:
        fuse_bottlenecks(net)
        fuse_aspp(net)
        prepack_convolutions(net)
    if compile:
        # freezing: weights become constants, so Inductor prepacks them for oneDNN and fuses
        # the convolutions' bias, ReLU and sums (CPU inference; it is ignored on the GPU)
        net = torch.compile(net, options={"freezing": on_cpu})
    return InferenceModel(net, DTYPES[precision], channels_last, model).eval()
