"""Which precision pays on the machine at hand: ``train.amp: auto`` and ``predict --precision
auto``.

bf16 is not faster wherever the CPU "supports" it. Measured (2 threads, ResNet-101,
``benchmarks/speed_results.md``):

* Intel Xeon with AMX (amx_bf16/amx_tile): a warmed bf16-autocast + channels-last training
  step (batch 2, 321x321) is 2.4x the FP32 step, bf16 inference 4-5x FP32;
* Intel Xeon with AVX512-BF16 and VNNI but no AMX: the bf16 step is 0.94x the FP32 step and
  bf16 inference 0.77x: the ``avx512_bf16`` flag alone does not make bf16 pay; the AMX Xeon
  with AMX turned off in oneDNN (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``): step 0.63-0.82x,
  inference 0.46-0.54x, and the probe at 0.60-0.61x, so ``auto`` stays in FP32 there too;
* AVX2 CPUs (no native bf16): bf16 is emulated, 0.05x (training) and 0.2x (inference);
* CUDA GPUs with bf16 (compute capability 8.0+): bf16 autocast is the usual speed-up.

So the rule is: bf16 only on an AMX CPU or a bf16 GPU, and on the CPU only when a short probe
(:func:`bf16_train_speedup`, about a second) confirms that a bf16 convolution step is at least
:data:`MIN_SPEEDUP` times the FP32 one on this machine, now; FP32 everywhere else. No user gets
a slower step by default.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from pathlib import Path

import torch

#: a probe must show at least this speed-up for ``auto`` to pick bf16 (AMX measures ~2-3x)
MIN_SPEEDUP = 1.3


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles with bf16 (Sapphire Rapids and later Xeons)."""
    flags = cpu_flags()
    if flags:
        return {"amx_bf16", "amx_tile"} <= flags
    try:  # no /proc/cpuinfo: ask PyTorch's own CPU detection
        return bool(torch._C._cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def cuda_has_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def bf16_train_speedup(channels: int = 256, size: int = 48, batch: int = 2,
                       repeats: int = 3) -> float:
    """FP32 NCHW time / bf16-autocast channels-last time of a small training step on the CPU:
    two 3x3 convolutions and a 1x1 of ``channels`` channels on ``batch x size x size``,
    forward and backward, the best of ``repeats`` after one warm-up, the two alternating so
    that a change of load hits both. About a second on a 2-core AMX Xeon."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(channels, channels, 3, padding=2, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 1))
    x = torch.randn(batch, channels, size, size, generator=g)
    nets = {"fp32": (net, x),
            "bf16": (copy.deepcopy(net).to(memory_format=torch.channels_last),
                     x.contiguous(memory_format=torch.channels_last))}

    def step(kind):
        model, inp = nets[kind]
        # a training step whatever the caller's mode (the probe may first be asked from
        # inside torch.no_grad(), e.g. while inference modes are being prepared); the
        # backward outside autocast, as training runs it
        with torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "bf16"):
                out = model(inp)
            out.float().square().mean().backward()

    best = {"fp32": float("inf"), "bf16": float("inf")}
    for i in range(repeats + 1):
        for kind in best:
            start = time.perf_counter()
            step(kind)
            if i:  # the first round warms up
                best[kind] = min(best[kind], time.perf_counter() - start)
    return best["fp32"] / best["bf16"]


@functools.lru_cache(maxsize=None)
def _cpu_bf16_pays(probe) -> tuple[bool, str]:
    if not cpu_has_amx():
        return False, "no AMX: bf16 is measured slower than FP32 on such CPUs"
    speedup = probe()
    if speedup >= MIN_SPEEDUP:
        return True, f"AMX CPU, bf16 probe {speedup:.1f}x FP32"
    return False, (f"the CPU lists AMX, but the bf16 probe measured only {speedup:.2f}x FP32 "
                   "now (AMX off in the OS or by ONEDNN_MAX_CPU_ISA, or a busy machine)")


#: environment variable that pins what ``auto`` picks: ``fp32`` or ``bf16`` (the test suite
#: pins ``fp32`` so that its runs do not depend on the machine or its load)
PIN_ENV = "DEEPLABV2_AUTO_PRECISION"


def bf16_pays(device: torch.device, probe=bf16_train_speedup) -> tuple[bool, str]:
    """``(bf16 is faster here, why)`` for ``device``: a CUDA GPU with bf16, or an AMX CPU whose
    ``probe()`` (a speed ratio, once per process) reaches :data:`MIN_SPEEDUP`; or what the
    environment variable :data:`PIN_ENV` says."""
    pinned = os.environ.get(PIN_ENV, "").strip().lower()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ValueError(f"{PIN_ENV}={pinned!r}; valid values: fp32, bf16")
        return pinned == "bf16", f"pinned by {PIN_ENV}={pinned}"
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_has_bf16(device):
            return True, "CUDA GPU with bf16"
        return False, "CUDA GPU without bf16"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 speed not measured, FP32"
    return _cpu_bf16_pays(probe)


def resolve_train_amp(amp: str, channels_last: bool, device,
                      probe=bf16_train_speedup) -> tuple[str, bool, str]:
    """``train.amp`` and ``train.channels_last`` as the run will use them, and why.

    ``amp="auto"`` becomes ``"bf16"`` with channels-last where :func:`bf16_pays`, else
    ``"none"`` with ``channels_last`` as given; any other value is returned unchanged."""
    if amp != "auto":
        return amp, channels_last, f"train.amp={amp} as configured"
    pays, why = bf16_pays(device, probe)
    if pays:
        return "bf16", True, f"train.amp=auto: bf16 autocast + channels-last ({why})"
    return "none", channels_last, f"train.amp=auto: FP32 ({why})"


def resolve_inference_precision(precision: str, device, probe=bf16_train_speedup) -> tuple[str, str]:
    """``--precision auto`` of ``predict``: ``"bf16"`` where :func:`bf16_pays` (its accuracy
    cost on the demo's trained model: 0.16% of the labels, -0.006 mIoU points,
    ``benchmarks/accuracy_results.md``), else ``"fp32"``; other values unchanged."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    pays, why = bf16_pays(device, probe)
    return ("bf16" if pays else "fp32"), f"--precision auto: {'bf16' if pays else 'fp32'} ({why})"


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"none", "bf16", "fp16"} (fp16 on CUDA only)."""
    if amp in ("none", None):
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device; use bf16 on the CPU")
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type=device.type,
                          dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
