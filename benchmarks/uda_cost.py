"""What one run of each adaptation config costs in computation, and about how many GPU-days.

Not a timing: the multiply-adds of every forward and backward a config's training runs, counted
by ``torch.utils.flop_counter`` on meta-device copies (no weights, no computation; the
network's convolutions and matrix products, the discriminators' too), for the config's own
crops, batch, passes per iteration and ``train.stop_at`` iterations. A backward is counted as
twice its forward (gradients of the activations and of the weights), a forward without
gradient (DACS's teacher) once. GPU-days are that total at an assumed sustained rate
(``--tflops``, default 10 TFLOP/s: FP32 on a V100-class GPU, what the released runs used); data
loading, the FFT of FDA and the colour jitter of DACS are left out, so read it as a lower bound
of the right order, not a measurement.

    python benchmarks/uda_cost.py [--tflops 10]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from deeplabv2.adapt.discriminator import FCDiscriminator
from deeplabv2.config import CONFIG_DIR, load_config
from deeplabv2.model.deeplab import build_model


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def network_flops(model_config: dict, size, batch: int) -> int:
    with torch.device("meta"):
        model = build_model(model_config)
    x = torch.empty(batch, 3, *size, device="meta")
    if model.aux_head is not None:
        return _flops(lambda: model(x, upsample=False, aux=True))
    return _flops(lambda: model.logits(x))


def discriminator_flops(classes: int, size, batch: int) -> int:
    with torch.device("meta"):
        d = FCDiscriminator(classes)
    return _flops(lambda: d(torch.empty(batch, classes, *size, device="meta")))


def crop(size_cfg, resize, fallback):
    """The network's input size: the crop, or the whole resized image when no crop cuts it."""
    crop_size = tuple(size_cfg or fallback)
    if resize:
        return tuple(min(c, r) for c, r in zip(crop_size, resize))
    return crop_size


def run_cost(name: str) -> dict:
    cfg = load_config(name)
    m, d, a, t = cfg.model, cfg.data, cfg.adapt, cfg.train
    model_config = {"backbone": m.backbone, "blocks": m.blocks, "num_classes": m.num_classes,
                    "atrous_rates": m.atrous_rates, "bn": m.bn, "head_mode": m.head_mode,
                    "aux_head": a.multi_level}
    src = crop(d.crop_size, d.resize, d.crop_size)
    tgt = crop(a.target_crop_size, a.target_resize, d.crop_size)
    n = d.batch_size
    fs, ft = network_flops(model_config, src, n), network_flops(model_config, tgt, n)
    iters = t.stop_at or t.iterations
    heads = 2 if a.multi_level else 1
    if a.method in ("adaptsegnet", "advent"):
        # network: source and target forward + backward; each discriminator: on source and
        # target maps forward + backward (its own loss), and on the target map once more with
        # the gradient going back to the network (the adversarial term)
        dis = heads * (discriminator_flops(m.num_classes, src, n) * 3
                       + discriminator_flops(m.num_classes, tgt, n) * 6)
        per_it = 3 * (fs + ft) + dis
    elif a.method == "minent":
        per_it = 3 * (fs + ft)
    elif a.method == "fda":
        share = max(0, iters - a.fda_ent_start) / iters  # the entropy pass from fda_ent_start
        per_it = 3 * fs + share * 3 * ft
    elif a.method == "dacs":
        per_it = 3 * fs + ft + 3 * ft  # source; teacher on target (no grad); the mixed image
    else:
        per_it = 3 * fs
    return {"config": name, "iterations": iters, "source": src, "target": tgt, "batch": n,
            "pflop": per_it * iters / 1e15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflops", type=float, default=10.0,
                    help="assumed sustained TFLOP/s (default 10: FP32, V100-class)")
    args = ap.parse_args()
    names = sorted(p.stem for p in CONFIG_DIR.glob("*_to_cityscapes_*.yaml"))
    print(f"| config | iterations | source input | target input | batch | PFLOP | GPU-days at "
          f"{args.tflops:g} TFLOP/s |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    for name in names:
        c = run_cost(name)
        days = c["pflop"] * 1e15 / (args.tflops * 1e12) / 86400
        print(f"| `{name}` | {c['iterations']} | {c['source'][1]}x{c['source'][0]} | "
              f"{c['target'][1]}x{c['target'][0]} | {c['batch']} | {c['pflop']:.0f} | "
              f"{days:.1f} |")


if __name__ == "__main__":
    main()
