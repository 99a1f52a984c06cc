"""Static INT8 post-training quantization: ``deeplabv2 quantize``.

The FP32 IR of a checkpoint (:mod:`deeplabv2.deploy.openvino_runtime`) is quantized by NNCF
(``nncf.quantize``, OpenVINO backend): weights per output channel, symmetric; activations per
tensor, their ranges the min/max over ``samples`` crops of the training set drawn as training
draws them (the config's ``TrainTransform``: scale, crop, flip, a fixed seed); bias correction.
The result, ``<checkpoint>.openvino/int8.xml``, is what ``evaluate``/``predict --precision
int8`` run; its ``.json`` records the calibration and the checkpoint's SHA-256.

Three departures from NNCF's defaults, each measured on the demo's trained network
(``benchmarks/accuracy_results.md``; share of labels that differ from FP32 on 400 validation
images, plain NNCF 1.75%):

* the sums that make the scores stay in floating point (:func:`fp32_sums`): NNCF's CPU scheme
  quantizes both inputs of every sum of two activations, so the four ASPP branches' class
  scores were each rounded to 8 bits before being added, and so were the residual sums of
  layer4 (1.75% -> 1.03%; on ResNet-101 these six sums make INT8 1.04x slower, all 36 sums
  1.29x, so the residual sums of layer1-layer3 stay INT8);
* full bias correction rather than the fast one (-> 0.84%);
* the ASPP input's channels equalized first (:func:`equalize_aspp_input`, exact in FP32): its
  per-tensor 8-bit grid was set by a few channels 16x larger than the median channel
  (-> 0.67%).

And one for speed: the graph quantized has its ASPP as one 1x1 convolution of the 36 taps
and shifted sums in floating point (:class:`ExportTapsASPP`; OpenVINO's INT8 kernels for the
dilated 2048 -> 19 convolutions took a third of ResNet-101's time): INT8 1.40x our bf16
where the convolutions' form gave 1.08x in the same run, and 0.661% of the demo model's labels
changed (-0.013 mIoU).

Every INT8 model is checked before it is written: the share of stride-8 scores of
``check_samples`` other training crops whose class differs from the FP32 network's is measured,
recorded in the ``.json`` (``label_change_measured``) and, above ``refuse_above`` (5%), the
model is refused and nothing is written (a ResNet-101 trained here from scratch, whose INT8
changed 77% of the labels, was the reason: see ``benchmarks/accuracy_results.md``).
``--max-label-change`` bounds the share of scores whose class INT8 changes, by NNCF's
accuracy control returning the most harmful operations to floating point.
``--ranges median`` takes each activation's range as the median of the per-crop ranges, for
networks whose activations explode on a few inputs (that ResNet-101's did).

Why NNCF + OpenVINO rather than PyTorch's PT2E (torch 2.13 no longer ships
``torch.ao.quantization.quantize_pt2e``; it lives in torchao): a PT2E model runs fast only
under ``torch.compile`` (Inductor's oneDNN int8 kernels), whose first call at each input size
compiles for tens of seconds (20-60 s for the FP32 ResNet-101 on 2 cores), where the OpenVINO
IR compiles in seconds and the same file serves every size. The PT2E path was not timed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .fast import TapsASPP, fold_batchnorm
from ..data import build_dataset
from ..data.transforms import TrainTransform
from ..model.resnet import Bottleneck
from ..weights import load_model
from .openvino_runtime import (HINTS, MissingRuntime, artefact_dir, convert, int8_precision,
                               require_openvino, save_ir, write_sidecar)

#: calibration crops whose ASPP input sets the equalization (per-channel maxima)
EQUALIZE_SAMPLES = 32
#: ``--ranges``: NNCF's range estimator for the activations
RANGES = {"minmax": "MINMAX", "median": "MEDIAN_MINMAX"}
RANGES_TEXT = {"minmax": "min/max ranges", "median": "median of per-crop min/max ranges"}


def quantize_checkpoint(checkpoint, dataset: str, root, split: str, *, crop_size,
                        scale_range=(0.5, 1.5), scales=None, flip: bool = True,
                        options: dict | None = None, samples: int = 300, seed: int = 0,
                        out=None, progress: bool = True, max_label_change: float | None = None,
                        check_samples: int = 50, refuse_above: float = 0.05,
                        bias_correction: str = "full", ranges: str = "minmax") -> Path:
    """Quantize ``checkpoint`` to INT8 with ``samples`` calibration crops of the training set
    (:class:`TrainingCrops` of ``dataset`` at ``root``, split ``split``, dataset ``options``,
    drawn as training draws them: ``crop_size``, ``scale_range``, ``scales``, ``flip``, the
    checkpoint's own preprocessing); writes and returns ``<checkpoint>.openvino/int8.xml`` (or
    ``out``). The command line (``deeplabv2 quantize -c CONFIG``) passes the config's ``data``
    section.

    ``max_label_change`` (a fraction, e.g. 0.005) bounds what INT8 may change: NNCF's
    accuracy-controlled quantization (``nncf.quantize_with_accuracy_control``) ranks the
    quantized operations by how much they change the result and returns them to floating point,
    most harmful first, until the share of stride-8 scores whose class differs from the FP32
    network's is at most that, on ``check_samples`` other training crops (no labels and no
    validation images are used). Slower to make, and the operations left in floating point
    run at FP32 speed.

    ``bias_correction``: NNCF's full bias correction (``"full"``, the default) or its fast one
    (``"fast"``, quicker to make on small crops, about as quick at 513x1025; on the demo model
    0.89% of the labels changed against 0.67%).

    ``ranges``: each activation's range is the min/max over the crops (``"minmax"``, the
    default) or the median over the crops of each crop's min/max (``"median"``), which ignores
    inputs on which a network's activations explode (a ResNet-101 trained here from scratch,
    with ``bias_correction="fast"``: 8.7% of the labels changed and +3.6 mIoU, against 90%
    with min/max; full bias correction gave 17%, its mean shifts likely dominated by those
    inputs; on the demo model min/max is better, 0.67% against 1.72%). The ASPP input's
    equalization uses the same statistic.

    Whatever the mode, the result's share of changed classes on the check crops is measured
    and recorded; above ``refuse_above`` a :class:`QuantizationRefused` is raised and nothing
    is written."""
    ov = require_openvino()
    try:
        import nncf
    except ImportError:
        raise MissingRuntime("quantization needs NNCF: pip install 'deeplabv2[openvino]' "
                           "(or pip install nncf)") from None
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    if max_label_change is not None and not 0 <= max_label_change < 1:
        raise ValueError(f"max_label_change is a fraction in [0, 1), got {max_label_change}")
    if not 0 <= refuse_above <= 1:
        raise ValueError(f"refuse_above is a fraction in [0, 1], got {refuse_above}")
    if check_samples < 1:
        raise ValueError(f"check_samples must be positive, got {check_samples}")
    if ranges not in RANGES:
        raise ValueError(f"ranges is one of {sorted(RANGES)}, got {ranges!r}")
    if bias_correction not in ("full", "fast"):
        raise ValueError(f"bias_correction is 'full' or 'fast', got {bias_correction!r}")
    model = load_model(checkpoint).eval()
    crops = TrainingCrops(dataset, root, split, crop_size=crop_size, scale_range=scale_range,
                          scales=scales, flip=flip, options=options,
                          preprocessing=model.preprocessing, seed=seed)

    start = time.perf_counter()
    # activation ranges from the min/max over the crops: NNCF's default (mean of per-crop
    # quantiles) clipped the demo model's logits by up to 80% of their range, min/max by 20%
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, RANGES[ranges]))
    images = crops.draw(samples)
    check = crops.draw(check_samples, stream=1)
    reference = _compile(ov, convert(model))
    expected = [_classes(reference, x) for x in check]  # the checkpoint's own FP32 classes
    net = fold_batchnorm(model).eval()
    equalized = equalize_aspp_input(net, images[:EQUALIZE_SAMPLES],
                                    statistic="max" if ranges == "minmax" else "median")
    net = with_taps_head(net)
    ov_model = convert(net)
    ignored = nncf.IgnoredScope(names=fp32_sums(ov_model, net))
    common = dict(subset_size=samples, preset=nncf.QuantizationPreset.PERFORMANCE,
                  fast_bias_correction=bias_correction == "fast", ignored_scope=ignored)
    extra = {}
    if max_label_change is None:
        quantized = nncf.quantize(ov_model, nncf.Dataset(images), advanced_parameters=advanced,
                                  **common)
    else:
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, nncf.Dataset(images), nncf.Dataset(check),
            lambda compiled, data: _agreement(compiled, data, expected),
            max_drop=max_label_change, drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced, **common)
        extra = {"max_label_change": max_label_change}
    runs_as = int8_precision()  # what --precision int8 will run here: check that
    changed = 1 - _agreement(_compile(ov, quantized, HINTS[runs_as]), check, expected)[0]
    if changed > refuse_above:
        raise QuantizationRefused(
            f"{checkpoint}: INT8 changes the class of {100 * changed:.2f}% of the stride-8 "
            f"scores of {check_samples} check crops (refuse_above {100 * refuse_above:g}%); "
            f"nothing written. Try --ranges median --bias-correction fast (if the network's "
            f"activations explode on some inputs), --max-label-change (keeps the harmful "
            f"operations in floating point) or raise --refuse-above to keep it anyway")
    extra.update(check_samples=int(check_samples), label_change_measured=round(changed, 6),
                 checked_as=runs_as,
                 operations_in_fp32=_fp32_operations(quantized))
    xml = save_ir(quantized, Path(out) if out else artefact_dir(checkpoint) / "int8.xml")
    write_sidecar(xml, checkpoint, precision="int8", toolchain=f"nncf {nncf.__version__}, "
                  f"openvino {ov.__version__}", samples=int(samples), seed=int(seed),
                  dataset=dataset, split=split, crop_size=list(crop_size),
                  weights="int8 symmetric per output channel",
                  activations=f"int8 per tensor, {RANGES_TEXT[ranges]} (PERFORMANCE preset)",
                  ranges=ranges,
                  sums_in_fp32=list(ignored.names), bias_correction=bias_correction,
                  aspp_input_equalized=equalized is not None,
                  aspp_as_taps=isinstance(net.head, ExportTapsASPP),
                  seconds=round(time.perf_counter() - start, 1), **extra)
    return xml


@torch.no_grad()
def equalize_aspp_input(net: nn.Module, images, alpha: float = 0.5,
                        statistic: str = "max") -> torch.Tensor | None:
    """Rescale the channels of the ASPP input of the BN-folded ResNet DeepLab ``net`` in place
    so that their ranges over ``images`` (preprocessed ``(1, 3, h, w)`` arrays) are closer to
    one another, without changing the network's function; return the scales, or None where
    the backbone is not a ResNet of bottleneck blocks (VGG).

    The ASPP input is the residual stream of layer4 (on the demo's trained network its largest
    channel reaches 16x the median channel's maximum, and an 8-bit per-tensor grid is set by
    the largest). Dividing that stream's channel ``j`` by ``s_j > 0`` is exact: every layer4
    block's ``conv3`` and the first block's shortcut convolution divide their output channel
    ``j`` (weights and bias), which commutes with the residual sums and the ReLUs, and every
    reader of the stream (the next blocks' ``conv1``, the ASPP convolutions) multiplies its
    input channel ``j``. ``s_j = r_j ** alpha / w_j ** (1 - alpha)`` (SmoothQuant's rule; ``r_j``
    the channel's largest value, ``w_j`` its largest weight in the readers, each relative to
    that reader's largest) balances the activation grid against the readers' per-channel
    weight grids. ``statistic="median"`` takes ``r_j`` as the median over the images of each
    image's largest value (for ``quantize --ranges median``)."""
    blocks = list(getattr(net.backbone, "layer4", ()))
    if not blocks or not hasattr(net.head, "convs") \
            or not all(isinstance(b, Bottleneck) for b in blocks) \
            or not isinstance(blocks[0].downsample, nn.Sequential):
        return None
    producers = [b.conv3 for b in blocks] + [blocks[0].downsample[0]]
    readers = [b.conv1 for b in blocks[1:]] + list(net.head.convs)
    if any(p.bias is None for p in producers):
        raise ValueError("equalize_aspp_input needs a BN-folded network (fold_batchnorm)")
    if statistic not in ("max", "median"):
        raise ValueError(f"statistic is 'max' or 'median', got {statistic!r}")
    per_image = torch.stack([net.backbone(torch.as_tensor(x)).amax(dim=(0, 2, 3))
                             for x in images])
    r = per_image.amax(0) if statistic == "max" else per_image.median(0).values
    w = torch.zeros_like(r)
    for c in readers:
        wc = c.weight.abs().amax(dim=(0, 2, 3))
        w = torch.maximum(w, wc / wc.max())
    r = r.clamp_min(r.max() * 1e-4)  # a channel that never fires keeps a finite scale
    w = w.clamp_min(w.max() * 1e-4)
    s = r.pow(alpha) / w.pow(1 - alpha)
    s = s / s.log().mean().exp()  # geometric mean 1: magnitudes stay where they were
    for p in producers:
        p.weight.div_(s.view(-1, 1, 1, 1))
        p.bias.div_(s)
    for c in readers:
        c.weight.mul_(s.view(1, -1, 1, 1))
    return s


class ExportTapsASPP(TapsASPP):
    """The summed ASPP head, for the INT8 graph, as one 1x1 convolution of its branches' 36
    taps and shifted sums: :class:`deeplabv2.deploy.fast.TapsASPP` (same weights, shifts and bias)
    with a forward that traces into one graph for every input size. The dilated 2048 -> 19
    convolutions of the original are the slowest INT8 operations in OpenVINO (191 of 538 ms
    of ResNet-101 at 512x1024 on a 2-core AMX Xeon for 3% of the FLOPs), where a 2048 -> 684
    1x1 convolution is a plain INT8 GEMM. Each tap map is cut from the taps padded by the
    largest rate, with constant offsets from either end; taps that fall wholly in the padding
    add zeros. Its weights are quantized per tap and class (684 output channels instead of
    19), and the shifted sums stay in floating point (:func:`fp32_sums`)."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__(convs)
        self.pad = max(max(abs(dy), abs(dx)) for dy, dx in self.shifts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.pad, self.num_classes
        y = F.pad(self.taps(x), (p, p, p, p))
        out = None
        for k, (dy, dx) in enumerate(self.shifts):
            # out[y, x] += tap[y + dy, x + dx]: rows p + dy ... (h + 2p) - (p - dy) of the padded
            tap = y[:, k * c:(k + 1) * c, p + dy:_from_end(p - dy), p + dx:_from_end(p - dx)]
            out = tap if out is None else out + tap
        return out + self.bias.view(1, c, 1, 1)


def _from_end(n: int):
    return -n if n > 0 else None


def with_taps_head(net: nn.Module) -> nn.Module:
    """A copy of the BN-folded ``net`` whose summed ASPP head (3x3 branches) is an
    :class:`ExportTapsASPP`; ``net`` itself where the head is of another kind (VGG-16's
    DeepLab-ASPP-L branches)."""
    if not hasattr(getattr(net, "head", None), "summed_convs"):
        return net
    out = copy.deepcopy(net)
    try:
        out.head = ExportTapsASPP(out.head.summed_convs())
    except ValueError:  # branches that are not plain 3x3 convolutions
        return net
    return out


def fp32_sums(ov_model, net: nn.Module) -> list[str]:
    """Names of the operations of ``ov_model`` (the IR of ``net``) that NNCF must leave in
    floating point: the sums of two activations in the ASPP (its branches' class scores, or
    its taps' with :class:`ExportTapsASPP`) and in layer4 (its residual sums). The other residual sums stay INT8: on ResNet-101 keeping
    all 36 sums in FP32 made INT8 1.29x slower, these six 1.04x
    (``benchmarks/accuracy_results.md``)."""
    names = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Add" or any(
                i.get_source_output().get_node().get_type_name() in ("Constant", "Convert")
                for i in op.inputs()):
            continue  # a convolution's bias, not a sum of two activations
        name = op.get_friendly_name()
        if ".head/" in name or ".layer4." in name:
            names.append(name)
    head = net.head
    if isinstance(head, ExportTapsASPP):
        branches = len(head.shifts)
    elif hasattr(head, "summed_convs"):
        branches = len(head.summed_convs())
    else:
        branches = len(getattr(head, "branches", (head,)))
    expected = branches - 1 + len(getattr(net.backbone, "layer4", ()))
    if len(names) != expected:
        raise RuntimeError(f"found {len(names)} ASPP/layer4 sums in the OpenVINO model where "
                           f"the network has {expected}: the converter's operation names "
                           f"changed ({names[:4]})")
    return names


class TrainingCrops:
    """Crops of a training set drawn as training draws them (a ``TrainTransform`` of
    ``crop_size``, ``scale_range``, ``scales`` and ``flip``: scale, crop, flip), each an
    ``(1, 3, h, w)`` float32 array preprocessed with ``preprocessing``; reproducible from
    ``seed``. The set is ``build_dataset(dataset, root, split, seed=seed, **options)`` (a
    config's ``data.dataset``, ``data.root``, ``data.train_split``, ``data.options``).
    Successive :meth:`draw` calls pick their images from one seeded generator; ``stream``
    keeps their augmentations apart."""

    def __init__(self, dataset: str, root, split: str, *, crop_size, preprocessing,
                 scale_range=(0.5, 1.5), scales=None, flip: bool = True,
                 options: dict | None = None, seed: int = 0):
        self.dataset = build_dataset(dataset, root, split, seed=seed, **(options or {}))
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {dataset!r} split {split!r} is empty")
        self.transform = TrainTransform(
            crop_size=tuple(crop_size), scale_range=tuple(scale_range), scales=scales,
            flip=flip, preprocessing=preprocessing)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def draw(self, count: int, stream: int = 0) -> list[np.ndarray]:
        """``count`` crops of distinct images (repeating only when the set is smaller)."""
        n = len(self.dataset)
        order = self._rng.permutation(max(count, n))[:count] % n
        out = []
        for k, index in enumerate(order):
            image, label = self.dataset.load(int(index))
            key = [self.seed, k] if stream == 0 else [self.seed, stream, k]
            out.append(self.transform(image, label, np.random.default_rng(key))["image"][None]
                       .float().numpy())
        return out


class QuantizationRefused(ValueError):
    """The INT8 model changes more classes than ``refuse_above`` allows; nothing was written."""


def _compile(ov, model, hint: str = "f32"):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})


def _classes(compiled, x) -> np.ndarray:
    return compiled(x)[0].argmax(1)


def _agreement(compiled, data, expected) -> tuple[float, list[float]]:
    """NNCF's validation metric for ``--max-label-change``: the share of stride-8 scores whose
    class is FP32's (``expected``), overall and per crop (NNCF ranks with per-item values)."""
    per = [float((_classes(compiled, x) == expected[i]).mean()) for i, x in enumerate(data)]
    return float(np.mean(per)), per


def _fp32_operations(model) -> int:
    """Convolutions of ``model`` whose weights stayed floating point (neither behind a
    FakeQuantize nor int8 constants)."""
    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape"):
            source = source.input_value(0).get_node()
        quantized = source.get_type_name() == "FakeQuantize" or \
            source.get_output_element_type(0).get_type_name() in ("i8", "u8")
        count += not quantized
    return count
