"""What each fast inference mode costs in accuracy, on a trained model: labels changed and mIoU.

Runs the checkpoint (by default the one ``make demo`` trains, ``reports/demo/run/model.pth``)
over a labelled split (by default the demo's synthetic validation scenes) in eager FP32 and in
each mode, and records per mode the fraction of pixels whose label changes against eager FP32,
the mIoU difference in points and the largest relative logit difference. Writes a Markdown
report with the command, the CPU and the date.

    make demo && python benchmarks/accuracy.py
    python benchmarks/accuracy.py run/model.pth -c cityscapes --split val --limit 100
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from deeplabv2.deploy.accuracy import format_accuracy_table, mode_accuracy
from deeplabv2.deploy.machine import cpu_model
from deeplabv2.deploy.modes import MODES
from deeplabv2.config import load_config
from deeplabv2.data import build_dataset
from deeplabv2.weights import load_model

sys.path.insert(0, str(Path(__file__).parent))
from speed import cpu_flags, write_outputs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default="reports/demo/run/model.pth")
    p.add_argument("-c", "--config", default="demo", help="config naming the dataset")
    p.add_argument("--split", default=None, help="split (default: the config's eval.split)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--modes", nargs="+", choices=[m for m in MODES if m != "eager"],
                   default=["fold", "fast", "winograd-all", "bf16", "onnxruntime"])
    p.add_argument("--int8", default=None,
                   help="the INT8 model for mode int8 (default: the one beside the checkpoint, "
                        "quantized now with --samples crops when missing)")
    p.add_argument("--samples", type=int, default=300, help="calibration crops for int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).with_name("accuracy_results.md")))
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value for the config")
    args = p.parse_args(argv)

    if not Path(args.checkpoint).is_file():
        p.error(f"{args.checkpoint}: no such checkpoint (run `make demo` first, or name one)")
    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    ds = build_dataset(d.dataset, d.root, args.split or cfg.eval.split, **d.options)
    model = load_model(args.checkpoint)
    start = time.perf_counter()
    int8_note = ""
    if {"int8", "int8-f32"} & set(args.modes):
        from deeplabv2.deploy.openvino_runtime import artefact_dir, read_sidecar
        from deeplabv2.deploy.quantize import quantize_checkpoint
        xml = Path(args.int8 or artefact_dir(args.checkpoint) / "int8.xml")
        if not xml.is_file():
            quantize_checkpoint(args.checkpoint, d.dataset, d.root, d.train_split,
                                crop_size=d.crop_size, scale_range=d.scale_range,
                                scales=d.scales, flip=d.flip, options=d.options,
                                samples=args.samples, out=xml)
        info = read_sidecar(xml)
        int8_note = (f"\n* int8: `{xml}`, {info.get('samples')} calibration crops of "
                     f"{info.get('dataset')} {info.get('split')} ({info.get('toolchain')}; "
                     f"{info.get('weights')}; {info.get('activations')})")
        args.int8 = xml
    torch.set_num_threads(args.threads)
    result = mode_accuracy(model, ds, args.modes, limit=args.limit, threads=args.threads,
                           int8_xml=args.int8)
    elapsed = time.perf_counter() - start
    table = format_accuracy_table(result)
    print(table)
    command = "python " + " ".join(["benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    m = model.config
    report = f"""# Accuracy of the fast inference modes on a trained model

* command: `{command}`
* model: `{args.checkpoint}`: {m.get('backbone')} blocks {m.get('blocks')}, width
  {m.get('width')}, {model.num_classes} classes
* data: {d.dataset} {ds.split}, {result['images']} images, {result['pixels']:,} pixels
* CPU: {cpu_model()} ({torch.get_num_threads()} threads; vector extensions: {cpu_flags()})
* date: {datetime.date.today().isoformat()}; torch {torch.__version__}; took {elapsed:.0f} s{int8_note}

Whole image, batch 1. "labels changed" is the fraction of pixels whose argmax differs from
eager FP32 (BN as separate ops, NCHW); "mIoU diff" is the mode's mIoU minus eager FP32's, in
points; "max rel. logit diff" is the largest `max|logits - eager| / max|eager|` over the images.
Modes: `fold` BN folded + channels-last FP32; `fast` what `evaluate`/`predict` run by default:
`fold` plus ReLU/residual sums fused into the oneDNN convolutions and, on maps of 64x64 and
more with 128+ channels, Winograd atrous convolutions (none in the demo's small network);
`winograd-all` `fast` with every dilated 3x3 convolution, the ASPP's included, through
Winograd whatever its size (the worst case of that path's rounding); `bf16` BN folded, channels-last, in
bfloat16 (`--precision bf16`); `compile` `fold` under `torch.compile` (freezing);
`onnxruntime` the ONNX export in ONNX Runtime (CPU); `openvino`/`openvino-bf16` OpenVINO
in f32/bf16 (`--runtime openvino`); `int8` the NNCF-quantized model in OpenVINO
(`--precision int8`).

{table}
"""
    write_outputs(report, args.out, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
