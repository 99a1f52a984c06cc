"""Static INT8 post-training quantization: ``deeplabv2 quantize``.

The FP32 IR of a checkpoint (:mod:`deeplabv2.deploy.openvino_runtime`) is quantized by NNCF
(``nncf.quantize``, OpenVINO backend): weights per output channel, symmetric; activations per
tensor, their ranges the min/max over ``samples`` crops of the training set drawn as training
draws them (the config's ``TrainTransform``: scale, crop, flip, a fixed seed); fast bias
correction. The result, ``<checkpoint>.openvino/int8.xml``, is what ``evaluate``/``predict
--precision int8`` run; its ``.json`` records the calibration and the checkpoint's SHA-256.
Every INT8 model is checked before it is written: the share of stride-8 scores of
``check_samples`` other training crops whose class differs from the FP32 network's is measured,
recorded in the ``.json`` (``label_change_measured``) and, above ``refuse_above`` (5%), the
model is refused and nothing is written (a trained ResNet-101 whose plain INT8 changed 77% of
the labels was the reason: see ``benchmarks/accuracy_results.md``).
``--max-label-change`` bounds the share of scores whose class INT8 changes, by NNCF's
accuracy control returning the most harmful operations to floating point
(``benchmarks/accuracy_results.md``: on the demo network plain INT8 changes 1.75% of the
labels; ``--max-label-change 0.005`` kept 14 of its 21 convolutions in FP32 and changed
0.31%).

Why NNCF + OpenVINO rather than PyTorch's PT2E (torch 2.13 no longer ships
``torch.ao.quantization.quantize_pt2e``; it lives in torchao): a PT2E model runs fast only
under ``torch.compile`` (Inductor's oneDNN int8 kernels), whose first call at each input size
compiles for tens of seconds (20-60 s for the FP32 ResNet-101 on 2 cores), where the OpenVINO
IR compiles in seconds and the same file serves every size. The PT2E path was not timed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .openvino_runtime import MissingRuntime, artefact_dir, convert, require_openvino, write_sidecar


def quantize_checkpoint(checkpoint, cfg, *, samples: int = 300, seed: int = 0,
                        out=None, progress: bool = True, max_label_change: float | None = None,
                        check_samples: int = 50, refuse_above: float = 0.05) -> Path:
    """Quantize ``checkpoint`` to INT8 with ``samples`` calibration crops of ``cfg``'s training
    set; writes and returns ``<checkpoint>.openvino/int8.xml`` (or ``out``).

    ``max_label_change`` (a fraction, e.g. 0.005) bounds what INT8 may change: NNCF's
    accuracy-controlled quantization (``nncf.quantize_with_accuracy_control``) ranks the
    quantized operations by how much they change the result and returns them to floating point,
    most harmful first, until the share of stride-8 scores whose class differs from the FP32
    network's is at most that, on ``check_samples`` other training crops (no labels and no
    validation images are used). Slower to make, and the operations left in floating point
    run at FP32 speed.

    Whatever the mode, the result's share of changed classes on the check crops is measured
    and recorded; above ``refuse_above`` a :class:`QuantizationRefused` is raised and nothing
    is written."""
    ov = require_openvino()
    try:
        import nncf
    except ImportError:
        raise MissingRuntime("quantization needs NNCF: pip install 'deeplabv2[openvino]' "
                           "(or pip install nncf)") from None
    from ..weights import load_model
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    if max_label_change is not None and not 0 <= max_label_change < 1:
        raise ValueError(f"max_label_change is a fraction in [0, 1), got {max_label_change}")
    if not 0 <= refuse_above <= 1:
        raise ValueError(f"refuse_above is a fraction in [0, 1], got {refuse_above}")
    if check_samples < 1:
        raise ValueError(f"check_samples must be positive, got {check_samples}")
    model = load_model(checkpoint).eval()
    d = cfg.data
    crops = TrainingCrops(cfg, model.preprocessing, seed=seed)

    start = time.perf_counter()
    ov_model = convert(model)
    # activation ranges from the min/max over the crops: NNCF's default (mean of per-crop
    # quantiles) clipped the demo model's logits by up to 80% of their range, min/max by 20%
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    calibration = nncf.Dataset(crops.draw(samples))
    check = crops.draw(check_samples, stream=1)
    reference = _compile(ov, ov_model)
    expected = [_classes(reference, x) for x in check]  # FP32's, once
    extra = {}
    if max_label_change is None:
        quantized = nncf.quantize(ov_model, calibration, subset_size=samples,
                                  preset=nncf.QuantizationPreset.PERFORMANCE,
                                  fast_bias_correction=True, advanced_parameters=advanced)
    else:
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, calibration, nncf.Dataset(check),
            lambda compiled, data: _agreement(compiled, data, expected),
            max_drop=max_label_change, drop_type=nncf.DropType.ABSOLUTE, subset_size=samples,
            preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=True,
            advanced_quantization_parameters=advanced)
        extra = {"max_label_change": max_label_change}
    changed = 1 - _agreement(_compile(ov, quantized), check, expected)[0]
    if changed > refuse_above:
        raise QuantizationRefused(
            f"{checkpoint}: INT8 changes the class of {100 * changed:.2f}% of the stride-8 "
            f"scores of {check_samples} check crops (refuse_above {100 * refuse_above:g}%); "
            f"nothing written. Try --max-label-change (keeps the harmful operations in "
            f"floating point) or raise --refuse-above to keep it anyway")
    extra.update(check_samples=int(check_samples), label_change_measured=round(changed, 6),
                 operations_in_fp32=_fp32_operations(quantized))
    xml = Path(out) if out else artefact_dir(checkpoint) / "int8.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(xml.stem + ".tmp.xml")
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)
    write_sidecar(xml, checkpoint, precision="int8", toolchain=f"nncf {nncf.__version__}, "
                  f"openvino {ov.__version__}", samples=int(samples), seed=int(seed),
                  dataset=d.dataset, split=d.train_split, crop_size=list(d.crop_size),
                  weights="int8 symmetric per output channel",
                  activations="int8 per tensor, min/max ranges (PERFORMANCE preset)",
                  seconds=round(time.perf_counter() - start, 1), **extra)
    return xml


class TrainingCrops:
    """Crops of ``cfg``'s training set drawn as training draws them (the config's
    ``TrainTransform``: scale, crop, flip), each an ``(1, 3, h, w)`` float32 array preprocessed
    with ``preprocessing``; reproducible from ``seed``. Successive :meth:`draw` calls pick their
    images from one seeded generator; ``stream`` keeps their augmentations apart."""

    def __init__(self, cfg, preprocessing, seed: int = 0):
        from ..data import build_dataset
        from ..data.transforms import TrainTransform
        d = cfg.data
        self.dataset = build_dataset(d.dataset, d.root, d.train_split, seed=seed, **d.options)
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {d.dataset!r} split {d.train_split!r} is empty")
        self.transform = TrainTransform(
            crop_size=tuple(d.crop_size), scale_range=tuple(d.scale_range), scales=d.scales,
            flip=d.flip, preprocessing=preprocessing)
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


def _compile(ov, model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


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
