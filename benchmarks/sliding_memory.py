"""Peak memory of whole-image vs sliding-window inference of one 1024x2048 Cityscapes-sized
image with the real DeepLab v2 ResNet-101 (random weights, eval, no_grad) on the CPU.

Each mode runs in a fresh subprocess, so ``ru_maxrss`` (the process's peak resident set) is
that mode's alone; the table reports it and its rise over the loaded model and input, which is
what the inference itself needed. Results go to ``benchmarks/sliding_memory.md``.

    python benchmarks/sliding_memory.py            # whole + sliding 513x513 / 342, 2 threads
    python benchmarks/sliding_memory.py --threads 4 --crop 769 --stride 513
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def child(mode: str, height: int, width: int, crop: int, stride: int, threads: int) -> dict:
    import torch

    import deeplabv2
    from deeplabv2.inference.front import infer, window_starts

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = deeplabv2.deeplabv2_resnet101(19).eval()
    x = torch.randn(1, 3, height, width) * 50  # a preprocessed image: zero-mean, 0-255 range
    loaded = peak_rss_mib()
    start = time.perf_counter()
    if mode == "whole":
        probs = infer(model, x)
        windows = 1
    else:
        probs = infer(model, x, mode="sliding", crop_size=crop, stride=stride)
        windows = (len(window_starts(height, crop, stride))
                   * len(window_starts(width, crop, stride)))
    seconds = time.perf_counter() - start
    assert probs.shape == (1, 19, height, width)
    return {"mode": mode, "windows": windows, "loaded_mib": loaded, "peak_mib": peak_rss_mib(),
            "seconds": seconds, "torch": torch.__version__}


def run_mode(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--height", str(args.height),
           "--width", str(args.width), "--crop", str(args.crop), "--stride", str(args.stride),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # e.g. killed by the kernel's OOM killer (-9): the mode does not fit in memory
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"mode": mode, "failed": f"exit code {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], args, command: str) -> str:
    lines = [
        "# Whole-image vs sliding-window inference: peak memory",
        "",
        f"One {args.height}x{args.width} image, DeepLab v2 ResNet-101 (19 classes, random "
        f"weights), eval mode, `torch.no_grad`, float32, CPU with {args.threads} threads, "
        f"each mode in a fresh process; memory is the process's peak resident set "
        f"(`ru_maxrss`). \"Loaded\" is the peak after building the model and the input; "
        f"\"inference\" is the rise above it.",
        "",
        "| mode | windows | loaded (MiB) | peak (MiB) | inference (MiB) | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        name = ("whole image" if r["mode"] == "whole"
                else f"sliding {args.crop}x{args.crop} / stride {args.stride}")
        if "failed" in r:
            lines.append(f"| {name} | - | - | did not fit / failed | - | - |")
            lines.append(f"\n{name}: {r['failed']}\n")
            continue
        lines.append(f"| {name} | {r['windows']} | {r['loaded_mib']:,.0f} | "
                     f"{r['peak_mib']:,.0f} | {r['peak_mib'] - r['loaded_mib']:,.0f} | "
                     f"{r['seconds']:.1f} |")
    torch_version = next((r["torch"] for r in results if "torch" in r), "?")
    lines += ["", f"Command: `{command}`", "",
              f"Machine: {platform.processor() or platform.machine()}, Python "
              f"{platform.python_version()}, torch {torch_version}.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--crop", type=int, default=513)
    p.add_argument("--stride", type=int, default=342)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "sliding_memory.md"))
    p.add_argument("--child", choices=("whole", "sliding"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.height, args.width, args.crop, args.stride,
                               args.threads)))
        return 0
    results = []
    for mode in ("whole", "sliding"):
        results.append(run_mode(mode, args))
        print(json.dumps(results[-1]))
    command = "python benchmarks/sliding_memory.py " + " ".join(sys.argv[1:])
    text = report(results, args, command.strip())
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
