"""Where INT8 hurts a trained network: a PyTorch simulation of the quantization scheme of
``deeplabv2 quantize`` (int8 weights symmetric per output channel; every convolution's input
int8 per tensor, u8 where it is never negative, its range the min/max over training crops drawn
as ``quantize`` draws its calibration crops),
applied to one part of the network at a time, and the share of stride-8 scores of validation
images whose class then differs from FP32.

    python benchmarks/int8_sensitivity.py run/model.pth -c demo

It is a simulation (round-to-nearest fake quantization in float32, no bias correction), not
NNCF: its purpose is to say *which* quantizers break a model. It quantizes no sums (NNCF
quantizes both inputs of the residual sums of layer1-layer3; ``quantize`` leaves the ASPP's
and layer4's in FP32) and does not equalize the ASPP input as ``quantize`` does. Results:
``accuracy_results.md``.
"""

import argparse

import numpy as np
import torch

from deeplabv2.config import load_config
from deeplabv2.data import build_dataset
from deeplabv2.deploy.quantize import TrainingCrops
from deeplabv2.deploy.fast import fold_batchnorm
from deeplabv2.weights import load_model

PARTS = ("backbone.conv1", "backbone.layer1", "backbone.layer2", "backbone.layer3",
         "backbone.layer4", "head")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("-c", "--config", required=True, help="config naming the train/val data")
    p.add_argument("--calibration", type=int, default=32, help="training crops for the ranges")
    p.add_argument("--images", type=int, default=32, help="validation images scored")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    cfg = load_config(args.config, [])
    d = cfg.data
    val = build_dataset(d.dataset, d.root, d.val_split, **d.options)
    crops = TrainingCrops(d.dataset, d.root, d.train_split, crop_size=d.crop_size,
                          scale_range=d.scale_range, scales=d.scales, flip=d.flip,
                          options=d.options, preprocessing=model.preprocessing)
    calibration = torch.from_numpy(np.concatenate(crops.draw(args.calibration)))
    images = [model.preprocess(torch.from_numpy(val.load(i)[0])[None])
              for i in range(min(args.images, len(val)))]
    net = fold_batchnorm(model).eval()
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    ranges = {}

    def observe(name):
        def hook(module, inputs):
            x = inputs[0]
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, x.min().item()), max(hi, x.max().item()))
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in convs]
    with torch.no_grad():
        net.logits(calibration)
    for h in handles:
        h.remove()

    def fake_quantize(name):
        lo, hi = ranges[name]
        if lo < 0:
            scale, qmin, qmax = max(-lo, hi) / 127, -128, 127
        else:
            scale, qmin, qmax = hi / 255, 0, 255
        scale = max(scale, 1e-12)
        return lambda module, inputs: (torch.clamp(torch.round(inputs[0] / scale), qmin, qmax)
                                       * scale,)

    with torch.no_grad():
        reference = [net.logits(x) for x in images]
        weights = {n: m.weight.detach().clone() for n, m in convs}

        def run(activations: str | None, quantize_weights: bool) -> tuple[float, float]:
            for n, m in convs:
                w = weights[n]
                if quantize_weights:
                    s = (w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127).clamp_min(1e-12)
                    w = torch.round(w / s) * s
                m.weight.copy_(w)
            hooks = [m.register_forward_pre_hook(fake_quantize(n)) for n, m in convs
                     if activations is not None and n.startswith(activations)]
            changed = total = 0
            errors = []
            for x, ref in zip(images, reference):
                out = net.logits(x)
                changed += (out.argmax(1) != ref.argmax(1)).sum().item()
                total += ref[:, 0].numel()
                # per image: a few scenes with large logits would otherwise dominate the ratio
                errors.append(((out - ref).pow(2).mean() / (ref - ref.mean()).pow(2).mean())
                              .sqrt().item())
            for h in hooks:
                h.remove()
            return changed / total, float(np.median(errors))

        rows = [("weights only (per channel)", run(None, True))]
        for part in PARTS:
            rows.append((f"inputs of the convolutions in {part}", run(part, False)))
        rows.append(("all convolution inputs", run("", False)))
        rows.append(("all: weights and inputs", run("", True)))
    print(f"{len(convs)} convolutions; {len(images)} validation images, "
          f"{args.calibration} calibration crops\n")
    print("| int8 (simulated) | stride-8 classes changed | relative RMS logit error (median over images) |")
    print("| --- | ---: | ---: |")
    for name, (changed, rms) in rows:
        print(f"| {name} | {100 * changed:.2f}% | {rms:.3f} |")


if __name__ == "__main__":
    main()
