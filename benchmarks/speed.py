"""DeepLab v2 ResNet-101 speed on this CPU: eager FP32, our paths and the peers, and training.

One run, one process, one machine: plain eager FP32 (frozen BN as separate ops, NCHW) is the
baseline; BN folding alone, our default fast FP32 path, bf16, ONNX Runtime, OpenVINO FP32 and
bf16, INT8 (NNCF + OpenVINO) and, with ``--compile``, torch.compile are timed at 321x321 and
512x1024 (batch 1), each peer compiled at the size it runs with its documented latency
settings and the same thread count. Then a training step of 2 x 321x321 crops in FP32 NCHW,
FP32 channels-last and bf16 autocast + channels-last, each warmed up, and what
``train.amp: auto`` picks. Upper bounds per dtype are measured in the same run. Writes a
Markdown report with the table, the goal ratios, the command, the CPU model and flags, the
load and the date. Weights are random: speed does not depend on them.

    python benchmarks/speed.py                       # writes benchmarks/speed_results.md
    python benchmarks/speed.py --iterations 2 --warmup 1 --json speed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

import deeplabv2
from deeplabv2.deploy.bench import bench, format_table
from deeplabv2.deploy.machine import cpu_model
from deeplabv2.model import build_model
from deeplabv2.precision import cpu_flags as _flags

sys.path.insert(0, str(Path(__file__).parent))
from goals import goal_ratios  # noqa: E402


def cpu_flags() -> str:
    """The vector/matrix extensions that decide bf16/int8 speed (AVX512-BF16, VNNI, AMX)."""
    keep = sorted(f for f in _flags() if f.startswith(("avx", "amx")))
    return " ".join(keep) or "unknown"


def capped(command: str, caps: dict[str, str]) -> tuple[str, str]:
    """``command`` as it can be rerun, with the instruction-set caps it ran under
    (``deeplabv2.deploy.machine.isa_caps``) in front, and a report line that names them ("" if none)."""
    if not caps:
        return command, ""
    prefix = " ".join(f"{k}={v}" for k, v in caps.items())
    note = ("* **instruction set capped** by the environment: "
            + ", ".join(f"`{k}={v}`" for k, v in caps.items())
            + ": the libraries use no instructions beyond these, so this CPU runs as a kind "
              "that lacks the rest would (its caches, clocks and memory stay this machine's)\n")
    return f"{prefix} {command}", note


def write_outputs(report: str, out, result: dict, json_path=None) -> None:
    """The Markdown report to ``out`` and, when asked, the raw result as JSON."""
    Path(out).write_text(report)
    print(f"report written to {out}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


def _peers() -> list[str]:
    modes = []
    for module, names in (("onnxruntime", ["onnxruntime"]),
                          ("openvino", ["openvino", "openvino-bf16"]), ("nncf", ["int8", "int8-f32"])):
        try:
            __import__(module)
            modes += names
        except ImportError:
            print(f"{module} is not installed: no {', '.join(names)} row", file=sys.stderr)
    return modes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["321x321", "512x1024"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="inference modes (default: eager fold fast bf16 and every installed peer)")
    p.add_argument("--train-iterations", type=int, default=3, help="timed training steps per row")
    p.add_argument("--train-warmup", type=int, default=2,
                   help="untimed training steps per row first (a cold bf16 step is many times "
                        "slower than a warm one)")
    p.add_argument("--no-train", action="store_true")
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
    modes = args.modes or (["eager", "fold", "fast", "fast-direct", "bf16"] +
                           (["compile"] if args.compile else []) + _peers())
    start = time.perf_counter()
    load_before = os.getloadavg()
    result = bench(model, sizes, modes, args.iterations, args.warmup, args.threads,
                   train_step=not args.no_train, train_iterations=args.train_iterations,
                   train_warmup=args.train_warmup,
                   bound_size=256 if args.tiny else 2048)  # --tiny: a quick try, small bounds
    elapsed = time.perf_counter() - start
    result.update(cpu=cpu_model(), cpu_flags=cpu_flags(), elapsed_s=elapsed,
                  load_average=[list(load_before), list(os.getloadavg())],
                  date=datetime.date.today().isoformat(), tiny=args.tiny)
    table = format_table(result)
    goals = "\n".join(f"* {line}" for line in goal_ratios(result))
    print(table)
    print(goals)
    command = "python " + " ".join(["benchmarks/speed.py", *(argv or sys.argv[1:])])
    title = "a tiny ResNet (--tiny), not ResNet-101" if args.tiny else "ResNet-101"
    m = result["machine"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "onnxruntime", "openvino", "nncf")
                         if m.get(k))
    la, lb = result["load_average"]
    command, cap_note = capped(command, m.get("isa_caps") or {})
    report = f"""# DeepLab v2 {title}: speed on the CPU

* command: `{command}`
* CPU: {result["cpu"]}, {m["cores"]} cores, {result["threads"]} threads used; PyTorch CPU
  capability {m["torch_cpu_capability"]}; flags: {result["cpu_flags"]}
{cap_note}* date: {result["date"]}; {versions}
* inference: {args.warmup} warm-up call(s) per mode and size, then {args.iterations} timed
  call(s) round-robin; training: {args.train_warmup} warm-up step(s) per row, then
  {args.train_iterations} timed step(s) round-robin
* load average (1, 5, 15 min) {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at the start, {lb[0]:.2f}
  {lb[1]:.2f} {lb[2]:.2f} at the end; the whole run took {elapsed / 60:.1f} min.

Inference is batch 1, whole image, logits upsampled to the input size. "vs eager" is the
speed-up over the eager FP32 model (unfolded frozen BN, NCHW) at the same size; for the
training rows it is against the FP32 NCHW step (forward, stride-8 loss, backward, SGD step on
2 crops), whose first (cold) step is shown apart. GFLOP/s counts the convolutions as direct
convolutions (`torch.utils.flop_counter`, multiply-add = 2; the backward pass as twice the
forward). "% of dtype bound" divides it by the best GFLOP/s of large matrix products and
convolutions measured in the same run in that dtype (below the table; none for int8, where
no measure found was an upper bound: `deeplabv2.deploy.bench.dtype_bounds`). "max rel. diff" is
`max|logits - eager| / max|eager|` of the last call (random weights: see
`accuracy_results.md` for labels and mIoU on a trained model). Memory, per mode: "held" is
the resident memory the mode keeps between calls (its weights, packed or transformed
copies, workspaces, a runtime's arena: the rise over its preparation and its warm-up calls,
measured with freed memory handed back to the OS first; `eager` runs the source model, which
no mode counts: 168 MiB of FP32 weights for ResNet-101); "call peak" is the rise above the memory before a
call during the warm-up calls and one more untimed call (sampled every 2 ms; the timed calls
are not sampled); "process peak RSS" is the largest resident memory of the whole process in
those calls, with every mode of that size loaded (so it grows down the table). The first
mode of a runtime (ONNX Runtime, OpenVINO) also holds that runtime's libraries as they load.

Modes: `eager` the model as built; `fold` BN folded into the convolutions + channels-last;
`fast` what `evaluate`/`predict --precision fp32` run (`deeplabv2.deploy.fast.optimize_for_inference`):
`fold` plus ReLU/residual sums fused into prepacked oneDNN convolutions and the dilated 3x3
convolutions of layer3/layer4 as tiled Winograd (NNPACK on AVX2 CPUs, F(6x6, 3x3) through
torch's GEMM on AVX-512 ones); `fast-direct` the same with oneDNN's direct convolutions in
place of Winograd (`--no-winograd`); `bf16` the same in
bfloat16 (`--precision bf16`); `compile` `fold` under `torch.compile` (freezing on);
`onnxruntime` the ONNX export fixed at the size it runs, ONNX Runtime's default CPU session,
{result["threads"]} intra-op threads; `openvino`/`openvino-bf16` the network converted to
OpenVINO, compiled at the size it runs with `PERFORMANCE_HINT: LATENCY`,
`INFERENCE_NUM_THREADS: {result["threads"]}` and inference precision f32/bf16 (`--runtime
openvino`); `int8` the network quantized by NNCF (per-channel int8 weights; calibrated here on
4 random inputs, since speed does not depend on the values) in OpenVINO (`--precision int8`:
the operations it leaves in floating point run in bf16 where bf16 pays, by the rule of
`train.amp: auto` below);
`int8-f32` the same with those operations in f32.

{table}

Goals of issue 14, as ratios of this run (> 1: ours faster):

{goals}
"""
    write_outputs(report, args.out, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
