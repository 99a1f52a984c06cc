"""Peak memory of one training step of each self-training method at its released crops and
batch, with the real ResNet-101 (V1c for DAFormer/HRDA/MIC), in FP32 and bf16 autocast, with
and without ``train.checkpoint_backbone``; and whether that fits an 8 GB or a 12 GB card.

Measured, on the CPU: every case runs in a fresh process (nothing freed by an earlier case
lingers in its allocator). The process builds the network, its optimizer and the method (EMA
teacher, frozen ImageNet copy) from the packaged config (``model.weights=null``: random weights
take the same memory), runs ``--steps`` full training steps on synthetic batches of the
config's sizes (the loop's micro-step: every pass of ``method.loss`` under the run's autocast
and its backward, the optimizer step, the teacher's update), and measures the last one: the
kernel's peak resident set (``VmHWM``) is reset (``/proc/self/clear_refs``, 5) just before it,
so ``growth`` = peak RSS during the step - RSS before it is what the step itself needed at its
worst moment (activations, gradients, the teacher's and the mixing's tensors, oneDNN's
scratch), whatever allocates it, with no hook on PyTorch's allocator. Why not ``ru_maxrss``:
it cannot be reset, so building the network would hide the step's own peak; why not
``torch.profiler``'s memory timeline: it records PyTorch's allocations only and slows the step
several times. The first step also allocates the optimizer's state, hence ``--steps 2`` (the
second is measured) by default.

What a GPU would hold: ``state`` (the tensors held before the measured step, counted exactly:
parameters, buffers, optimizer state, the method's teacher and ImageNet copy) + ``growth``.
The CPU figure is the closer to a lower bound: PyTorch's CUDA caching allocator keeps freed
blocks for reuse and rounds sizes (``memory_reserved`` above ``memory_allocated``), cuDNN
takes workspaces for its fastest convolutions, and the CUDA context takes 0.3-0.5 GB that no
PyTorch counter shows; glibc's heap on the CPU returns large blocks to the kernel at once. So
compare ``state + growth`` with a card's memory less about 1 GB.

    python benchmarks/uda_memory.py                       # every case, writes the results file
    python benchmarks/uda_memory.py --only hrda           # configs whose name contains "hrda"
    python benchmarks/uda_memory.py --case gta5_to_cityscapes_dacs none false   # one, as JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "uda_memory_results.md"
RAW = HERE / "uda_memory_results.json"
ESTIMATES = HERE / "uda_memory_estimates.json"
CONFIGS = ["gta5_to_cityscapes_dacs", "gta5_to_cityscapes_daformer_dlv2",
           "gta5_to_cityscapes_mic_daformer_dlv2", "gta5_to_cityscapes_hrda_dlv2",
           "gta5_to_cityscapes_mic_hrda_dlv2"]
VARIANTS = [("none", False), ("none", True), ("bf16", False), ("bf16", True)]
GiB = 1024 ** 3
CARDS = {"8 GB": 8 * GiB, "12 GB": 12 * GiB}
#: what a GPU holds beyond PyTorch's tensors: the CUDA context, cuDNN workspaces, the caching
#: allocator's rounding (an allowance, not a measurement)
GPU_OVERHEAD = 1 * GiB


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_case(name: str, amp: str, checkpoint: bool, steps: int, threads: int) -> dict:
    """One configuration in this process; returns its measurements (bytes, seconds)."""
    from deeplabv2.adapt.methods import build_method
    from deeplabv2.config import CONFIG_DIR, load_config
    from deeplabv2.memory import _optimizer_slots, held_bytes
    from deeplabv2.model.resnet import set_backbone_checkpointing
    from deeplabv2.precision import autocast_context
    from deeplabv2.train import _build_model, _network, build_optimizer, set_lr

    torch.set_num_threads(threads)
    cfg = load_config(CONFIG_DIR / f"{name}.yaml",
                      ["model.weights=null", f"train.amp={amp}",
                       f"train.checkpoint_backbone={str(checkpoint).lower()}"])
    d, a, t = cfg.data, cfg.adapt, cfg.train
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = _build_model(cfg, cfg.model.num_classes or 19)
    set_backbone_checkpointing(model, checkpoint)
    optimizer = build_optimizer(model, t)
    method = build_method(a, model)
    net, make_step = _network(cfg, model, SimpleNamespace(enabled=False), device)
    classes = model.num_classes
    crop, target_crop = tuple(d.crop_size), tuple(a.target_crop_size or d.crop_size)
    g = torch.Generator().manual_seed(1)

    def batch():
        return dict(images=torch.randn(d.batch_size, 3, *crop, generator=g) * 50,
                    labels=torch.randint(0, classes, (d.batch_size, *crop), generator=g),
                    target=torch.randn(d.batch_size, 3, *target_crop, generator=g) * 50)

    def step(it: int) -> float:
        started = time.perf_counter()
        set_lr(optimizer, t.lr)
        method.set_lr(lambda base, it=it: base)
        s = make_step(iteration=it, target_labels=None, **batch())
        for k in range(method.passes(it)):
            with autocast_context(device, t.amp):
                loss = method.loss(s, k)
            loss.backward()
        method.discriminator_backward(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.step_optimizers()
        method.after_step(model, it)
        del s, loss
        return time.perf_counter() - started

    net.train()
    for it in range(steps - 1):
        step(it)
    state = held_bytes(model, optimizer, method, device)
    if not optimizer.state:  # --steps 1: the state the optimizer makes at its first step
        state += _optimizer_slots(optimizer) * sum(
            p.numel() * p.element_size() for grp in optimizer.param_groups for p in grp["params"])
    before = _status("VmRSS")
    _reset_peak()
    seconds = step(steps - 1)
    peak = _status("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"config": name, "amp": amp, "checkpoint_backbone": checkpoint,
            "crop": list(crop), "target_crop": list(target_crop), "batch": d.batch_size,
            "hrda": ({"detail_crop": list(a.hrda_detail_crop),
                      "context_scale": a.hrda_context_scale} if a.method == "hrda" else None),
            "mic": bool(a.mic), "params": params, "state_bytes": state,
            "rss_before": before, "peak_rss": peak, "growth": peak - before,
            "seconds": seconds, "steps": steps, "threads": threads}


def estimate_case(name: str, amp: str, checkpoint: bool) -> dict:
    """What ``deeplabv2.memory.estimate_step`` (the check ``train`` runs before its first
    step) says of the case on a GPU: state (parameters, buffers, gradients, optimizer state,
    the method's modules) + activations (saved tensors at two small probe crops, fitted and
    evaluated at the case's crops, x BACKWARD_MARGIN) + one batch; seconds, not a step."""
    from deeplabv2.adapt.methods import build_method
    from deeplabv2.config import CONFIG_DIR, load_config
    from deeplabv2.memory import PIXEL_BYTES, estimate_step
    from deeplabv2.model.resnet import set_backbone_checkpointing
    from deeplabv2.train import _build_model, _network, build_optimizer

    cfg = load_config(CONFIG_DIR / f"{name}.yaml",
                      ["model.weights=null", f"train.amp={amp}",
                       f"train.checkpoint_backbone={str(checkpoint).lower()}"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = _build_model(cfg, cfg.model.num_classes or 19)
    set_backbone_checkpointing(model, checkpoint)
    optimizer = build_optimizer(model, cfg.train)
    method = build_method(cfg.adapt, model)
    net, make_step = _network(cfg, model, SimpleNamespace(enabled=False), device)
    net.train()
    est = estimate_step(cfg, model, optimizer, method, make_step, net, device)
    d, a = cfg.data, cfg.adapt
    crop, target = tuple(d.crop_size), tuple(a.target_crop_size or d.crop_size)
    one_batch = d.batch_size * (crop[0] * crop[1] + target[0] * target[1]) * PIXEL_BYTES
    return {"config": name, "amp": amp, "checkpoint_backbone": checkpoint,
            "state": est.state, "activations": est.activations, "batch_bytes": one_batch}


def cpu_line() -> str:
    model, flags = platform.processor() or "?", []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
    except (OSError, subprocess.CalledProcessError):
        pass
    wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx2"))]
    return f"{model}, {os.cpu_count()} CPUs; flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def _fits(total: int) -> str:
    return " | ".join("yes" if total <= size else "no" for size in CARDS.values())


def write_results(rows: list[dict], estimates: list[dict]) -> None:
    """The results file: one row per config and variant, measured where measured."""
    from deeplabv2.memory import BACKWARD_MARGIN
    measured = {(r["config"], r["amp"], r["checkpoint_backbone"]): r for r in rows}
    estimated = {(r["config"], r["amp"], r["checkpoint_backbone"]): r for r in estimates}
    cards = " | ".join(f"{c}" for c in CARDS)
    lines = [
        "# Peak memory of one training step per self-training method (benchmarks/uda_memory.py)",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, CPU: {cpu_line()}. "
        "The machine was shared with other work: the seconds are not the point, memory is.",
        "",
        "**Measured** (`python benchmarks/uda_memory.py --steps 1 --cases ...`): each case a "
        "fresh process: the packaged config with `model.weights=null` (random weights of the "
        "real ResNet-101: the same memory), synthetic batches of its crops and batch, full "
        "training steps (every pass of the method with its backward, the optimizer step, the "
        "EMA update), the last one measured: `growth` is the peak RSS during it (VmHWM, reset "
        "just before) less the RSS before it; `state` the tensors held before it (parameters, "
        "buffers, the EMA teacher and the ImageNet copy, counted exactly) plus the optimizer's "
        "state (AdamW: two moments; counted, since with `--steps 1` it is made during the "
        "step). `GPU` = state + growth + 1 GiB for the CUDA context, cuDNN workspaces and the "
        "caching allocator (an allowance, not measured: the CPU's RSS is the closer to a lower "
        "bound of what a GPU holds). **Estimated** (`--estimate`): `deeplabv2.memory`'s check "
        "before the first step (saved tensors at two small probe crops, fitted, "
        f"x{BACKWARD_MARGIN} for the backward; state with gradients and optimizer state; one batch) + the same 1 GiB. A "
        "card fits a case when the figure is at most its 8 or 12 GiB.",
        "",
        f"| config | amp | checkpointing | crops, batch | measured: state + growth GiB | "
        f"GPU GiB | fits {cards} | s/step | estimated GPU GiB | fits {cards} |",
        "| --- | --- | --- | --- | ---: | ---: | " + " | ".join(":---:" for _ in CARDS)
        + " | ---: | ---: | " + " | ".join(":---:" for _ in CARDS) + " |"]
    blank = " | ".join("" for _ in CARDS)
    for name in CONFIGS:
        for amp, ckpt in VARIANTS:
            r, e = measured.get((name, amp, ckpt)), estimated.get((name, amp, ckpt))
            if r is None and e is None:
                continue
            from deeplabv2.config import CONFIG_DIR, load_config
            cfg = load_config(CONFIG_DIR / f"{name}.yaml", ["model.weights=null"])
            crops = "x".join(map(str, cfg.data.crop_size))
            if cfg.adapt.method == "hrda":
                crops += (f" (context x{cfg.adapt.hrda_context_scale:g}, detail "
                          f"{cfg.adapt.hrda_detail_crop[0]})")
            crops += f", {cfg.data.batch_size}"
            cells = [f"`{name.replace('gta5_to_cityscapes_', '')}`",
                     "bf16" if amp == "bf16" else "fp32", "backbone" if ckpt else "none", crops]
            if r is not None:
                gpu = r["state_bytes"] + r["growth"] + GPU_OVERHEAD
                cells += [f"{gb(r['state_bytes'])} + {gb(r['growth'])}", gb(gpu), _fits(gpu),
                          f"{r['seconds']:.0f}"]
            else:
                cells += ["not run", "", blank, ""]
            if e is not None:
                gpu = e["state"] + e["activations"] + e["batch_bytes"] + GPU_OVERHEAD
                cells += [gb(gpu), _fits(gpu)]
            else:
                cells += ["", blank]
            lines.append("| " + " | ".join(cells) + " |")
    from deeplabv2.utils.fileio import atomic_write_text
    atomic_write_text(RESULTS, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs=3, metavar=("CONFIG", "AMP", "CHECKPOINT"))
    p.add_argument("--only", default="", help="run the configs whose name contains this")
    p.add_argument("--cases", nargs="*", metavar="CONFIG:AMP:CHECKPOINT",
                   help="these cases in this order, e.g. gta5_to_cityscapes_dacs:bf16:true")
    p.add_argument("--estimate", action="store_true",
                   help="deeplabv2.memory's estimate of every case instead (seconds each)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.case:
        name, amp, ckpt = args.case
        print(json.dumps(run_case(name, amp, ckpt == "true", args.steps, args.threads)))
        return
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    estimates = json.loads(ESTIMATES.read_text()) if ESTIMATES.exists() else []
    from deeplabv2.utils.fileio import atomic_write_text
    if args.estimate:
        torch.set_num_threads(args.threads)
        estimates = [estimate_case(name, amp, ckpt) for name in CONFIGS if args.only in name
                     for amp, ckpt in VARIANTS]
        atomic_write_text(ESTIMATES, json.dumps(estimates, indent=1) + "\n")
        write_results(rows, estimates)
        return
    cases = [(name, amp, ckpt) for name in CONFIGS if args.only in name for amp, ckpt in VARIANTS]
    if args.cases:  # CONFIG:AMP:CHECKPOINT, in this order
        cases = [(c, amp, ckpt == "true") for c, amp, ckpt in (x.split(":") for x in args.cases)]
    for name, amp, ckpt in cases:
        if True:
            cmd = [sys.executable, __file__, "--case", name, amp, str(ckpt).lower(),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} amp={amp} checkpoint={ckpt} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows = [r for r in rows if (r["config"], r["amp"], r["checkpoint_backbone"])
                    != (name, amp, ckpt)] + [row]
            rows.sort(key=lambda r: (CONFIGS.index(r["config"]),
                                     VARIANTS.index((r["amp"], r["checkpoint_backbone"]))))
            atomic_write_text(RAW, json.dumps(rows, indent=1) + "\n")
            write_results(rows, estimates)
            print(f"{name} amp={amp} checkpoint={ckpt}: growth {gb(row['growth'])} GiB, "
                  f"state {gb(row['state_bytes'])} GiB, {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
