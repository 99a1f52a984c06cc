"""DeepLab v2 ResNet-101 speed on this CPU: eager FP32 against each faster mode and ONNX Runtime.

One run, one process, one machine: plain eager FP32 (frozen BN as separate ops, NCHW) is the
baseline; BN folding alone, our default fast FP32 path, bf16, ONNX Runtime (and torch.compile
with ``--compile``) are timed at 321x321 and 512x1024 (batch 1), then a training step of
2 x 321x321 crops in FP32 NCHW against FP32 channels-last and bf16 autocast + channels-last.
The machine's convolution peak is measured in the same run. Writes a Markdown report with the
table, the command, the CPU model, the load and the date. Weights are random: speed does not
depend on them.

    python benchmarks/speed.py                       # writes benchmarks/speed_results.md
    python benchmarks/speed.py --iterations 2 --warmup 1 --json speed.json
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

import torch

import deeplabv2
from deeplabv2.bench import bench, format_table
from deeplabv2.model import build_model


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> str:
    """The vector extensions that decide bf16 speed (native bf16 needs AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    keep = [f for f in flags if f.startswith(("avx", "amx"))]
    return " ".join(sorted(set(keep))) or "none"


def write_outputs(report: str, out, result: dict, json_path=None) -> None:
    """The Markdown report to ``out`` and, when asked, the raw result as JSON."""
    Path(out).write_text(report)
    print(f"report written to {out}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["321x321", "512x1024"])
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    p.add_argument("--train-iterations", type=int, default=1,
                   help="timed training steps per row (bf16 steps are slow without native bf16)")
    p.add_argument("--train-warmup", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny network, to try the script")
    p.add_argument("--out", default=str(Path(__file__).with_name("speed_results.md")))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.tiny:
        model = build_model({"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                             "num_classes": 19})
    else:
        model = deeplabv2.deeplabv2_resnet101(num_classes=19)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    modes = ["eager", "fold", "fast", "bf16"] + (["compile"] if args.compile else []) + \
        ["onnxruntime"]
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = bench(model, sizes, modes, args.iterations, args.warmup, args.threads,
                   train_iterations=args.train_iterations, train_warmup=args.train_warmup)
    elapsed = time.perf_counter() - start
    result.update(cpu=cpu_model(), cpu_flags=cpu_flags(), elapsed_s=elapsed,
                  load_average=[load_before, os.getloadavg()[0]],
                  date=datetime.date.today().isoformat(), tiny=args.tiny)
    table = format_table(result)
    print(table)
    command = "python " + " ".join(["benchmarks/speed.py", *(argv or sys.argv[1:])])
    import onnxruntime
    title = "a tiny ResNet (--tiny), not ResNet-101" if args.tiny else "ResNet-101"
    report = f"""# DeepLab v2 {title}: speed on the CPU

* command: `{command}`
* CPU: {result["cpu"]} ({result["threads"]} threads; vector extensions: {result["cpu_flags"]})
* date: {result["date"]}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}
* inference: {args.warmup} warm-up call(s), then the median of {args.iterations} timed call(s)
  per row; training: {args.train_warmup} warm-up step(s), {args.train_iterations} timed step(s)
* 1-minute load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end;
  the whole run took {elapsed / 60:.1f} min.

Inference is batch 1, whole image, logits upsampled to the input size. "vs eager" is the
speed-up over the eager FP32 model (unfolded frozen BN, NCHW) at the same size; for the
training rows it is against the FP32 NCHW step (forward, stride-8 loss, backward, SGD step on
2 crops). GFLOP/s counts the convolutions as direct convolutions (`torch.utils.flop_counter`,
multiply-add = 2; the backward pass as twice the forward), so a mode that uses Winograd can
pass 100% of the direct-convolution peak. "max rel. diff" is `max|logits - eager| /
max|eager|` of the last call (random weights: see `accuracy_results.md` for labels and mIoU
on a trained model). Peak RSS is the process's peak so far, so it only
grows down the table. The timed calls of one size go round-robin over the modes (each mode
warmed up first), so that a change in the machine's load touches every mode alike.

Modes: `eager` the model as built; `fold` BN folded into the convolutions + channels-last;
`fast` what `evaluate`/`predict` run by default (`deeplabv2.fast.optimize_for_inference`):
`fold` plus ReLU/residual sums fused into the oneDNN convolutions and the dilated 3x3
convolutions of layer3/layer4 as tiled Winograd (NNPACK) convolutions; `bf16` BN folded,
channels-last, bfloat16 weights and activations; `compile` `fold` under `torch.compile`
(freezing on); `onnxruntime` the ONNX export (dynamic height/width, exported once at the first
size) in ONNX Runtime's CPU provider with {result["threads"]} intra-op threads.

{table}
"""
    write_outputs(report, args.out, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
