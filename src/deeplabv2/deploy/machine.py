"""What decides the speed of a run, recorded beside ``deeplabv2 bench``'s numbers and the
benchmarks' reports: the CPU model and flags, any cap put on its instruction set, PyTorch's CPU
capability, the core count and the runtimes' versions."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from ..precision import cpu_flags


def cpu_model() -> str:
    """The CPU's model name (``lscpu``; else ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


#: environment variables that cap the instruction set the libraries use below what the CPU
#: has (oneDNN, in PyTorch and OpenVINO; PyTorch's own kernels; MKL): set, they make this CPU
#: run as an older kind would, e.g. ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` turns AMX off
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict[str, str]:
    """The :data:`ISA_CAPS` set in this process's environment (empty: the CPU runs as is)."""
    return {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k, "").strip()}


def machine() -> dict:
    """What decides the speed: CPU model, the vector/matrix flags, PyTorch's CPU capability,
    any cap put on the instruction set (:func:`isa_caps`), core count, the runtimes'
    versions."""
    keep = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    info = {"cpu": cpu_model(), "cpu_flags": " ".join(keep) or "unknown",
            "isa_caps": isa_caps(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch": torch.__version__}
    for name in ("onnxruntime", "openvino", "nncf"):  # optional extras: imported if present
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info

