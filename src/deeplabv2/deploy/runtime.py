"""How a network runs: device, precision, runtime. :func:`prepare_network` is the one place
that chooses, for every command that runs a checkpoint (``evaluate``, ``crf-search``,
``predict``, ``serve``) and for each mode ``deeplabv2 bench`` measures:

* ``runtime="torch"`` (default): the BN-folded, channels-last, fused copy of
  :func:`deeplabv2.deploy.fast.optimize_for_inference` in fp32, bf16 or fp16, its dilated
  convolutions by the Winograd form chosen (``winograd``), optionally under ``torch.compile``;
  or, ``eager``, the network as loaded, reduced precision then run by autocast;
* ``runtime="openvino"``: fp32 or bf16 from the IR cached beside the checkpoint, int8 from
  ``deeplabv2 quantize``'s file (:mod:`deeplabv2.deploy.openvino_runtime`); ``--precision
  int8`` always runs there;
* ``runtime="onnxruntime"``: the ONNX export in ONNX Runtime, the peer the bench measures.

``precision="auto"`` is resolved here (:func:`deeplabv2.precision.resolve_inference_precision`:
on a CPU with native bf16, by the inference probe, once per process) and the reason comes back
with the network as ``Prepared.note``, which the commands print. :func:`add_runtime_args`
gives a command these choices as flags and :func:`runtime_options` reads them back; what runs
on the prepared network is :func:`deeplabv2.inference.front.segment`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..precision import resolve_inference_precision
from .fast import PRECISIONS, optimize_for_inference
from .onnxruntime_runtime import OnnxRuntimeModel
from .openvino_runtime import OpenVINOModel, load_openvino, require_openvino

RUNTIMES = ("torch", "openvino", "onnxruntime")
#: ``winograd`` values: ``auto`` lets :func:`deeplabv2.deploy.fast.winograd_backend` choose by
#: CPU; ``off`` keeps oneDNN's direct convolutions
WINOGRAD_CHOICES = ("auto", "gemm", "nnpack", "off")


class Prepared(NamedTuple):
    """A network ready to run: ``net`` (called ``net(x)`` -> float32 logits, with the source's
    facts), the ``amp`` autocast to run it under (``"none"`` but for an eager network in
    reduced precision), the ``precision`` it runs in (``auto`` resolved) and ``note``, why."""

    net: nn.Module
    amp: str
    precision: str
    note: str


def prepare_network(model: nn.Module, *, device="cpu", precision: str = "fp32",
                    runtime: str = "torch", eager: bool = False, compile: bool = False,
                    winograd: str = "auto", fuse: bool | None = None, checkpoint=None, ir=None,
                    size=None, threads: int | None = None) -> Prepared:
    """``model`` (a loaded network, eval mode; it is not changed) prepared to run on ``device``.

    ``precision``: ``fp32``, ``bf16``, ``fp16`` (CUDA), ``int8`` (OpenVINO; ``int8-f32``: its
    non-quantized operations in f32 whatever the CPU) or ``auto`` (bf16 where measured to pay).
    ``runtime``: one of :data:`RUNTIMES`. ``eager``, ``compile``, ``winograd`` (one of
    :data:`WINOGRAD_CHOICES`) and ``fuse`` (None: the default) choose the PyTorch form.
    OpenVINO runs ``ir`` (an ``openvino.Model`` or IR file) or, without it, the IR beside
    ``checkpoint`` (converted on first use; int8: ``deeplabv2 quantize``'s). ``size``
    (``(height, width)``): the peers are made for that input size (ONNX Runtime's export fixed
    at it, OpenVINO compiled for it now; None: any size). ``threads``: the peers' threads.
    """
    device = torch.device(device)
    precision, note = resolve_inference_precision(precision, device)
    if precision.startswith("int8"):
        runtime = "openvino"
    if runtime == "openvino":
        if device.type != "cpu" or eager or compile or precision == "fp16":
            raise ValueError("--runtime openvino / --precision int8 run fp32, bf16 or int8 on "
                             "the CPU, without --eager/--compile")
        return Prepared(_openvino(model, precision, checkpoint, ir, size, threads), "none",
                        precision, note)
    if runtime == "onnxruntime":
        if device.type != "cpu" or eager or compile or precision != "fp32":
            raise ValueError("ONNX Runtime runs fp32 on the CPU, without eager/compile")
        return Prepared(OnnxRuntimeModel(model, size=size, threads=threads), "none", precision,
                        note)
    if runtime != "torch":
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    if eager:
        if compile:
            raise ValueError("--compile works on the optimized network; drop --eager")
        return Prepared(model, "none" if precision == "fp32" else precision, precision, note)
    if winograd not in WINOGRAD_CHOICES:
        raise ValueError(f"winograd must be one of {', '.join(WINOGRAD_CHOICES)}, "
                         f"got {winograd!r}")
    net = optimize_for_inference(model, precision=precision, compile=compile, fuse=fuse,
                                 winograd={"auto": None, "off": False}.get(winograd, winograd))
    return Prepared(net, "none", precision, note)


def _openvino(model: nn.Module, precision: str, checkpoint, ir, size, threads) -> OpenVINOModel:
    if ir is None:
        if checkpoint is None:
            raise ValueError("the OpenVINO runtime needs the checkpoint file (its IR is kept "
                             "beside it) or an IR")
        net = load_openvino(model, checkpoint, precision, threads=threads)
    else:
        if not hasattr(ir, "inputs"):  # a file, not an openvino.Model
            ir = require_openvino().Core().read_model(str(ir))
        net = OpenVINOModel(ir, model, precision=precision, threads=threads)
    if size is not None:
        net.compiled((1, 3, *size))
    return net


# -- the commands' flags ------------------------------------------------------------------------
def add_runtime_args(sp, precision: str = "fp32") -> None:
    """``--precision``, ``--runtime``, ``--eager``, ``--compile`` and ``--winograd`` (with
    ``--no-winograd``) on the sub-command parser ``sp``; ``precision`` is the default."""
    sp.add_argument("--precision", choices=(*PRECISIONS, "int8", "auto"), default=precision,
                    help=f"fp32, bf16 (a CPU with native bf16: AMX or AVX512-BF16, or a "
                         f"GPU), fp16 (GPU), int8 (the OpenVINO model of `deeplabv2 "
                         f"quantize`) or auto (bf16 on a bf16 GPU, and on a CPU with native "
                         f"bf16 where a short probe measures it faster now; else fp32; the "
                         f"choice and why are printed); default {precision}")
    # ONNX Runtime is a peer the bench measures, not a runtime offered to users
    sp.add_argument("--runtime", choices=("torch", "openvino"), default="torch",
                    help="torch (default) or openvino (CPU; the converted network is cached "
                         "beside the checkpoint; int8 always runs there)")
    sp.add_argument("--eager", action="store_true",
                    help="run the network as loaded (BN unfolded, NCHW; bf16/fp16 by autocast) "
                         "instead of the BN-folded channels-last copy")
    sp.add_argument("--compile", action="store_true",
                    help="torch.compile the folded network (the first image compiles for "
                         "tens of seconds)")
    sp.add_argument("--winograd", choices=WINOGRAD_CHOICES, default="auto",
                    help="the dilated 3x3 convolutions in fp32 on the CPU: auto (default: "
                         "NNPACK's Winograd on AVX2 CPUs, F(6x6, 3x3) through GEMM on AVX-512 "
                         "ones), gemm, nnpack, or off (oneDNN's direct convolutions: slower, "
                         "but ResNet-101 then needs ~0.6 GB less memory than with gemm); "
                         "benchmarks/winograd.py measures which is fastest on this CPU")
    sp.add_argument("--no-winograd", dest="winograd", action="store_const", const="off",
                    help="the same as --winograd off")


def runtime_options(args) -> dict:
    """The flags of :func:`add_runtime_args` as :func:`prepare_network`'s keywords."""
    return {"precision": args.precision, "runtime": args.runtime, "eager": args.eager,
            "compile": args.compile, "winograd": args.winograd}
