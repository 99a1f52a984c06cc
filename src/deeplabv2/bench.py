"""Speed measurements: inference latency per input size and mode, FLOPs, a training step.

:func:`bench` returns a plain, JSON-serialisable dict; ``benchmarks/speed.py`` prints it as a
table and ``deeplabv2 bench`` writes it with ``--json``. Timings are wall-clock seconds per
image batch of one (``time.perf_counter`` around ``model(x)``) after ``warmup`` untimed calls;
on a shared machine they are indicative only.

Inference modes:

* ``eager``: the model as given (frozen BN as separate ops, NCHW, fp32);
* ``fold``: frozen BN folded into the convolutions, channels-last, fp32 (nothing else);
* ``fast``: :func:`deeplabv2.fast.optimize_for_inference`, fp32: ``fold`` plus, on the CPU,
  ReLU and residual sums fused into the convolutions and Winograd atrous convolutions (what
  ``evaluate`` and ``predict`` run by default);
* ``winograd-all``: ``fast`` with every dilated 3x3 convolution (the ASPP's too) through
  Winograd, whatever its size: the worst case of that path's rounding, for accuracy checks;
* ``bf16``: BN folded, channels-last, bfloat16 weights and activations;
* ``compile``: ``fold`` under ``torch.compile`` with freezing, whose own fusion replaces
  ``fast``'s (the compile time is the row's ``first_call_s``);
* ``onnxruntime``: the ONNX export (:func:`deeplabv2.export.export_onnx`) in ONNX Runtime.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

MODES = ("eager", "fold", "fast", "winograd-all", "bf16", "compile", "onnxruntime")
DEFAULT_MODES = ("eager", "fast", "bf16")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (it never goes down)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def forward_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> int:
    """FLOPs of one forward pass (multiply-add = 2), counted on the meta device.

    Convolutions and matrix products only, as ``torch.utils.flop_counter`` counts them; the
    bilinear upsampling and elementwise ops are not included.
    """
    import copy
    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(batch, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


def _time(fn, iterations: int, warmup: int) -> tuple[list[float], list[float]]:
    """``(warm-up times, timed times)`` in seconds; the first call includes any compilation."""
    warm = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return warm, times


def _summary(warm: list[float], times: list[float], flops: int | None) -> dict:
    median = statistics.median(times)
    out = {"median_s": median, "mean_s": statistics.fmean(times), "min_s": min(times),
           "iterations": len(times), "first_call_s": (warm or times)[0]}
    if flops:
        out["gflops_per_s"] = flops / median / 1e9
    return out


def conv_peak_gflops(iterations: int = 3, threads: int | None = None) -> dict:
    """The machine's practical convolution peak: the best GFLOP/s of direct fp32 convolutions
    (channels-last, the shapes that dominate DeepLab v2 at 512x1024), batch 1, no autograd."""
    if threads:
        torch.set_num_threads(int(threads))
    shapes = {"3x3 256->256 d2 65x129": (256, 256, 3, 2), "1x1 1024->256 65x129": (1024, 256, 1, 1),
              "3x3 512->512 d4 65x129": (512, 512, 3, 4)}
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (cin, cout, k, d) in shapes.items():
        conv = nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d).eval()
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(1, cin, 65, 129, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _, times = _time(lambda: conv(x), iterations, 1)
        out[name] = 2 * cin * cout * k * k * 65 * 129 / min(times) / 1e9
    return {"gflops_per_s": max(out.values()), "per_shape": out}


def _onnx_runner(model: nn.Module, height: int, width: int, threads: int | None):
    import onnxruntime as ort
    from .export import export_onnx
    tmp = tempfile.TemporaryDirectory()
    path = export_onnx(model, Path(tmp.name) / "model.onnx", height, width)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tmp.cleanup()  # the session holds the graph in memory
    return lambda x: session.run(["logits"], {"image": x.numpy()})[0]


def _inference_runners(model: nn.Module, modes, sizes, threads):
    """mode -> (callable(x), seconds it took to prepare)."""
    from .fast import optimize_for_inference
    runners = {}
    for mode in modes:
        start = time.perf_counter()
        if mode == "eager":
            run = model
        elif mode == "fold":
            run = optimize_for_inference(model, precision="fp32", fuse=False, winograd=False)
        elif mode == "fast":
            run = optimize_for_inference(model, precision="fp32")
        elif mode == "winograd-all":
            from .atrous import use_atrous_winograd
            run = optimize_for_inference(model, precision="fp32", winograd=False)
            if not use_atrous_winograd(run.model, min_channels=1, min_pixels=1,
                                       max_overhead=float("inf")):
                raise ValueError("winograd-all: no NNPACK in this torch, or no dilated 3x3 "
                                 "convolution in the model")
        elif mode == "bf16":
            run = optimize_for_inference(model, precision="bf16")
        elif mode == "compile":
            run = optimize_for_inference(model, precision="fp32", compile=True)
        elif mode == "onnxruntime":
            run = _onnx_runner(model, *sizes[0], threads)
        else:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        runners[mode] = (run, time.perf_counter() - start)
    return runners


def train_step_time(model: nn.Module, *, batch: int = 2, size=(321, 321), amp: str = "none",
                    channels_last: bool = False, iterations: int = 3, warmup: int = 1) -> dict:
    """Seconds per SGD step (forward, stride-8 cross-entropy, backward, update) on random data.

    Runs on a copy of ``model`` in train mode; ``amp="bf16"`` uses ``torch.autocast`` (the
    weights stay fp32, as training needs). Returns median/mean/min seconds and the GFLOP/s
    achieved counting the backward pass as twice the forward FLOPs.
    """
    import copy

    from .inference import autocast_context
    net = copy.deepcopy(model).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        h, w = net.logits(torch.zeros(1, 3, *size)).shape[-2:]
    num_classes = int(getattr(model, "num_classes", 0) or net.logits(x[:1]).shape[1])
    target = torch.randint(0, num_classes, (batch, h, w), generator=g)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(x.device, amp):
            logits = net(x, upsample=False)
        loss = F.cross_entropy(logits.float(), target, ignore_index=255)
        loss.backward()
        optimizer.step()

    warm, times = _time(step, iterations, warmup)
    flops = 3 * forward_flops(model, *size, batch=batch)
    return {"batch": batch, "size": list(size), "amp": amp, "channels_last": channels_last,
            "flops": flops, **_summary(warm, times, flops), "peak_rss_mib": peak_rss_mib()}


def bench(model: nn.Module, sizes, modes=DEFAULT_MODES, iterations: int = 3, warmup: int = 1,
          threads: int | None = None, *, train_step: bool = True, train_batch: int = 2,
          train_size=(321, 321), train_iterations: int | None = None,
          train_warmup: int | None = None, peak: bool = True) -> dict:
    """Time ``model`` (a DeepLabV2 in any state; it is not changed) and return a plain dict.

    ``sizes``: ``(height, width)`` pairs; ``modes``: names from :data:`MODES`; ``threads``:
    ``torch.set_num_threads`` (and ONNX Runtime's intra-op threads) when given.

    Returns ``{"threads", "torch", "inference": [{"size", "mode", "flops", "median_s",
    "mean_s", "min_s", "iterations", "first_call_s", "gflops_per_s", "speedup_vs_eager",
    "prepare_s", "peak_rss_mib"}, ...], "train": [{...}, ...]}``; ``speedup_vs_eager`` is
    present when ``eager`` is among the modes, and ``train`` holds fp32 NCHW, fp32
    channels-last and bf16 channels-last steps of ``train_batch`` images of ``train_size``
    (empty when ``train_step=False``), timed ``train_iterations`` times after ``train_warmup``
    untimed steps (default: ``iterations`` and ``warmup``). With ``peak``, ``"conv_peak"`` holds
    :func:`conv_peak_gflops` and every row its ``"percent_of_peak"``.
    """
    if threads:
        torch.set_num_threads(int(threads))
    sizes = [tuple(int(v) for v in s) for s in sizes]
    modes = tuple(modes)
    was_training = model.training
    model.eval()
    runners = _inference_runners(model, modes, sizes, threads)
    rows = []
    for height, width in sizes:
        flops = forward_flops(model, height, width)
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        # Warm-up per mode, then the timed calls round-robin over the modes, so that a change
        # in the machine's load during the run affects every mode alike.
        warm, times, outputs = {}, {m: [] for m in modes}, {}
        with torch.no_grad():
            for mode in modes:
                warm[mode], _ = _time(lambda: runners[mode][0](x), 0, warmup)
            for _ in range(iterations):
                for mode in modes:
                    start = time.perf_counter()
                    out = runners[mode][0](x)
                    times[mode].append(time.perf_counter() - start)
                    outputs[mode] = out
        eager_median = eager_out = None
        for mode in modes:
            row = {"size": [height, width], "mode": mode, "flops": flops,
                   **_summary(warm[mode], times[mode], flops), "prepare_s": runners[mode][1],
                   "peak_rss_mib": peak_rss_mib()}
            out = torch.as_tensor(outputs.pop(mode)).float()
            if mode == "eager":
                eager_median, eager_out = row["median_s"], out
            if eager_median is not None:
                row["speedup_vs_eager"] = eager_median / row["median_s"]
                row["max_rel_diff_vs_eager"] = float((out - eager_out).abs().max()
                                                     / eager_out.abs().max())
            rows.append(row)
    train = []
    if train_step:
        for amp, channels_last in (("none", False), ("none", True), ("bf16", True)):
            train.append(train_step_time(model, batch=train_batch, size=train_size, amp=amp,
                                         channels_last=channels_last,
                                         iterations=train_iterations or iterations,
                                         warmup=warmup if train_warmup is None else train_warmup))
        for row in train[1:]:
            row["speedup_vs_fp32"] = train[0]["median_s"] / row["median_s"]
    model.train(was_training)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "inference": rows, "train": train}
    if peak:
        result["conv_peak"] = conv_peak_gflops(iterations, threads)
        for row in rows + train:
            row["percent_of_peak"] = 100 * row["gflops_per_s"] / result["conv_peak"]["gflops_per_s"]
    return result


@torch.no_grad()
def mode_accuracy(model: nn.Module, dataset, modes=("fast", "bf16", "onnxruntime"), *,
                  limit: int | None = None, threads: int | None = None) -> dict:
    """What each inference mode costs in accuracy, against eager FP32 on a labelled dataset.

    Every image (or the first ``limit``) goes through the eager FP32 model and through each of
    ``modes`` (names from :data:`MODES`), whole image at batch 1. Per mode: the fraction of
    pixels whose label differs from eager FP32's, the mIoU and its difference from eager FP32's
    in points (percent), and the largest ``max|logits - eager| / max|eager|`` over the images.
    Use a trained model: an untrained deep network's logits are too chaotic to say anything.
    """
    from .metrics import ConfusionMatrix
    if threads:
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    if n == 0:
        raise ValueError("mode_accuracy needs at least one image")
    first = model.preprocess(dataset.load(0)[0])
    runners = _inference_runners(model, ("eager", *modes), [tuple(first.shape[-2:])], threads)
    cms = {mode: ConfusionMatrix(dataset.num_classes) for mode in runners}
    changed = {mode: 0 for mode in runners}
    worst = {mode: 0.0 for mode in runners}
    pixels = 0
    for i in range(n):
        image, label = dataset.load(i)
        x = model.preprocess(image)
        target = torch.from_numpy(label.astype("int64"))[None]
        ref = None
        for mode, (run, _) in runners.items():
            logits = torch.as_tensor(run(x)).float()
            if ref is None:
                ref = logits
                ref_labels = ref.argmax(1)
            pred = logits.argmax(1)
            cms[mode].update(pred, target)
            changed[mode] += int((pred != ref_labels).sum())
            worst[mode] = max(worst[mode], float((logits - ref).abs().max() / ref.abs().max()))
        pixels += ref_labels.numel()
    model.train(was_training)
    ref_miou = cms["eager"].compute()["miou"]
    out = {"images": n, "pixels": pixels, "eager_miou": ref_miou, "modes": {}}
    for mode in modes:
        miou = cms[mode].compute()["miou"]
        out["modes"][mode] = {"miou": miou, "miou_diff_points": 100 * (miou - ref_miou),
                              "labels_changed": changed[mode] / pixels,
                              "max_rel_logit_diff": worst[mode]}
    return out


def format_accuracy_table(result: dict) -> str:
    """:func:`mode_accuracy`'s result as a Markdown table."""
    lines = ["| mode | mIoU % | mIoU diff (points) | labels changed | max rel. logit diff |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| eager fp32 (reference) | {100 * result['eager_miou']:.2f} | 0 | 0 | 0 |"]
    for mode, r in result["modes"].items():
        lines.append(f"| {mode} | {100 * r['miou']:.2f} | {r['miou_diff_points']:+.3f} | "
                     f"{100 * r['labels_changed']:.3f}% | {r['max_rel_logit_diff']:.1e} |")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 321x321 (HEIGHTxWIDTH), got {text!r}") from None
    return h, w


def format_table(result: dict) -> str:
    """The inference and training rows of :func:`bench` as a Markdown table."""
    lines = ["| size | mode | median s | GFLOP/s | % of conv peak | vs eager | max rel. diff "
             "| peak RSS MiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pct(r):
        return f"{r['percent_of_peak']:.0f}%" if "percent_of_peak" in r else "-"

    for r in result["inference"]:
        lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['mode']} | {r['median_s']:.3f} | "
                     f"{r.get('gflops_per_s', 0):.1f} | {pct(r)} | "
                     f"{r.get('speedup_vs_eager', 1):.2f}x | "
                     f"{r.get('max_rel_diff_vs_eager', 0):.1e} | {r['peak_rss_mib']:.0f} |")
    for i, r in enumerate(result["train"]):
        mode = "train " + ("fp32" if r["amp"] == "none" else r["amp"]) + \
            ("+channels_last" if r["channels_last"] else "")
        ratio = f"{r['speedup_vs_fp32']:.2f}x" if i else "1.00x"
        lines.append(f"| {r['batch']}x{r['size'][0]}x{r['size'][1]} | {mode} | "
                     f"{r['median_s']:.3f} | {r.get('gflops_per_s', 0):.1f} | {pct(r)} | "
                     f"{ratio} | - | {r['peak_rss_mib']:.0f} |")
    if "conv_peak" in result:
        per = ", ".join(f"{k} {v:.0f}" for k, v in result["conv_peak"]["per_shape"].items())
        lines.append(f"\nConvolution peak {result['conv_peak']['gflops_per_s']:.0f} GFLOP/s "
                     f"(best direct fp32 convolution, channels-last: {per}).")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    import json

    from . import model as models
    net = getattr(models, f"deeplabv2_{args.model}")(args.num_classes, weights=args.weights)
    result = bench(net, [_size(s) for s in args.sizes], args.modes, args.iterations,
                   args.warmup, args.threads, train_step=not args.no_train)
    result["model"] = args.model
    print(format_table(result))
    if args.json:
        from .fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx, export_torchscript
    from .weights import load_model
    if not (args.onnx or args.torchscript):
        raise ValueError("nothing to do: give --onnx PATH and/or --torchscript PATH")
    model = load_model(args.checkpoint).eval()
    if args.onnx:
        export_onnx(model, args.onnx, args.height, args.width, opset=args.opset)
        print(f"ONNX written to {args.onnx} (input 'image' (N, 3, H, W), output 'logits')")
    if args.torchscript:
        export_torchscript(model, args.torchscript, args.height, args.width)
        print(f"TorchScript written to {args.torchscript}")
    return 0


def register(subparsers) -> None:
    """Add the ``bench`` and ``export`` subcommands to ``deeplabv2``'s subparsers."""
    be = subparsers.add_parser("bench", help="inference and training-step speed per mode")
    be.add_argument("--model", choices=("resnet101", "resnet50", "vgg16"), default="resnet101")
    be.add_argument("--num-classes", type=int, default=19)
    be.add_argument("--weights", default=None, help="weights file to load (optional)")
    be.add_argument("--sizes", nargs="+", default=["321x321", "512x1024"],
                    metavar="HxW", help="input sizes (default: 321x321 512x1024)")
    be.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    be.add_argument("--iterations", type=int, default=3, help="timed calls per size and mode")
    be.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    be.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    be.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    be.add_argument("--json", default=None, help="write the results as JSON here")
    be.set_defaults(func=cmd_bench)

    ex = subparsers.add_parser("export", help="export a checkpoint to ONNX and/or TorchScript")
    ex.add_argument("checkpoint")
    ex.add_argument("--onnx", default=None, help="write ONNX here (dynamic height and width)")
    ex.add_argument("--torchscript", default=None, help="write a traced TorchScript file here")
    ex.add_argument("--height", type=int, default=512, help="example input height")
    ex.add_argument("--width", type=int, default=1024, help="example input width")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)
