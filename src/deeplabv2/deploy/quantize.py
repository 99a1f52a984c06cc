"""Static INT8 post-training quantization: ``deeplabv2 quantize``.

The FP32 IR of a checkpoint (:mod:`deeplabv2.deploy.openvino_runtime`) is quantized by NNCF
(``nncf.quantize``, OpenVINO backend): weights per output channel, symmetric; activations per
tensor, their ranges the min/max over ``samples`` crops of the training set drawn as training
draws them (the config's ``TrainTransform``: scale, crop, flip, a fixed seed); fast bias
correction. The result, ``<checkpoint>.openvino/int8.xml``, is what ``evaluate``/``predict
--precision int8`` run; its ``.json`` records the calibration and the checkpoint's SHA-256.

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
                        out=None, progress: bool = True) -> Path:
    """Quantize ``checkpoint`` to INT8 with ``samples`` calibration crops of ``cfg``'s training
    set; writes and returns ``<checkpoint>.openvino/int8.xml`` (or ``out``)."""
    ov = require_openvino()
    try:
        import nncf
    except ImportError:
        raise MissingRuntime("quantization needs NNCF: pip install 'deeplabv2[openvino]' "
                           "(or pip install nncf)") from None
    from ..data import build_dataset
    from ..data.transforms import TrainTransform
    from ..weights import load_model
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    model = load_model(checkpoint).eval()
    d = cfg.data
    ds = build_dataset(d.dataset, d.root, d.train_split, seed=seed, **d.options)
    if len(ds) == 0:
        raise ValueError(f"dataset {d.dataset!r} split {d.train_split!r} is empty")
    transform = TrainTransform(crop_size=tuple(d.crop_size), scale_range=tuple(d.scale_range),
                               scales=d.scales, flip=d.flip, preprocessing=model.preprocessing)
    rng = np.random.default_rng(seed)
    order = rng.permutation(max(samples, len(ds)))[:samples] % len(ds)

    def crops():
        for k, index in enumerate(order):
            image, label = ds.load(int(index))
            sample = transform(image, label, np.random.default_rng([seed, k]))
            yield sample["image"][None].float().numpy()

    start = time.perf_counter()
    ov_model = convert(model)
    # activation ranges from the min/max over the crops: NNCF's default (mean of per-crop
    # quantiles) clipped the demo model's logits by up to 80% of their range, min/max by 20%
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    quantized = nncf.quantize(ov_model, nncf.Dataset(list(crops())), subset_size=samples,
                              preset=nncf.QuantizationPreset.PERFORMANCE,
                              fast_bias_correction=True, advanced_parameters=advanced)
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
                  seconds=round(time.perf_counter() - start, 1))
    return xml
