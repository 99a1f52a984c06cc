"""What ``train.amp: auto`` and ``--precision auto`` read on this CPU: both probes, round after
round, beside the whole ResNet-101's FP32 and bf16 inference (``--resnet101``), so that a
probe can be checked against the network it stands for.

Each round runs the training-step probe (:func:`deeplabv2.precision.bf16_train_speedup`) and
the inference probe (:func:`deeplabv2.precision.bf16_inference_speedup`) on each of
``--probe-threads`` (default: the probes' own :data:`deeplabv2.precision.PROBE_THREADS`) and,
with ``--resnet101``, three alternating calls each of ResNet-101 (random weights) prepared for
inference in FP32 and in bf16 at ``--size`` on ``--threads``, the best of each. The load
average at the start of each round is printed: on a shared machine the ratios move with it.
Results: ``benchmarks/precision_auto_results.md``.

    python benchmarks/precision_auto.py --rounds 4 --resnet101 --probe-threads 1 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from deeplabv2 import precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resnet101", action="store_true", help="also time ResNet-101 itself")
    ap.add_argument("--size", type=int, default=321, help="ResNet-101's input (square)")
    ap.add_argument("--probe-threads", type=int, nargs="+", default=[precision.PROBE_THREADS],
                    help="run the probes on each of these thread counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flags = sorted(f for f in precision.cpu_flags() if f.startswith(("avx512", "amx")))
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") \
        else "?"
    print(f"CPU {model}; bf16: {precision.cpu_bf16_kind() or 'emulated'}; flags "
          f"{' '.join(flags) or '-'}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads", flush=True)
    nets = x = None
    if args.resnet101:
        from deeplabv2 import hub
        from deeplabv2.deploy.fast import optimize_for_inference
        torch.manual_seed(0)
        model101 = hub.deeplabv2_resnet101(19, weights=None).eval()
        nets = {k: optimize_for_inference(model101, precision=k) for k in ("fp32", "bf16")}
        x = torch.randn(1, 3, args.size, args.size)
        with torch.no_grad():
            for net in nets.values():
                net(x)  # warm-up
    for r in range(args.rounds):
        line = f"round {r}: load {os.getloadavg()[0]:.1f}"
        for n in args.probe_threads:
            precision.PROBE_THREADS = n
            t = time.perf_counter()
            train = precision.bf16_train_speedup()
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            infer = precision.bf16_inference_speedup()
            infer_s = time.perf_counter() - t
            line += (f"; {n} thread(s): training probe {train:.2f}x ({train_s:.1f} s), "
                     f"inference probe {infer:.2f}x ({infer_s:.1f} s)")
        if nets:
            best = {k: float("inf") for k in nets}
            with torch.no_grad():
                for _ in range(3):
                    for k, net in nets.items():
                        t = time.perf_counter()
                        net(x)
                        best[k] = min(best[k], time.perf_counter() - t)
            line += (f"; ResNet-101 {args.size}x{args.size} FP32 {best['fp32']:.3f} s, bf16 "
                     f"{best['bf16']:.3f} s: {best['fp32'] / best['bf16']:.2f}x")
        print(line, flush=True)
    print(f"bf16 where a probe reads >= {precision.MIN_SPEEDUP}x")


if __name__ == "__main__":
    main()
