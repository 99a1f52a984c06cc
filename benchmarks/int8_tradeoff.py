"""What INT8 costs in speed on trained models: our FP32 and bf16 paths and the INT8 model
beside each checkpoint (``deeplabv2 quantize``, with whatever options it was made), timed
round-robin on the stride-8 scores of one input size. Each INT8 row is named by its
``int8.json`` (bias correction, ``--max-label-change``) and gives the share of labels it
changed on its check crops.

    deeplabv2 quantize A/model.pth -c demo                              # the default recipe
    cp A/model.pth B/model.pth
    deeplabv2 quantize B/model.pth -c demo --max-label-change 0.005     # bounded INT8
    python benchmarks/int8_tradeoff.py A/model.pth B/model.pth --size 512 1024

Results: ``accuracy_results.md``.
"""

import argparse
import time

import torch

from deeplabv2.deploy.openvino_runtime import artefact_dir, load_openvino, read_sidecar
from deeplabv2.deploy.fast import optimize_for_inference
from deeplabv2.weights import load_model


def _label(checkpoint) -> str:
    info = read_sidecar(artefact_dir(checkpoint) / "int8.xml")
    parts = [f"bias correction {info.get('bias_correction', 'fast')}"]
    if "sums_in_fp32" not in info:
        parts.append("sums INT8 (made before the recipe)")
    if info.get("max_label_change") is not None:
        parts.append(f"--max-label-change {info['max_label_change']}")
    if "label_change_measured" in info:
        parts.append(f"{100 * info['label_change_measured']:.2f}% of check labels changed")
    return f"int8 {checkpoint} ({', '.join(parts)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+",
                   help="checkpoints of the same network, each with an int8.xml beside it")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoints[0]).eval()
    runs = {"ours fp32": optimize_for_inference(model),
            "ours bf16": optimize_for_inference(model, precision="bf16")}
    for ckpt in args.checkpoints:
        runs[_label(ckpt)] = load_openvino(load_model(ckpt).eval(), ckpt, "int8",
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
