"""Speed measurements: inference latency per input size and mode, FLOPs, training steps.

:func:`bench` returns a plain, JSON-serialisable dict; ``benchmarks/speed.py`` prints it as a
table and ``deeplabv2 bench`` writes it with ``--json``. Timings are wall-clock seconds per
image batch of one (``time.perf_counter`` around ``model(x)``) after ``warmup`` untimed calls;
the timed calls of one size go round-robin over the modes. Training steps are timed after
their own warm-up steps (a cold bf16 step is many times slower than a warm one).

The modes are :mod:`deeplabv2.deploy.modes`' (each a choice of
:func:`deeplabv2.deploy.runtime.prepare_network`); the memory per mode is measured by
:mod:`deeplabv2.deploy.memory`, the machine described by :mod:`deeplabv2.deploy.machine`, the
FLOPs counted by :func:`deeplabv2.model.info.forward_flops`. What each mode costs in accuracy
is :func:`deeplabv2.deploy.accuracy.mode_accuracy`'s.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from .. import hub
from ..model.info import forward_flops
from ..precision import autocast_context, resolve_train_amp
from ..utils.fileio import atomic_write_text
from ..weights import load_model
from .export import export_onnx, export_torchscript, fixed_size
from .fast import _mkldnn_conv
from .machine import machine
from .memory import RSSSampler, settled_rss_mib
from .modes import DEFAULT_MODES, MODE_DTYPES, MODES, Modes


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
           "iterations": len(times), "first_call_s": (warm or times)[0], "times_s": times}
    if flops:
        out["gflops_per_s"] = flops / median / 1e9
    return out


def dtype_bounds(threads: int | None = None, repeats: int = 3, n: int = 2048) -> dict:
    """An upper bound on this machine's arithmetic per dtype, measured: the best GFLOP/s of
    large matrix products (``torch.mm`` 2048^3) and of the direct convolutions that dominate
    DeepLab v2 at 512x1024 (oneDNN, channels-last, prepacked weights; maps of
    ``(n/32+1) x (n/16+1)``, 65x129 for the default ``n``), batch 1, no autograd, in fp32 and
    bf16. A mode counted in direct-convolution FLOPs may pass it only by doing less work
    (Winograd). No int8 bound: the int8 products PyTorch offers here (``torch._int_mm``,
    2.3 TOP/s on a 2-core AMX Xeon) and OpenVINO's single INT8 convolutions (up to 2.3 TOP/s)
    were both passed by OpenVINO's whole INT8 network (2.8 TOP/s in direct-convolution
    FLOPs), so neither bounds it."""
    if threads:
        torch.set_num_threads(int(threads))
    g = torch.Generator().manual_seed(0)

    def best(fn, flops):
        fn()
        return flops / min(_time(fn, repeats, 0)[1]) / 1e9

    out: dict = {}
    hw = (n // 32 + 1, n // 16 + 1)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=g).to(dtype)
        shapes = {f"mm {n}^3": best(lambda: torch.mm(a, a), 2 * n ** 3)}
        for cin, cout, k, d in ((1024, 256, 1, 1), (256, 256, 3, 2), (512, 512, 3, 4)):
            conv = nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d).eval().to(dtype)
            conv = conv.to(memory_format=torch.channels_last).requires_grad_(False)
            x = torch.randn(1, cin, *hw, generator=g).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                shapes[f"conv {k}x{k} {cin}->{cout} d{d} {hw[0]}x{hw[1]}"] = best(
                    lambda: _mkldnn_conv(conv, x), 2 * cin * cout * k * k * hw[0] * hw[1])
        out[name] = {"gflops_per_s": max(shapes.values()), "per_shape": shapes}
    return out


def _prepare_timed(modes: Modes, names, size) -> dict:
    """mode -> (network, seconds it took to prepare, MiB of resident memory the preparation
    kept) for inputs of ``size`` (the peers are made for that size)."""
    runners = {}
    for mode in names:
        held = settled_rss_mib()
        start = time.perf_counter()
        net = modes.prepare(mode, size)
        runners[mode] = (net, time.perf_counter() - start, settled_rss_mib() - held)
    return runners


#: the training steps timed: ``(amp, channels_last)``, each on batches of :data:`TRAIN_BATCH`
TRAIN_CHOICES = (("none", False), ("none", True), ("bf16", True))
TRAIN_BATCH = 2


def _train_step(model: nn.Module, *, batch: int, size, amp: str, channels_last: bool):
    """A closure running one SGD step (forward, stride-8 cross-entropy, backward, update) on
    random data, on a copy of ``model`` in train mode; ``amp="bf16"`` is ``torch.autocast``
    (the weights stay fp32, as training needs)."""
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
    return step


def train_step_times(model: nn.Module, *, size=(321, 321), iterations: int = 3,
                     warmup: int = 2) -> list[dict]:
    """Seconds per training step of each ``(amp, channels_last)`` choice of
    :data:`TRAIN_CHOICES`: ``warmup`` untimed steps each (the first bf16 steps are many times
    slower than the later ones), then ``iterations`` timed steps round-robin over the choices. Per choice: median/mean/min
    seconds, the first step's time, GFLOP/s (backward counted as twice the forward) and the
    peak resident memory during its own steps."""
    batch = TRAIN_BATCH
    flops = 3 * forward_flops(model, *size, batch=batch)
    steps = [_train_step(model, batch=batch, size=size, amp=amp, channels_last=cl)
             for amp, cl in TRAIN_CHOICES]
    warm, times, peaks = [], [[] for _ in steps], [0.0] * len(steps)
    for k, step in enumerate(steps):
        with RSSSampler() as mem:
            warm.append(_time(step, 0, warmup)[0])
        peaks[k] = mem.peak_mib
    for _ in range(iterations):
        for k, step in enumerate(steps):
            with RSSSampler() as mem:
                start = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - start)
            peaks[k] = max(peaks[k], mem.peak_mib)
    return [{"batch": batch, "size": list(size), "amp": amp, "channels_last": cl,
             "flops": flops, **_summary(warm[k], times[k], flops), "peak_rss_mib": peaks[k]}
            for k, (amp, cl) in enumerate(TRAIN_CHOICES)]


def bench(model: nn.Module, sizes, modes=DEFAULT_MODES, iterations: int = 3, warmup: int = 1,
          threads: int | None = None, *, train_step: bool = True, train_size=(321, 321),
          train_iterations: int | None = None, train_warmup: int = 2,
          bound_size: int = 2048) -> dict:
    """Time ``model`` (a DeepLabV2 in any state; it is not changed) and return a plain dict.

    ``sizes``: ``(height, width)`` pairs; ``modes``: names from :data:`MODES`; ``threads``:
    ``torch.set_num_threads`` and the peers' thread count when given. Every mode is prepared
    for each size (the peers compiled at that size), warmed up by ``warmup`` calls, then timed
    ``iterations`` times round-robin over the modes.

    Returns ``{"threads", "machine", "inference": [{"size", "mode", "dtype", "flops",
    "median_s", "mean_s", "min_s", "iterations", "first_call_s", "times_s", "gflops_per_s",
    "speedup_vs_eager", "max_rel_diff_vs_eager", "prepare_s", "held_mib", "peak_rss_mib",
    "call_peak_mib"}, ...], "train": [{...}, ...], "train_auto": {...}}``:
    ``held_mib`` is the resident memory that mode keeps between calls (what its preparation
    and its first calls kept, by :func:`settled_rss_mib`: its weights, packed copies,
    workspaces, a runtime's arena; the source model is not counted), ``peak_rss_mib`` the
    largest resident memory of the process (every mode of that size loaded) seen during that
    mode's warm-up calls and one more untimed call, and ``call_peak_mib`` its rise above the
    memory before the call (the call's working memory); ``times_s`` the timed calls, in round order;
    ``train`` holds fp32 NCHW, fp32 channels-last and bf16 channels-last steps
    (:func:`train_step_times`, ``train_warmup`` warm-up steps each) and ``train_auto`` what
    ``train.amp: auto`` picks here and why. ``"bounds"`` holds :func:`dtype_bounds` (matrices
    of ``bound_size``) and every row its ``"percent_of_bound"`` (of its dtype's bound).
    """
    if threads:
        torch.set_num_threads(int(threads))
    sizes = [tuple(int(v) for v in s) for s in sizes]
    modes = tuple(modes)
    was_training = model.training
    model.eval()
    made = Modes(model, threads=threads)  # one OpenVINO conversion for every size
    rows = []
    for height, width in sizes:
        runners = _prepare_timed(made, modes, (height, width))
        flops = forward_flops(model, height, width)
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        # Warm-up per mode, then one call whose memory is sampled, then the timed calls
        # round-robin over the modes, so that a change in the machine's load during the run
        # affects every mode alike. The timed calls are not sampled: the sampling thread
        # would take CPU time from the 2 compute threads, the more so for modes made of many
        # short operations.
        # A mode's held memory: what its preparation kept plus what its first calls kept
        # (caches, workspaces, a runtime's arena), each measured as the settled memory after
        # minus before, so that the other modes' models do not count. Trimming hands cached
        # free pages back to the OS, so one untimed round follows before the timed ones.
        warm, times, outputs = {}, {m: [] for m in modes}, {}
        peak, rise = {m: 0.0 for m in modes}, {m: 0.0 for m in modes}
        held = {m: runners[m][2] for m in modes}
        with torch.no_grad():
            for mode in modes:
                before = settled_rss_mib()
                with RSSSampler() as mem:
                    warm[mode], _ = _time(lambda: runners[mode][0](x), 0, warmup)
                peak[mode], rise[mode] = mem.peak_mib, mem.peak_mib - mem.start_mib
                held[mode] += settled_rss_mib() - before
                with RSSSampler() as mem:
                    outputs[mode] = runners[mode][0](x)
                peak[mode] = max(peak[mode], mem.peak_mib)
                rise[mode] = max(rise[mode], mem.peak_mib - mem.start_mib)
            for mode in modes:
                runners[mode][0](x)
            for _ in range(iterations):
                for mode in modes:
                    start = time.perf_counter()
                    runners[mode][0](x)
                    times[mode].append(time.perf_counter() - start)
        prepared = {m: runners[m][1] for m in modes}
        del runners
        eager_median = eager_out = None
        for mode in modes:
            row = {"size": [height, width], "mode": mode, "dtype": MODE_DTYPES.get(mode, "fp32"),
                   "flops": flops, **_summary(warm[mode], times[mode], flops),
                   "peak_rss_mib": peak[mode], "call_peak_mib": rise[mode],
                   "held_mib": held[mode], "prepare_s": prepared[mode]}
            out = torch.as_tensor(outputs.pop(mode)).float()
            if mode == "eager":
                eager_median, eager_out = row["median_s"], out
            if eager_median is not None:
                row["speedup_vs_eager"] = eager_median / row["median_s"]
                row["max_rel_diff_vs_eager"] = float((out - eager_out).abs().max()
                                                     / eager_out.abs().max())
            rows.append(row)
    train, train_auto = [], {}
    if train_step:
        train = train_step_times(model, size=train_size,
                                 iterations=train_iterations or iterations, warmup=train_warmup)
        for row in train:
            row["dtype"] = "bf16" if row["amp"] == "bf16" else "fp32"
            row["speedup_vs_fp32"] = train[0]["median_s"] / row["median_s"]
        amp, channels_last, why = resolve_train_amp("auto", False, torch.device("cpu"))
        train_auto = {"amp": amp, "channels_last": channels_last, "why": why}
    model.train(was_training)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": machine(), "inference": rows, "train": train,
              "train_auto": train_auto}
    result["bounds"] = dtype_bounds(threads, n=bound_size)
    for row in rows + train:
        bound = result["bounds"].get(row["dtype"])
        if bound:
            row["percent_of_bound"] = 100 * row["gflops_per_s"] / bound["gflops_per_s"]
    return result


# -- command line ---------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 321x321 (HEIGHTxWIDTH), got {text!r}") from None
    return h, w


def _fmt(row: dict, key: str, spec: str) -> str:
    """``row[key]`` formatted, or "-" where the run had no such value (no eager mode)."""
    return spec.format(row[key]) if key in row else "-"


def format_table(result: dict) -> str:
    """The inference and training rows of :func:`bench` as a Markdown table."""
    lines = ["| size | mode | median s | min s | GFLOP/s | % of dtype bound | vs eager "
             "| max rel. diff | held MiB | call peak MiB | process peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pct(r):
        return f"{r['percent_of_bound']:.0f}% {r['dtype']}" if "percent_of_bound" in r else "-"

    for r in result["inference"]:
        lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['mode']} | {r['median_s']:.3f} | "
                     f"{r['min_s']:.3f} | {r.get('gflops_per_s', 0):.1f} | {pct(r)} | "
                     f"{_fmt(r, 'speedup_vs_eager', '{:.2f}x')} | "
                     f"{_fmt(r, 'max_rel_diff_vs_eager', '{:.1e}')} | "
                     f"{r['held_mib']:.0f} | {r['call_peak_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    for r in result["train"]:
        mode = "train " + ("fp32" if r["amp"] == "none" else r["amp"] + " autocast") + \
            (" + channels-last" if r["channels_last"] else " NCHW")
        lines.append(f"| {r['batch']}x{r['size'][0]}x{r['size'][1]} | {mode} | "
                     f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r.get('gflops_per_s', 0):.1f} | "
                     f"{pct(r)} | {r['speedup_vs_fp32']:.2f}x vs fp32 NCHW (first step "
                     f"{r['first_call_s']:.1f} s) | - | - | - | {r['peak_rss_mib']:.0f} |")
    if result.get("train_auto"):
        a = result["train_auto"]
        lines.append(f"\n`train.amp: auto` here: amp={a['amp']}, channels_last="
                     f"{a['channels_last']} ({a['why']}).")
    if "bounds" in result:
        for dtype, b in result["bounds"].items():
            per = ", ".join(f"{k} {v:.0f}" for k, v in b["per_shape"].items())
            lines.append(f"\n{dtype} bound {b['gflops_per_s']:.0f} GFLOP/s (best of: {per}).")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    net = getattr(hub, f"deeplabv2_{args.model}")(args.num_classes, weights=args.weights)
    result = bench(net, [_size(s) for s in args.sizes], args.modes, args.iterations,
                   args.warmup, args.threads, train_step=not args.no_train,
                   train_warmup=args.train_warmup)
    result["model"] = args.model
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


def cmd_export(args) -> int:
    if not (args.onnx or args.torchscript):
        raise ValueError("nothing to do: give --onnx PATH and/or --torchscript PATH")
    model = load_model(args.checkpoint).eval()
    if fixed_size(model):
        print(f"HRDA: the export runs at {args.height}x{args.width} only (--height/--width); "
              "its detail windows are unrolled at the traced size")
    if args.onnx:
        export_onnx(model, args.onnx, args.height, args.width, opset=args.opset)
        print(f"ONNX written to {args.onnx} (input 'image' (N, 3, H, W), output 'logits')")
    if args.torchscript:
        export_torchscript(model, args.torchscript, args.height, args.width)
        print(f"TorchScript written to {args.torchscript}")
    return 0


def register(subparsers) -> None:
    """Add the ``bench`` and ``export`` subcommands to ``deeplabv2``'s subparsers."""
    be = subparsers.add_parser(
        "bench", help="inference and training-step speed per mode",
        description="Time inference per mode (PyTorch eager/fast/bf16, ONNX Runtime, OpenVINO "
                    "fp32/bf16, INT8) at each input size on random weights or a weights file, "
                    "against this CPU's measured FP32/bf16 bound, then the training step in "
                    "FP32 and bf16, and say what train.amp: auto picks here.")
    be.add_argument("--model", choices=("resnet101", "resnet50", "vgg16"), default="resnet101")
    be.add_argument("--num-classes", type=int, default=19)
    be.add_argument("--weights", default=None, help="weights file to load (optional)")
    be.add_argument("--sizes", nargs="+", default=["321x321", "512x1024"],
                    metavar="HxW", help="input sizes (default: 321x321 512x1024)")
    be.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    be.add_argument("--iterations", type=int, default=3, help="timed calls per size and mode")
    be.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    be.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first")
    be.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    be.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    be.add_argument("--json", default=None, help="write the results as JSON here")
    be.set_defaults(func=cmd_bench)

    ex = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX and/or TorchScript",
        description="Export a checkpoint to ONNX (input 'image' with dynamic height and "
                    "width, output 'logits') and/or to a traced TorchScript file.")
    ex.add_argument("checkpoint", help="a deeplabv2 checkpoint (.pth or .safetensors, e.g. "
                                       "RUN/model.pth) or a model folder of export-hub")
    ex.add_argument("--onnx", default=None, help="write ONNX here (dynamic height and width)")
    ex.add_argument("--torchscript", default=None, help="write a traced TorchScript file here")
    ex.add_argument("--height", type=int, default=512, help="example input height")
    ex.add_argument("--width", type=int, default=1024, help="example input width")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)
