"""The inference modes ``deeplabv2 bench`` times and ``benchmarks/accuracy.py`` checks, each a
choice of :func:`deeplabv2.deploy.runtime.prepare_network` (:data:`MODE_OPTIONS`):

* ``eager``: the model as given (frozen BN as separate ops, NCHW, fp32);
* ``fold``: frozen BN folded into the convolutions, channels-last, fp32 (nothing else);
* ``fast``: :func:`deeplabv2.deploy.fast.optimize_for_inference`, fp32: ``fold`` plus, on the CPU,
  ReLU and residual sums fused into prepacked oneDNN convolutions and Winograd atrous
  convolutions (NNPACK on AVX2 CPUs, F(6x6, 3x3) through torch's GEMM on AVX-512 ones: what
  ``evaluate`` and ``predict --precision fp32`` run);
* ``fast-direct``: ``fast`` with oneDNN's direct convolutions in place of Winograd;
* ``winograd-all``: ``fast`` with every dilated 3x3 convolution of the backbone through Winograd
  (the ASPP head runs as ``TapsASPP``), whatever its size: the worst case of that path's
  rounding, for accuracy checks;
* ``bf16``: ``fast`` in bfloat16 (``--precision bf16``);
* ``compile``: ``fold`` under ``torch.compile`` with freezing, whose own fusion replaces
  ``fast``'s (the compile time is the row's ``first_call_s``);
* ``onnxruntime``: the ONNX export, fixed at the size it runs, in ONNX Runtime's default
  CPU session with ``threads`` intra-op threads (a peer);
* ``openvino``, ``openvino-bf16``: the network in OpenVINO, compiled at the size it runs with
  the latency hint, ``threads`` inference threads, f32/bf16 inference precision (a peer, and
  ``--runtime openvino``);
* ``int8``: the network quantized to INT8 by NNCF (:mod:`deeplabv2.deploy.quantize`) in
  OpenVINO (``--precision int8``); for speed calibrated on random inputs (speed does not
  depend on the values), for accuracy the given quantized file; its non-quantized operations
  in bf16 where bf16 pays, as ``--precision int8`` runs them
  (:func:`deeplabv2.deploy.openvino_runtime.int8_precision`);
* ``int8-f32``: ``int8`` with its non-quantized operations in f32 whatever the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .atrous import use_atrous_winograd
from .fast import fold_batchnorm, winograd_backend
from .openvino_runtime import convert
from .quantize import fp32_sums, with_taps_head
from .runtime import prepare_network

#: mode -> :func:`prepare_network`'s options (on the CPU)
MODE_OPTIONS = {
    "eager": {"eager": True},
    "fold": {"fuse": False, "winograd": "off"},
    "fast": {},
    "fast-direct": {"winograd": "off"},
    "winograd-all": {"winograd": "off"},  # then Winograd everywhere: Modes.prepare
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "onnxruntime": {"runtime": "onnxruntime"},
    "openvino": {"runtime": "openvino"},
    "openvino-bf16": {"runtime": "openvino", "precision": "bf16"},
    "int8": {"runtime": "openvino", "precision": "int8"},
    "int8-f32": {"runtime": "openvino", "precision": "int8-f32"},
}
MODES = tuple(MODE_OPTIONS)
#: the dtype each mode computes in (for the per-dtype upper bound)
MODE_DTYPES = {"bf16": "bf16", "openvino-bf16": "bf16", "int8": "int8", "int8-f32": "int8"}
DEFAULT_MODES = ("eager", "fast", "bf16")
#: random inputs the INT8 modes are calibrated on when timed (speed does not depend on values)
CALIBRATION_INPUTS = 4


class Modes:
    """``model`` (eval mode; it is not changed) prepared in any of :data:`MODES`.

    ``threads``: the peers' threads; ``int8_xml``: the INT8 model of modes ``int8``/``int8-f32``
    (else quantized by NNCF on :data:`CALIBRATION_INPUTS` random inputs of the first size
    asked for). The network is converted to OpenVINO once, by the first OpenVINO mode prepared
    (its time and memory count there), and quantized once: both are reused for every size and
    precision (the converted model has dynamic shapes; each OpenVINO network compiles its own
    size).
    """

    def __init__(self, model: nn.Module, *, threads: int | None = None, int8_xml=None):
        self.model, self.threads, self.int8_xml = model, threads, int8_xml
        self._openvino: dict[str, object] = {}

    def prepare(self, mode: str, size=None) -> nn.Module:
        """The network of ``mode``; the peers made for ``(height, width)`` inputs (``size``;
        None: any size)."""
        if mode not in MODE_OPTIONS:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        options = MODE_OPTIONS[mode]
        ir = None
        if options.get("runtime") == "openvino":
            ir = self._openvino_ir(options.get("precision", "fp32"), size)
        net = prepare_network(self.model, device="cpu", ir=ir, size=size,
                              threads=self.threads, **options).net
        if mode == "winograd-all" and not use_atrous_winograd(
                net.model, min_channels=1, min_pixels=1, max_overhead=float("inf"),
                backend=winograd_backend() or "gemm"):
            raise ValueError("winograd-all: no dilated 3x3 convolution in the model")
        return net

    def _openvino_ir(self, precision: str, size):
        """The OpenVINO model (or IR file) that ``precision`` runs."""
        if "fp32" not in self._openvino:
            self._openvino["fp32"] = convert(self.model)
        if not precision.startswith("int8"):
            return self._openvino["fp32"]
        if self.int8_xml:
            return self.int8_xml
        if "int8" not in self._openvino:
            import nncf  # an optional package: only the INT8 modes need it
            g = torch.Generator().manual_seed(0)
            data = [torch.randn(1, 3, *size, generator=g).numpy()
                    for _ in range(CALIBRATION_INPUTS)]
            # the graph quantize writes (its ASPP as taps) and the operations it leaves in
            # floating point, so that the graph timed is its graph (its other steps change
            # values, not operations)
            net = with_taps_head(fold_batchnorm(self.model).eval())
            source = convert(net)
            self._openvino["int8"] = nncf.quantize(
                source, nncf.Dataset(data), subset_size=CALIBRATION_INPUTS,
                preset=nncf.QuantizationPreset.PERFORMANCE,
                ignored_scope=nncf.IgnoredScope(names=fp32_sums(source, net)))
        return self._openvino["int8"]
