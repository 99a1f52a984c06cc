"""``deeplabv2`` command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import sys

ARCHS = ("resnet101", "resnet50", "vgg16")


def _build(name: str, num_classes: int, weights):
    from . import model
    return getattr(model, f"deeplabv2_{name}")(num_classes, weights=weights)


def cmd_info(args) -> int:
    from .info import model_info
    m = _build(args.model, args.num_classes, args.weights).eval()
    info = model_info(m, args.height, args.width)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            deeplabv2_{args.model} ({args.num_classes} classes, "
          f"backbone layout {m.layout}, {m.preprocessing.channel_order} input)")
    print(f"parameters       {info['parameters']:,} total, "
          f"{info['trainable_parameters']:,} trainable")
    print(f"FLOPs            {info['flops'] / 1e9:,.1f} GFLOPs per {args.height}x{args.width} "
          f"image (multiply-add = 2)")
    print(f"output stride    {info['output_stride']}")
    print(f"logits           {tuple(info['logits_shape'])} -> upsampled "
          f"{tuple(info['output_shape'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deeplabv2", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters, FLOPs, output stride and shape of a model")
    info.add_argument("--model", choices=ARCHS, default="resnet101")
    info.add_argument("--num-classes", type=int, default=19)
    info.add_argument("--height", type=int, default=512)
    info.add_argument("--width", type=int, default=1024)
    info.add_argument("--weights", default=None, help="weights file to load (optional)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # one clear line for the user's mistakes, full trace with -v later
        from .weights import WeightsError
        if isinstance(e, (WeightsError, FileNotFoundError, ValueError)):
            print(f"deeplabv2 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
