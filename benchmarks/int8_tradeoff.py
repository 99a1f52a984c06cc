"""What INT8's accuracy bound costs in speed on one trained model: our FP32 and bf16 paths, the
plain INT8 model and the one made with ``deeplabv2 quantize --max-label-change``, timed
round-robin on the stride-8 scores of one input size.

    deeplabv2 quantize A/model.pth -c demo                              # plain INT8
    cp A/model.pth B/model.pth
    deeplabv2 quantize B/model.pth -c demo --max-label-change 0.005     # bounded INT8
    python benchmarks/int8_tradeoff.py A/model.pth B/model.pth --size 512 1024
    python benchmarks/int8_tradeoff.py A/model.pth        # plain INT8 against FP32 and bf16 only

Results: ``accuracy_results.md``.
"""

import argparse
import time

import torch

from deeplabv2.deploy.openvino_runtime import load_openvino
from deeplabv2.fast import optimize_for_inference
from deeplabv2.weights import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plain", help="checkpoint with a plain int8.xml beside it")
    p.add_argument("bounded", nargs="?", default=None,
                   help="the same checkpoint quantized with --max-label-change (optional)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.plain).eval()
    runs = {"ours fp32": optimize_for_inference(model),
            "ours bf16": optimize_for_inference(model, precision="bf16"),
            "int8 plain": load_openvino(model, args.plain, "int8", threads=args.threads)}
    if args.bounded:
        runs["int8 bounded"] = load_openvino(load_model(args.bounded).eval(), args.bounded, "int8",
                                             threads=args.threads)
    x = torch.randn(1, 3, *args.size)
    times = {k: [] for k in runs}
    with torch.no_grad():
        for f in runs.values():
            for _ in range(args.warmup):
                f(x, upsample=False)
        for _ in range(args.iterations):
            for k, f in runs.items():
                t = time.perf_counter()
                f(x, upsample=False)
                times[k].append(time.perf_counter() - t)
    bf16 = sorted(times["ours bf16"])[len(times["ours bf16"]) // 2]
    print(f"| mode ({args.size[0]}x{args.size[1]}, {args.threads} threads) | median ms | "
          f"min ms | vs ours bf16 |\n| --- | ---: | ---: | ---: |")
    for k, v in times.items():
        v = sorted(v)
        med = v[len(v) // 2]
        print(f"| {k} | {1000 * med:.1f} | {1000 * v[0]:.1f} | {bf16 / med:.2f}x |")


if __name__ == "__main__":
    main()
