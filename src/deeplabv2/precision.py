"""Which precision pays on the machine at hand: ``train.amp: auto`` and ``predict --precision
auto`` (also ``evaluate``, ``crf-search`` and ``serve`` with ``--precision auto``).

Whether bf16 is faster than FP32 cannot be read from the CPU's flags: two CPUs with the same
native bf16 instructions go opposite ways. Measured (2 threads, ResNet-101,
``benchmarks/speed_results.md``, ``benchmarks/precision_auto_results.md``):

* Intel Xeon with AMX (amx_bf16/amx_tile): a warmed bf16-autocast + channels-last training
  step (batch 2, 321x321) is 2.4-3.8x the FP32 step, bf16 inference 3.7x our FP32;
* AMD EPYC Zen 4 (family 25 model 17: AVX512-BF16, no AMX): the bf16 step is 1.97x the FP32
  step, bf16 inference at 512x1024 1.70x our FP32 (1.85 s against 3.14 s, 91% of the bf16
  bound), 1.79-1.88x at 321x321, 0.12% of the demo model's labels changed; the training
  probe reads 1.9-2.1x, the inference probe 1.84-1.92x; with oneDNN's bf16 kernels turned off
  (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``) 0.37x and 0.36x;
* Intel Xeon with AVX512-BF16 and VNNI but no AMX: the bf16 step is 0.94x the FP32 step and
  bf16 inference 0.77x (the probes were not run there: no such machine was lent since); the
  AMX Xeon with AMX turned off in oneDNN (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``): step
  0.63-0.82x, inference 0.46-0.54x, the training probe (then on 2 threads) 0.60-0.61x;
* CPUs without native bf16 (no AMX, no avx512_bf16): bf16 is emulated; on an AVX2 AMD EPYC
  0.05x FP32 (training), 0.11x our FP32 inference (0.19x eager);
* CUDA GPUs with bf16 (compute capability 8.0+): bf16 autocast is the usual speed-up.

So the rule is: on a bf16 GPU, bf16; on a CPU with native bf16 (:func:`cpu_bf16_kind`: AMX or
AVX512-BF16), bf16 when a short probe run on this machine, now, measures bf16 at least
:data:`MIN_SPEEDUP` times FP32, FP32 otherwise; FP32 on every other device and CPU, without a
probe. Training asks :func:`bf16_train_speedup` (a bf16-autocast convolution step), inference
:func:`bf16_inference_speedup` (the network as inference prepares it, where FP32 has speed-ups
of its own: Winograd, fused post-ops). Each probe runs on one thread (steady on a busy
machine, where threads waiting on each other scattered a two-thread probe over 1.1-2.2x), once
per process, and only where ``auto`` is asked on such a CPU. A probe that reads under the bar
keeps FP32: ``auto`` may leave speed behind, but it picks bf16 only on a measured gain.
What was chosen, and why, is printed once by each command (``train.amp=auto: ...``,
``--precision auto: ...``). :data:`PIN_ENV` pins the choice (the test suite pins FP32).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from pathlib import Path

import torch

#: a probe must show at least this speed-up for ``auto`` to pick bf16 (AMX Xeons measure
#: 2.7-4.0x, an AMD EPYC Zen 4 1.75-1.99x, a Xeon with AMX turned off 0.60-0.61x)
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
    return cpu_bf16_kind() == "AMX"


def cpu_bf16_kind() -> str | None:
    """How this CPU computes bf16 natively: ``"AMX"`` (amx_bf16 and amx_tile: Sapphire Rapids
    and later Xeons), ``"AVX512-BF16"`` (avx512_bf16 without AMX: Cooper Lake Xeons, AMD Zen 4
    and later) or None (bf16 emulated in FP32 units: every AVX2 CPU, other architectures)."""
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo: PyTorch's own CPU detection, where this version has it
        checks = (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
        for name, kind in checks:
            check = getattr(torch._C._cpu, name, None)
            if check is not None and check():
                return kind
        return None
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def cuda_has_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def _threads(n: int):
    """PyTorch's intra-op threads set to ``n`` inside, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _best_ratio(run, repeats: int) -> float:
    """FP32's best time over bf16's: ``run("fp32")`` and ``run("bf16")`` alternate (a change of
    load hits both), one warm-up round, then the best of ``repeats`` rounds each."""
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for i in range(repeats + 1):
        for kind in best:
            start = time.perf_counter()
            run(kind)
            if i:  # the first round warms up
                best[kind] = min(best[kind], time.perf_counter() - start)
    return best["fp32"] / best["bf16"]


#: the probes time one thread: what differs between CPU kinds is a core's bf16 against FP32,
#: and one thread reads it steadily where threads wait on each other on a busy machine (a
#: shared 2-core AMD EPYC, same minutes: 1.98-2.08x on one thread, 1.15-2.18x on two;
#: ``benchmarks/precision_auto_results.md``)
PROBE_THREADS = 1


def bf16_train_speedup(channels: int = 256, size: int = 48, batch: int = 2,
                       repeats: int = 3) -> float:
    """FP32 NCHW time / bf16-autocast channels-last time of a small training step on the CPU:
    two 3x3 convolutions and a 1x1 of ``channels`` channels on ``batch x size x size``,
    forward and backward, the best of ``repeats`` after one warm-up, the two alternating so
    that a change of load hits both, on :data:`PROBE_THREADS` thread(s). About 2 s on a
    2-core AMD EPYC (Zen 4) shared with other work."""
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

    with _threads(PROBE_THREADS):
        return _best_ratio(step, repeats)


bf16_train_speedup.label = "training-step"


#: the inference probe's network: DeepLab v2 with one bottleneck per ResNet stage at
#: ResNet-101's widths (64-2048 channels, stride 8, the ASPP), 19 classes
PROBE_MODEL = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 64, "num_classes": 19}


def bf16_inference_speedup(size: int = 161, repeats: int = 4) -> float:
    """FP32 time / bf16 time of inference as ``predict``, ``evaluate`` and ``serve`` run it:
    :func:`deeplabv2.deploy.fast.optimize_for_inference` in each precision (BN folded,
    channels-last, fused, prepacked; FP32's dilated convolutions as Winograd where that pays,
    bf16's weights converted once) of a random :data:`PROBE_MODEL` on one ``size x size``
    image, no autograd, alternating, the best of ``repeats`` after one warm-up, on
    :data:`PROBE_THREADS` thread(s). Not the training probe: inference has its own FP32
    speed-ups (Winograd, post-ops) and runs bf16 weights instead of autocast. About 1.5 s on a
    2-core AMD EPYC (Zen 4) shared with other work, most of it preparing the two networks; the
    caller's random state and threads are left as they were."""
    from .deploy.fast import optimize_for_inference
    from .model.deeplab import build_model
    # building and preparing draw random numbers
    with torch.random.fork_rng(devices=[]), _threads(PROBE_THREADS):
        torch.manual_seed(0)
        model = build_model(dict(PROBE_MODEL)).eval()
        nets = {kind: optimize_for_inference(model, precision=kind) for kind in ("fp32", "bf16")}
        x = torch.randn(1, 3, size, size)

        def infer(kind):
            with torch.no_grad():
                nets[kind](x)

        return _best_ratio(infer, repeats)


bf16_inference_speedup.label = "inference"


@functools.lru_cache(maxsize=None)
def _cpu_bf16_pays(probe) -> tuple[bool, str]:
    kind = cpu_bf16_kind()
    if kind is None:
        return False, ("no native bf16 (no AMX, no AVX512-BF16): bf16 is emulated here, "
                       "measured 0.05-0.2x FP32")
    speedup = probe()
    label = getattr(probe, "label", None)
    what = f"bf16 {label} probe" if label else "bf16 probe"
    if speedup >= MIN_SPEEDUP:
        return True, f"{kind} CPU, {what} {speedup:.1f}x FP32"
    return False, (f"{kind} CPU, but the {what} measured only {speedup:.2f}x FP32 now, under "
                   f"{MIN_SPEEDUP}x (bf16 does not pay on this CPU, its native bf16 is turned "
                   "off by ONEDNN_MAX_CPU_ISA or the OS, or the machine is busy)")


#: environment variable that pins what ``auto`` picks: ``fp32`` or ``bf16`` (the test suite
#: pins ``fp32`` so that its runs do not depend on the machine or its load)
PIN_ENV = "DEEPLABV2_AUTO_PRECISION"


def bf16_pays(device: torch.device, probe=None) -> tuple[bool, str]:
    """``(bf16 is faster here, why)`` for ``device``: a CUDA GPU with bf16, or a CPU with
    native bf16 (:func:`cpu_bf16_kind`) whose ``probe()`` (a speed ratio, once per process and
    probe; default :func:`bf16_train_speedup`) reaches :data:`MIN_SPEEDUP`; or what the
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
    return _cpu_bf16_pays(probe or bf16_train_speedup)


def resolve_train_amp(amp: str, channels_last: bool, device,
                      probe=None) -> tuple[str, bool, str]:
    """``train.amp`` and ``train.channels_last`` as the run will use them, and why.

    ``amp="auto"`` becomes ``"bf16"`` with channels-last where :func:`bf16_pays`, else
    ``"none"`` with ``channels_last`` as given; any other value is returned unchanged."""
    if amp != "auto":
        return amp, channels_last, f"train.amp={amp} as configured"
    pays, why = bf16_pays(device, probe)
    if pays:
        return "bf16", True, f"train.amp=auto: bf16 autocast + channels-last ({why})"
    return "none", channels_last, f"train.amp=auto: FP32 ({why})"


def resolve_inference_precision(precision: str, device, probe=None) -> tuple[str, str]:
    """``--precision auto`` of ``predict``: ``"bf16"`` where :func:`bf16_pays` by ``probe``
    (default :func:`bf16_inference_speedup`; its accuracy cost on the demo's trained model:
    0.12-0.16% of the labels, -0.006 mIoU points, ``benchmarks/accuracy_results.md``), else
    ``"fp32"``; other values unchanged."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    pays, why = bf16_pays(device, probe or bf16_inference_speedup)
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
