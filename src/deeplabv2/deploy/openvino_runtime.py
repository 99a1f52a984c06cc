"""DeepLab v2 on OpenVINO: FP32 and bf16 (``--runtime openvino``) and the INT8 model.

The IR holds the BN-folded network up to its stride-8 scores ``(N, C, H // 8 + 1, W // 8 + 1)``
with dynamic batch, height and width; :class:`OpenVINOModel` reshapes and compiles it at each
input size it meets (OpenVINO is fastest on static shapes; the compiled blobs are cached on
disk), and upsamples the scores in PyTorch with the model's own alignment, so that MSC,
sliding windows, the CRF and every other caller see the same interface as
:class:`deeplabv2.deploy.fast.InferenceModel`: ``model(x, upsample=True)`` -> float32 logits.

Files beside the checkpoint ``model.pth``: ``model.pth.openvino/fp32.xml`` (+ ``.bin``), the
converted network, and ``int8.xml`` from ``deeplabv2 quantize``, each with a ``.json`` that
records the checkpoint's SHA-256 (a stale file is rebuilt, or for INT8 refused), and
``cache/``, OpenVINO's compiled-model cache.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..model.deeplab import NetworkWrapper
from ..precision import bf16_pays
from ..utils.digest import file_sha256
from ..utils.fileio import atomic_write_text, write_failure
from .fast import fold_batchnorm
from ..weights import weights_file

#: OpenVINO's ``INFERENCE_PRECISION_HINT`` per precision; for an INT8 model it sets what its
#: non-quantized operations (the sums left in floating point, the last layers) run in.
#: ``"int8"`` is resolved by :func:`int8_precision`.
HINTS = {"fp32": "f32", "bf16": "bf16", "int8-f32": "f32", "int8-bf16": "bf16"}


def int8_precision(device="cpu") -> str:
    """How ``--precision int8`` runs on ``device``: ``"int8-bf16"``, the operations INT8 leaves
    in floating point in bf16, where bf16 pays (:func:`deeplabv2.precision.bf16_pays`: AMX
    CPUs, by a probe), else ``"int8-f32"``. On ResNet-101 at 512x1024 on a 2-core AMX Xeon
    the bf16 form was 1.17x the f32 one; on the demo's trained model they change 0.666% and
    0.668% of the labels (``benchmarks/accuracy_results.md``)."""
    return "int8-bf16" if bf16_pays(torch.device(device))[0] else "int8-f32"


class MissingRuntime(ValueError):
    """An optional runtime (OpenVINO, NNCF) is not installed; the message says what to run."""


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise MissingRuntime("the OpenVINO runtime is not installed: pip install "
                           "'deeplabv2[openvino]' (or pip install openvino)") from None
    return openvino


def file_digest(path) -> str:
    """SHA-256 of a checkpoint file (of its ``model.safetensors`` for a model folder)."""
    return file_sha256(weights_file(path))


def artefact_dir(checkpoint) -> Path:
    """``<checkpoint>.openvino/``: where the IR files and the compiled-model cache live."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".openvino")


class _Scores(nn.Module):
    """``image -> stride-8 scores``: one tensor in, one out, for the converter."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.logits(image)


def convert(model: nn.Module, example_size=(321, 321)):
    """The BN-folded FP32 ``model`` as an ``openvino.Model`` (input ``(?, 3, ?, ?)``
    preprocessed float32 image, output the stride-8 scores)."""
    ov = require_openvino()
    net = fold_batchnorm(model.eval()).eval().float().to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        return ov.convert_model(_Scores(net).eval(),
                                example_input=torch.zeros(1, 3, *example_size),
                                input=[ov.PartialShape([-1, 3, -1, -1])])


def write_sidecar(xml: Path, checkpoint, **info) -> None:
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint), **info}
    atomic_write_text(xml.with_suffix(".json"), json.dumps(info, indent=2) + "\n")


def save_ir(ov_model, xml) -> Path:
    """Write ``ov_model`` as the IR ``xml`` and its ``.bin``: under temporary names beside them,
    renamed into place (the ``.bin`` first) once both are complete. A failed write removes both
    temporary files and, where the file system refused it (OpenVINO itself says only
    ``basic_ios::clear: iostream error``), is the one-line :class:`WriteError` naming ``xml``
    and the free space."""
    ov = require_openvino()
    xml = Path(xml)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    tmp_bin = tmp.with_suffix(".bin")
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        tmp_bin.replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    except Exception as e:
        # the file that hit the limit, if either did (OpenVINO may have removed both: then a
        # new one, which a full disk refuses as well)
        partial = max((p for p in (tmp, tmp_bin) if p.exists()), key=lambda p: p.stat().st_size,
                      default=tmp_bin)
        for p in (tmp, tmp_bin):
            if p != partial:
                p.unlink(missing_ok=True)
        err = write_failure(xml, e, partial)  # probes the partial file, then removes it
        partial.unlink(missing_ok=True)
        if err is e:
            raise
        raise err from None
    return xml


def read_sidecar(xml: Path) -> dict:
    try:
        return json.loads(xml.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def fp32_ir(model: nn.Module, checkpoint) -> Path:
    """The FP32 IR of ``checkpoint`` (whose loaded network is ``model``), converted now unless
    a current one lies beside the checkpoint."""
    ov = require_openvino()
    xml = artefact_dir(checkpoint) / "fp32.xml"
    if xml.is_file() and read_sidecar(xml).get("checkpoint_sha256") == file_digest(checkpoint):
        return xml
    save_ir(convert(model), xml)
    write_sidecar(xml, checkpoint, precision="fp32")
    return xml


class OpenVINOModel(NetworkWrapper):
    """An OpenVINO model behind the :class:`deeplabv2.deploy.fast.InferenceModel` interface.

    ``forward(x, upsample=True)``: preprocessed float32 ``(N, 3, H, W)`` -> float32 logits
    ``(N, C, H, W)`` (or the stride-8 scores with ``upsample=False``). One compiled model per
    input shape (``PERFORMANCE_HINT: LATENCY``, ``threads`` inference threads, ``precision``
    as OpenVINO's inference precision hint).
    """

    def __init__(self, ov_model, source: nn.Module, *, precision: str = "fp32",
                 threads: int | None = None, cache_dir=None):
        super().__init__(source)
        ov = require_openvino()
        if precision == "int8":
            precision = int8_precision()
        if precision not in HINTS:
            raise ValueError(f"precision must be one of int8, {', '.join(HINTS)}, "
                             f"got {precision!r}")
        self.core = ov.Core()
        if cache_dir:
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        self.ov_model = ov_model
        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        self._compiled: dict[tuple, object] = {}

    def compiled(self, shape: tuple):
        """The model compiled for inputs of ``shape`` (compiled on first use)."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._compiled:
            model = self.ov_model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads,
                      "INFERENCE_PRECISION_HINT": HINTS[self.precision]}
            self._compiled[shape] = self.core.compile_model(model, "CPU", config)
        return self._compiled[shape]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled(tuple(x.shape))
        image = x.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(compiled(image)[0].copy())

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        scores = self.logits(x).to(x.device)
        if not upsample:
            return scores
        return self.alignment.upsample(scores, x.shape[-2:], self.output_stride)


def load_openvino(model: nn.Module, checkpoint, precision: str = "fp32",
                  threads: int | None = None) -> OpenVINOModel:
    """``checkpoint`` (loaded as ``model``) on OpenVINO in ``precision``: fp32/bf16 from the
    FP32 IR beside it (converted on first use), int8 from ``deeplabv2 quantize``'s file."""
    ov = require_openvino()
    folder = artefact_dir(checkpoint)
    if precision == "int8":
        xml = folder / "int8.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{xml}: no INT8 model for {checkpoint}; run "
                                    f"`deeplabv2 quantize {checkpoint} -c CONFIG` first")
        info = read_sidecar(xml)
        if info.get("checkpoint_sha256") != file_digest(checkpoint):
            raise ValueError(f"{xml} was quantized from another version of {checkpoint}; "
                             f"run `deeplabv2 quantize` again")
        if "label_change_measured" not in info:
            warnings.warn(f"{xml} was made before `deeplabv2 quantize` measured what INT8 "
                          f"changes; its accuracy is unchecked (INT8 can break a model: "
                          f"benchmarks/accuracy_results.md): run `deeplabv2 quantize` again",
                          stacklevel=2)
    else:
        xml = fp32_ir(model, checkpoint)
    return OpenVINOModel(ov.Core().read_model(str(xml)), model, precision=precision,
                         threads=threads, cache_dir=folder / "cache")
