"""Export a model for deployment: ONNX (dynamic height and width) and TorchScript.

Both exports take the BN-folded fp32 network (:func:`deeplabv2.deploy.fast.fold_batchnorm`), whose
input is the preprocessed ``(N, 3, H, W)`` float32 image and whose output is the logits
upsampled to the input size, ``(N, C, H, W)`` float32. Preprocessing (channel order, mean,
scale) is *not* part of the graph: apply ``model.preprocessing`` first, as for the PyTorch model.

An HRDA network (:class:`deeplabv2.model.hrda.HRDA`) is exported at the one ``height x width``
it is traced at: its inference loops over detail windows whose number and places depend on the
size, and the trace unrolls them. Its ONNX graph has fixed height and width (the batch stays
dynamic), so a runtime refuses another size; its TorchScript file checks the size and raises.
Any size can be the traced one (the padding to a multiple of 16 is traced with it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .fast import fold_batchnorm
from ..utils.digest import file_sha256
from ..utils.fileio import atomic_write, atomic_write_text


class _UpsampledLogits(nn.Module):
    """``image -> logits at the input size``: one tensor in, one out, no Python flags to trace."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def _deploy_copy(model: nn.Module) -> nn.Module:
    """Folded fp32 eval-mode copy in the default (NCHW) layout, gradients off. Folded as the
    eval-mode network runs, whatever mode ``model`` is in (``load_model`` returns it in train
    mode): a ``BatchNorm2d`` (``model.bn`` batch or train) by its running statistics."""
    was_training = model.training
    model.eval()
    try:
        net = fold_batchnorm(model).eval().float()
    finally:
        model.train(was_training)
    for p in net.parameters():
        p.requires_grad_(False)
    return _UpsampledLogits(net).eval()


class _FixedSize(nn.Module):
    """A traced network that runs at one input size only, and says so at any other."""

    def __init__(self, traced: nn.Module, height: int, width: int):
        super().__init__()
        self.traced = traced
        self.height, self.width = int(height), int(width)
        self.message = (f"this HRDA export runs at {height}x{width} only (its detail windows "
                        f"are unrolled at the traced size): export again with --height/--width "
                        f"of your images")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[2] != self.height or image.shape[3] != self.width:
            raise RuntimeError(self.message)
        return self.traced(image)


def fixed_size(model: nn.Module) -> bool:
    """Whether ``model`` exports at its traced size only (HRDA)."""
    return bool(getattr(model, "is_hrda", False))


def export_onnx(model: nn.Module, path, height: int, width: int, opset: int = 17,
                dynamic: bool = True) -> Path:
    """Write ``model`` as ONNX to ``path`` and return the path.

    Input ``image``: ``(batch, 3, height, width)`` float32; output ``logits``:
    ``(batch, C, height, width)`` float32, upsampled bilinearly to the input size. The batch,
    height and width axes are dynamic (``dynamic=False``: fixed at ``1 x height x width``, as a
    runtime that plans for one size runs fastest); ``height``/``width`` size the example
    input used for tracing. Uses the TorchScript-based exporter (``dynamo=False``), which needs only
    the ``onnx`` package. HRDA: height and width fixed at the given ones (see the module notes).
    """
    net = _deploy_copy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, int(height), int(width))
    axes = {0: "batch"} if fixed_size(model) else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns that it is deprecated; it is the simple, dependable path.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        atomic_write(path, lambda tmp: torch.onnx.export(
            net, (example,), tmp, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes} if dynamic else None,
            opset_version=opset, do_constant_folding=True, dynamo=False),
            fsync=False)  # no half-written .onnx under the final name
    write_sha256(path)
    return path


def export_torchscript(model: nn.Module, path, height: int = 321, width: int = 321) -> Path:
    """Trace the folded ``model`` with ``torch.jit.trace`` and save it to ``path``.

    The traced module maps a preprocessed ``(N, 3, H, W)`` float32 input to ``(N, C, H, W)``
    logits at any input size (the upsampling size is read from the input's shape in the
    graph); load it with ``torch.jit.load(path)``. HRDA: at ``height x width`` only, any other
    size raises (see the module notes).
    """
    net = _deploy_copy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, int(height), int(width))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        traced = torch.jit.trace(net, (example,), check_trace=False)
        if fixed_size(model):
            traced = torch.jit.script(_FixedSize(traced, height, width))
        # Into a file object: given a name, torch.jit.save's zip writer, when the write
        # fails, throws again in its destructor, which aborts the process.
        atomic_write(path, lambda tmp: _jit_save(traced, tmp), fsync=False)
    write_sha256(path)
    return path


def _jit_save(traced, path) -> None:
    with open(path, "wb") as f:
        torch.jit.save(traced, f)


def write_sha256(path) -> Path:
    """``{path}.sha256`` in ``sha256sum`` format, so that a copy of an exported file (read by
    other runtimes, not by this project) can be checked with ``sha256sum -c``."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    atomic_write_text(sidecar, f"{file_sha256(path)}  {path.name}\n")
    return sidecar
