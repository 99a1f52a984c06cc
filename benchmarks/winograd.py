"""Winograd atrous convolutions against oneDNN's direct ones, whole network, on this CPU.

Our FP32 inference path (:func:`deeplabv2.deploy.fast.optimize_for_inference`: BN folded,
channels-last, fused prepacked oneDNN convolutions, the ASPP as taps) with its dilated 3x3
convolutions run four ways: oneDNN's direct kernels (the baseline), Winograd F(4x4, 3x3) and
F(6x6, 3x3) through torch's batched GEMM (``deeplabv2.deploy.atrous.atrous_conv3x3_gemm``), and
NNPACK's Winograd where this torch has it. Same network, same input, stride-8 scores; the
timed calls go round-robin over the variants in a fresh random order each round (the host's
speed drifts), after a warm-up call each. Reports per variant the median and minimum seconds,
the median of the per-round ratios to the direct path (the ratio least moved by drift), the
largest relative difference from the eager network, and the extra memory of the Winograd
weights. Weights are random: speed does not depend on them.

    python benchmarks/winograd.py                         # ResNet-101, 512x1024 and 321x321
    python benchmarks/winograd.py --model vgg16 --sizes 512x1024 --rounds 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import deeplabv2
from deeplabv2.deploy.atrous import AtrousWinogradConv2d, nnpack_available, use_atrous_winograd
from deeplabv2.deploy.machine import cpu_model, isa_caps
from deeplabv2.deploy.fast import optimize_for_inference, winograd_backend

sys.path.insert(0, str(Path(__file__).parent))
from speed import capped, cpu_flags, write_outputs  # noqa: E402


def variants(model) -> dict:
    """name -> inference model: the direct path and each Winograd form on top of it."""
    out = {"direct": optimize_for_inference(model, winograd=False)}
    forms = [("gemm F(4x4,3x3)", "gemm", 4), ("gemm F(6x6,3x3)", "gemm", 6)]
    if nnpack_available():
        forms.append(("nnpack", "nnpack", None))
    for name, backend, tile in forms:
        net = optimize_for_inference(model, winograd=False)
        if use_atrous_winograd(net.model, backend=backend, tile=tile):  # NNPACK: tile None
            out[name] = net
    return out


def winograd_weight_mib(net) -> float:
    return sum(m.winograd_weights.nbytes for m in net.modules()
               if isinstance(m, AtrousWinogradConv2d)) / 2 ** 20


@torch.no_grad()
def measure(model, size, rounds: int) -> list[dict]:
    nets = variants(model)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    eager = model(x, upsample=False)
    diffs = {}
    for name, net in nets.items():  # also the warm-up call
        diffs[name] = ((net(x, upsample=False) - eager).abs().max() / eager.abs().max()).item()
    times = {name: [] for name in nets}
    for _ in range(rounds):
        for name in random.sample(list(nets), len(nets)):
            start = time.perf_counter()
            nets[name](x, upsample=False)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        ratios = [d / t for d, t in zip(times["direct"], ts)]
        rows.append({"size": list(size), "variant": name, "median_s": statistics.median(ts),
                     "min_s": min(ts), "speedup_vs_direct": statistics.median(ratios),
                     "speedup_quartiles": statistics.quantiles(ratios, n=4)[::2]
                     if len(ratios) > 1 else [ratios[0]] * 2,
                     "max_rel_diff_vs_eager": diffs[name],
                     "winograd_weights_mib": winograd_weight_mib(nets[name])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("resnet101", "vgg16"), default="resnet101")
    p.add_argument("--sizes", nargs="+", default=["512x1024", "321x321"])
    p.add_argument("--rounds", type=int, default=10, help="timed calls per variant and size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).with_name("winograd_results.md")))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(deeplabv2, f"deeplabv2_{args.model}")(num_classes=19).eval()
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for size in args.sizes:
        rows += measure(model, tuple(int(v) for v in size.split("x")), args.rounds)
    elapsed = time.perf_counter() - start
    lines = ["| size | variant | median s | min s | speed-up vs direct (median of rounds) "
             "| quartiles | max rel. diff vs eager | Winograd weights MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        q = r["speedup_quartiles"]
        lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['variant']} | {r['median_s']:.3f} "
                     f"| {r['min_s']:.3f} | {r['speedup_vs_direct']:.2f}x "
                     f"| {q[0]:.2f}-{q[1]:.2f} | {r['max_rel_diff_vs_eager']:.1e} "
                     f"| {r['winograd_weights_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    command, cap_note = capped(
        "python " + " ".join(["benchmarks/winograd.py", *(argv or sys.argv[1:])]), isa_caps())
    report = f"""# Winograd atrous convolutions vs oneDNN's direct ones ({args.model})

* command: `{command}`
* CPU: {cpu_model()} ({args.threads} threads; vector extensions: {cpu_flags()}); PyTorch CPU
  capability {torch.backends.cpu.get_cpu_capability()}
{cap_note}* default on this CPU (`deeplabv2.deploy.fast.winograd_backend`): {winograd_backend()}
* torch {torch.__version__}; {datetime.date.today().isoformat()}; load average
  {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; took {elapsed:.0f} s

Batch 1, stride-8 scores, {args.rounds} timed calls per variant, round-robin in random order.

{table}
"""
    write_outputs(report, args.out, {"rows": rows, "cpu": cpu_model(), "flags": cpu_flags(),
                                    "isa_caps": isa_caps()},
                  args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
