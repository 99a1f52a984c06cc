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
scratch), whatever allocates it, with no hook on PyTorch's allocator. The processes run with
glibc's mmap threshold fixed at 64 KiB (:data:`MALLOC`), so that a freed tensor leaves the
resident set at once, as it leaves a GPU allocator's ``memory_allocated``. Why not ``ru_maxrss``:
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

On a shared 2-core CPU a released-size step takes minutes (HRDA: far more), so ``--fit S1 S2``
measures each case at two smaller crops (per side; HRDA's detail crop and the pseudo-label
margins scaled alike) and extrapolates the growth linearly in the pixels to the released crops;
its rows say so. ``--jobs`` measures that many cases at once (RSS is per process).

    python benchmarks/uda_memory.py                          # every case at the released crops
    python benchmarks/uda_memory.py --fit 0.25 0.5 --jobs 2  # every case, fitted
    python benchmarks/uda_memory.py --only hrda              # configs whose name contains "hrda"
    python benchmarks/uda_memory.py --cases gta5_to_cityscapes_dacs:bf16:true ...   # these
    python benchmarks/uda_memory.py --case gta5_to_cityscapes_dacs none false  # one, as JSON

Results accumulate in ``uda_memory_results.json`` (one row per case and way of measuring) and
are written out as ``uda_memory_results.md``.
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
CONFIGS = ["gta5_to_cityscapes_dacs", "gta5_to_cityscapes_daformer_dlv2",
           "gta5_to_cityscapes_mic_daformer_dlv2", "gta5_to_cityscapes_hrda_dlv2",
           "gta5_to_cityscapes_mic_hrda_dlv2", "synthia_to_cityscapes_dacs",
           "synthia_to_cityscapes_daformer_dlv2", "synthia_to_cityscapes_hrda_dlv2",
           "synthia_to_cityscapes_mic_hrda_dlv2"]
VARIANTS = [("none", False), ("none", True), ("bf16", False), ("bf16", True)]
GiB = 1024 ** 3
#: glibc's malloc for the measured processes: every block of 64 KiB or more its own mapping,
#: given back to the kernel when freed. By default the mmap threshold grows (up to 32 MiB)
#: after the first such free and the heap keeps what is freed below it: the first step's
#: activations then stay resident and the measured step reuses them, so its RSS growth reads
#: too low.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
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


def scaled_overrides(name: str, scale: float) -> list[str]:
    """Overrides that shrink a config's crops by ``scale`` per side, keeping what the method
    needs of them: HRDA's grid (crops on multiples of 8 / context scale, the detail crop on 8),
    the pseudo-label margins in proportion."""
    from deeplabv2.config import CONFIG_DIR, load_config
    if scale == 1:
        return []
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", ["model.weights=null"])
    d, a = cfg.data, cfg.adapt
    grid = int(round(8 / a.hrda_context_scale)) if a.method == "hrda" else 8

    def on(v, m):
        return max(m, int(round(v * scale / m)) * m)

    out = [f"data.crop_size=[{on(d.crop_size[0], grid)}, {on(d.crop_size[1], grid)}]"]
    if a.target_crop_size:
        out.append(f"adapt.target_crop_size=[{on(a.target_crop_size[0], grid)}, "
                   f"{on(a.target_crop_size[1], grid)}]")
    if a.method == "hrda":
        out.append(f"adapt.hrda_detail_crop=[{on(a.hrda_detail_crop[0], 8)}, "
                   f"{on(a.hrda_detail_crop[1], 8)}]")
    if a.pseudo_margins:
        out.append(f"adapt.pseudo_margins={[int(round(m * scale)) for m in a.pseudo_margins]}")
    return out


def run_case(name: str, amp: str, checkpoint: bool, steps: int, threads: int,
             scale: float = 1.0) -> dict:
    """One configuration in this process, its crops ``scale`` per side; returns its
    measurements (bytes, seconds)."""
    from deeplabv2.adapt.methods import build_method
    from deeplabv2.config import CONFIG_DIR, load_config
    from deeplabv2.memory import _optimizer_slots, held_bytes
    from deeplabv2.model.resnet import set_backbone_checkpointing
    from deeplabv2.precision import autocast_context
    from deeplabv2.train import _build_model, _network, build_optimizer, set_lr

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC["MALLOC_MMAP_THRESHOLD_"]:
        raise SystemExit("run --case through the benchmark (or with the environment of MALLOC)")
    torch.set_num_threads(threads)
    cfg = load_config(CONFIG_DIR / f"{name}.yaml",
                      ["model.weights=null", f"train.amp={amp}",
                       f"train.checkpoint_backbone={str(checkpoint).lower()}",
                       *scaled_overrides(name, scale)])
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
                    target=torch.randn(d.batch_size, 3, *target_crop, generator=g) * 50,
                    # each target crop at the top left of the released 2048x1024 frame, not
                    # flipped (read by adapt.pseudo_margins_frame: image)
                    target_boxes=torch.tensor([[0, 0, max(1024, target_crop[0]),
                                                max(2048, target_crop[1]), 0]] * d.batch_size))

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
            "seconds": seconds, "steps": steps, "threads": threads, "scale": scale}


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


def write_results(rows: list[dict]) -> None:
    """The results file: one row per measurement (at the released crops, or fitted)."""
    cards = " | ".join(f"fits {c}" for c in CARDS)
    lines = [
        "# Peak memory of one training step per self-training method (benchmarks/uda_memory.py)",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, CPU: {cpu_line()}; "
        "some rows were measured while other work shared the 2 cores (load up to 8): the "
        "seconds are not the point, memory is.",
        "",
        "Each measurement is a fresh process: the packaged config with `model.weights=null` "
        "(random weights of the real ResNet-101 V1c or DeepLab ResNet-101: the same memory), "
        "synthetic batches of its crops and batch, full training steps (every pass of the "
        "method with its backward, the optimizer step, the EMA update), the last one measured. "
        "`growth`: the peak RSS during that step (VmHWM, reset just before it through "
        "/proc/self/clear_refs) less the RSS before it; `state`: the tensors held before it "
        "(parameters, buffers, optimizer state, the EMA teacher and the frozen ImageNet copy), "
        "counted exactly. `how`: `released` measured at the released crops; `fit a/b`: measured "
        "at a and b times the released crops per side (HRDA's detail crop and the pseudo-label "
        "margins scaled alike) and extrapolated, growth = c + d x scale^2 (what does not grow "
        "with the crop, the weights' bf16 copies and the gradients, plus a term in the pixels), "
        "because a released-size step takes 4-30 minutes on this shared machine. `GPU`: state "
        "+ growth + 1 GiB for the CUDA context, cuDNN workspaces and the caching allocator's "
        "rounding (an allowance, not measured; the CPU's RSS is the closer to a lower bound of "
        "what a GPU holds: glibc gives large blocks back to the kernel at once, PyTorch's CUDA "
        "allocator keeps them cached). A card fits when `GPU` is at most its 8 or 12 GiB.",
        "",
        f"| config | amp | checkpointing | crops, batch | how | state GiB | growth GiB | GPU GiB "
        f"| {cards} |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | "
        + " | ".join(":---:" for _ in CARDS) + " |"]
    for r in rows:
        crops = "x".join(map(str, r["crop"] if not r.get("fitted_from") else
                             [round(v / r["fitted_from"][-1]["scale"]) for v in r["crop"]]))
        if r["hrda"]:
            detail = r["hrda"]["detail_crop"][0]
            if r.get("fitted_from"):
                detail = round(detail / r["fitted_from"][-1]["scale"])
            crops += f" (context x{r['hrda']['context_scale']:g}, detail {detail})"
        crops += f", {r['batch']}"
        how = ("fit " + "/".join(f"{p['scale']:g}" for p in r["fitted_from"])
               if r.get("fitted_from") else f"released, {r['steps']} step(s)")
        gpu = r["state_bytes"] + r["growth"] + GPU_OVERHEAD
        marks = " | ".join("yes" if gpu <= size else "no" for size in CARDS.values())
        lines.append(f"| `{r['config'].replace('gta5_to_cityscapes_', '')}` | "
                     f"{'bf16' if r['amp'] == 'bf16' else 'fp32'} | "
                     f"{'backbone' if r['checkpoint_backbone'] else 'none'} | {crops} | {how} | "
                     f"{gb(r['state_bytes'])} | {gb(r['growth'])} | {gb(gpu)} | {marks} |")
    from deeplabv2.utils.fileio import atomic_write_text
    atomic_write_text(RESULTS, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs=3, metavar=("CONFIG", "AMP", "CHECKPOINT"))
    p.add_argument("--only", default="", help="run the configs whose name contains this")
    p.add_argument("--cases", nargs="*", metavar="CONFIG:AMP:CHECKPOINT",
                   help="these cases in this order, e.g. gta5_to_cityscapes_dacs:bf16:true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0,
                   help="--case at crops this many times the released ones per side")
    p.add_argument("--fit", type=float, nargs=2, metavar=("S1", "S2"),
                   help="measure each case at these two scales and extrapolate to the released "
                        "crops (growth = a + b * scale^2), instead of running them")
    p.add_argument("--jobs", type=int, default=1, help="cases measured at the same time")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.case:
        name, amp, ckpt = args.case
        print(json.dumps(run_case(name, amp, ckpt == "true", args.steps, args.threads,
                                  args.scale)))
        return
    rows = json.loads(RAW.read_text()) if RAW.exists() else []
    from deeplabv2.utils.fileio import atomic_write_text
    cases = [(name, amp, ckpt) for name in CONFIGS if args.only in name for amp, ckpt in VARIANTS]
    if args.cases:  # CONFIG:AMP:CHECKPOINT, in this order
        cases = [(c, amp, ckpt == "true") for c, amp, ckpt in (x.split(":") for x in args.cases)]
    from concurrent.futures import ThreadPoolExecutor

    def measure(case):
        name, amp, ckpt = case
        scales = args.fit or [1.0]
        points = []
        for scale in scales:
            cmd = [sys.executable, __file__, "--case", name, amp, str(ckpt).lower(),
                   "--steps", str(args.steps), "--threads", str(args.threads),
                   "--scale", str(scale)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC})
            if out.returncode:
                raise RuntimeError(f"{name} amp={amp} checkpoint={ckpt} scale={scale} "
                                   f"failed:\n{out.stderr[-3000:]}")
            points.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = dict(points[-1])
        if args.fit:  # growth = a + b * scale^2 through the two, at scale 1
            (s1, g1), (s2, g2) = [(p["scale"], p["growth"]) for p in points]
            b = (g2 - g1) / (s2 ** 2 - s1 ** 2)
            row.update(growth=int(g1 + b * (1 - s1 ** 2)), scale=1.0,
                       fitted_from=[{k: p[k] for k in ("scale", "crop", "growth", "seconds")}
                                    for p in points],
                       seconds=sum(p["seconds"] for p in points))
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(measure, cases):
            key = (row["config"], row["amp"], row["checkpoint_backbone"])
            rows = [r for r in rows if (r["config"], r["amp"], r["checkpoint_backbone"]) != key
                    or bool(r.get("fitted_from")) != bool(row.get("fitted_from"))] + [row]
            rows.sort(key=lambda r: (CONFIGS.index(r["config"]),
                                     VARIANTS.index((r["amp"], r["checkpoint_backbone"])),
                                     bool(r.get("fitted_from"))))
            atomic_write_text(RAW, json.dumps(rows, indent=1) + "\n")
            write_results(rows)
            print(f"{key}: growth {gb(row['growth'])} GiB, state {gb(row['state_bytes'])} GiB, "
                  f"{row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
