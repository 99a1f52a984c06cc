"""What the failure safety of issue 12 costs on ResNet-101: the per-step finiteness check and the
checkpoint digest, against a training step and a plain ``torch.save``/``torch.load``.

    python benchmarks/safety_overhead.py [--crop 321] [--repeats 3]

Prints a Markdown table (medians) with the CPU, the thread count and the load average; the
ratios are measured in the same run, so the machine's load touches both sides alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from deeplabv2 import build_model
from deeplabv2.utils.digest import all_finite, content_digest
from deeplabv2.checkpoint import load_checkpoint, save_checkpoint


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    model = build_model({"backbone": "resnet", "blocks": [3, 4, 23, 3], "num_classes": 21})
    opt = torch.optim.SGD(model.param_groups(2.5e-4, 5e-4), lr=2.5e-4, momentum=0.9)
    x = torch.randn(1, 3, args.crop, args.crop)
    y = torch.randint(0, 21, (1, args.crop, args.crop))

    def step():
        logits = model(x, upsample=False)
        labels = F.interpolate(y[:, None].float(), size=logits.shape[-2:], mode="nearest")
        F.cross_entropy(logits, labels[:, 0].long()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tensors = [*model.parameters(), *model.buffers()]
    rows = []
    t_step = median_time(step, args.repeats)
    rows.append(("training step (batch 1, %dx%d)" % (args.crop, args.crop), t_step, t_step))
    t_check = median_time(lambda: all_finite(tensors), args.repeats)
    rows.append(("all_finite(parameters, buffers): per step", t_check, t_step))
    t_naive = median_time(lambda: all(bool(torch.isfinite(t).all()) for t in tensors
                                      if t.is_floating_point()), args.repeats)
    rows.append(("(isfinite per tensor, not used)", t_naive, t_step))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pth"
        plain = Path(tmp) / "plain.pth"
        state = {"model": model.state_dict(), "opt": opt.state_dict()}
        t_plain_save = median_time(lambda: torch.save(state, plain), args.repeats)
        rows.append(("torch.save of model + optimizer", t_plain_save, t_plain_save))
        t_ckpt = median_time(lambda: save_checkpoint(path, model, opt, 1, None, None, {}),
                             args.repeats)
        rows.append(("save_checkpoint (digest, finiteness, fsync, rename)", t_ckpt,
                     t_plain_save))
        t_digest = median_time(lambda: content_digest(state), args.repeats)
        rows.append(("  of which the SHA-256 of the contents", t_digest, t_plain_save))
        t_plain_load = median_time(lambda: torch.load(plain, weights_only=True), args.repeats)
        rows.append(("torch.load(weights_only=True)", t_plain_load, t_plain_load))
        t_load = median_time(lambda: load_checkpoint(path, model, opt), args.repeats)
        rows.append(("load_checkpoint (digest verified, finiteness, strict load)", t_load,
                     t_plain_load))
        size = path.stat().st_size / 2**20

    print(f"* command: `python benchmarks/safety_overhead.py --crop {args.crop} "
          f"--repeats {args.repeats}`")
    print(f"* CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"checkpoint {size:.0f} MiB")
    print(f"* load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n")
    print("| what | median s | vs baseline |")
    print("| --- | ---: | ---: |")
    for name, t, base in rows:
        print(f"| {name} | {t:.3f} | {t / base:.3f}x |")


if __name__ == "__main__":
    main()
