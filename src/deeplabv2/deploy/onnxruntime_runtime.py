"""DeepLab v2 in ONNX Runtime: a peer that ``deeplabv2 bench`` measures against our paths (no
command runs it: ``--runtime`` offers PyTorch and OpenVINO).

:class:`OnnxRuntimeModel` runs the ONNX export (:func:`deeplabv2.deploy.export.export_onnx`,
logits upsampled to the input size in the graph) in ONNX Runtime's default CPU session, as its
users run it, behind the interface of the other networks here: ``model(x)`` -> float32 logits.
Needs the optional ``onnxruntime`` package.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..model.deeplab import NetworkWrapper
from .export import export_onnx

#: the example input traced for an export that takes any size (the graph does not depend on it)
EXAMPLE_SIZE = (321, 321)


class OnnxRuntimeModel(NetworkWrapper):
    """``source``'s ONNX export in an ONNX Runtime CPU session (all graph optimisations):
    fixed at ``size`` (``(height, width)``, batch 1: as a runtime that plans for one size runs
    fastest) or, with ``size=None``, taking any size; ``threads`` intra-op threads (one
    inter-op thread) when given."""

    def __init__(self, source: nn.Module, *, size=None, threads: int | None = None):
        super().__init__(source)
        import onnxruntime as ort  # an optional package: only the bench's peer rows need it
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(source, Path(tmp) / "model.onnx", *(size or EXAMPLE_SIZE),
                               dynamic=size is None)
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        if not upsample:
            raise ValueError("the ONNX export gives the logits at the input size only")
        return torch.from_numpy(self.session.run(["logits"], {"image": x.numpy()})[0])
