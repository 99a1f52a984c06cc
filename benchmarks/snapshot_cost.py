"""What a snapshot (``train.snapshot_every``) costs against a full training checkpoint, on the
real DeepLab v2 ResNet-101 (19 classes), as the training loop writes them.

    python benchmarks/snapshot_cost.py [--repeats 3]

A snapshot is ``deeplabv2.snapshots.save_snapshot`` (the weights in ``model.pth``'s format:
digest, finiteness check, ``torch.save``, ``fsync``, rename); the full checkpoint is
``deeplabv2.checkpoint.save_checkpoint`` as ``train.py`` calls it for ``last.pth``: the same plus
the SGD momentum buffers (filled by one real step), the RNG state and, for an adaptation run,
the method's modules and optimizers (ADVENT: the two discriminators and their Adam moments;
DACS: the EMA teacher). Prints a Markdown table of medians with the CPU (``/proc/cpuinfo``),
the thread count and the load average; each ratio is measured in the same run as the full
checkpoint it is compared with.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from deeplabv2 import build_model
from deeplabv2.adapt.methods import build_method
from deeplabv2.checkpoint import save_checkpoint
from deeplabv2.config import AdaptConfig
from deeplabv2.deploy.machine import cpu_model
from deeplabv2.snapshots import save_snapshot
from safety_overhead import median_time  # the same warmed median of repeats

CLASSES = [f"class {i}" for i in range(19)]


def setup(kind: str):
    """The model, its optimizer after one real SGD step (momentum buffers exist) and the
    adaptation state a ``last.pth`` of ``kind`` holds."""
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet", "blocks": [3, 4, 23, 3], "num_classes": 19,
                         "aux_head": kind == "advent"})
    opt = torch.optim.SGD(model.param_groups(2.5e-4, 5e-4), lr=2.5e-4, momentum=0.9)
    x = torch.randn(1, 3, 65, 65)
    logits = model(x, upsample=False)
    logits = logits[0] if isinstance(logits, tuple) else logits
    F.cross_entropy(logits, torch.zeros(logits.shape[:1] + logits.shape[2:],
                                        dtype=torch.long)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    adapt_state = None
    if kind != "supervised":
        method = build_method(AdaptConfig(method=kind, target_dataset="cityscapes",
                                          multi_level=kind == "advent"), model)
        for o in method.optimizers():  # Adam moments as after a step
            for group in o.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            o.step()
        adapt_state = method.extra_state()
    return model, opt, adapt_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("supervised", "advent", "dacs"):
            model, opt, adapt_state = setup(kind)
            params = sum(p.numel() for p in model.parameters())
            run = Path(tmp) / kind

            def snapshot():
                save_snapshot(run, 2000, model, CLASSES, None)

            def checkpoint():
                save_checkpoint(run / "last.pth", model, opt, 2000, CLASSES, None, {}, 0.5,
                                None, adapt_state=adapt_state)
            t_ckpt = median_time(checkpoint, args.repeats)
            t_snap = median_time(snapshot, args.repeats)
            b_ckpt = (run / "last.pth").stat().st_size
            b_snap = (run / "snapshots" / "iter_002000.pth").stat().st_size
            rows.append((kind, params, t_snap, t_ckpt, b_snap, b_ckpt))
            del model, opt, adapt_state

    print(f"* command: `python benchmarks/snapshot_cost.py --repeats {args.repeats}`")
    print(f"* CPU: {cpu_model()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"* load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end\n")
    print("| run (last.pth holds) | parameters | snapshot s | last.pth s | time ratio | "
          "snapshot MiB | last.pth MiB | size ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    what = {"supervised": "supervised (weights + SGD momentum)",
            "advent": "ADVENT multi-level (+ aux head, 2 discriminators + Adam)",
            "dacs": "DACS (+ EMA teacher)"}
    for kind, params, ts, tc, bs, bc in rows:
        print(f"| {what[kind]} | {params / 1e6:.1f}M | {ts:.2f} | {tc:.2f} | {ts / tc:.2f} | "
              f"{bs / 2**20:.1f} | {bc / 2**20:.1f} | {bs / bc:.2f} |")


if __name__ == "__main__":
    main()
