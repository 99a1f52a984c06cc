"""Dense CRF speed: deeplabv2.inference.crf against pydensecrf (densecrf) on the same inputs, in one run.

    python benchmarks/crf.py                      # 512x1024, 19 classes, 10 iterations
    python benchmarks/crf.py --batch 4 --repeats 5 --output benchmarks/crf_results.md

Inputs, made here (nothing is downloaded):

- ``photo``: matplotlib's sample photograph ``grace_hopper.jpg`` (a JPEG with texture and
  noise; shipped with matplotlib) resized to the benchmark size;
- ``synthetic``: a piecewise-flat image with smooth shading and sensor-like noise;
- unaries: softmax of a noisy one-hot encoding of a blocky ground truth.

pydensecrf runs single-threaded (it has no threads); ours runs with ``--threads`` torch threads
(2 by default; the ratio column) and with one. Times are the best of ``--repeats`` runs, the
three contenders interleaved, each run the whole call: input checks, lattice construction, all
iterations. A batch row runs
``--batch`` different images in one call and reports the time per image; pydensecrf has no
batch and is timed image by image. Run it on an otherwise idle machine: with fewer free cores
than threads, OpenMP's barriers make the multi-threaded times many times slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deeplabv2.inference.crf import DenseCRF


def photo(height: int, width: int, index: int = 0) -> np.ndarray:
    import matplotlib.cbook
    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    if index % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = image.size  # different crops make different images for the batch
    crop = index // 2 * 16
    image = image.crop((crop, crop, w - crop, h - crop))
    return np.array(image.resize((width, height), Image.BILINEAR))


def synthetic(height: int, width: int, index: int = 0) -> np.ndarray:
    rng = np.random.default_rng(100 + index)
    cells = rng.uniform(0, 255, size=(max(2, height // 64), max(2, width // 64), 3))
    flat = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize((width, height),
                                                                     Image.NEAREST))
    shade = rng.uniform(0, 255, size=(max(2, height // 128), max(2, width // 128), 3))
    shade = np.asarray(Image.fromarray(shade.astype(np.uint8)).resize((width, height),
                                                                      Image.BICUBIC))
    image = 0.75 * flat + 0.25 * shade + rng.normal(0, 2.0, size=flat.shape)
    return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))


def unaries(height: int, width: int, classes: int, index: int = 0) -> np.ndarray:
    """(C, H, W) float32 probabilities: a noisy view of blocky ground truth."""
    rng = np.random.default_rng(index)
    block = 32
    gt = rng.integers(0, classes, size=(-(-height // block), -(-width // block)))
    gt = np.repeat(np.repeat(gt, block, 0), block, 1)[:height, :width]
    logits = 2.0 * np.eye(classes, dtype=np.float32)[gt].transpose(2, 0, 1)
    logits += rng.normal(0, 1.5, size=logits.shape).astype(np.float32)
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def reference(probs: np.ndarray, image: np.ndarray, crf: DenseCRF) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    c, h, w = probs.shape
    model = dcrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(c, -1)))
    model.addPairwiseGaussian(sxy=crf.pos_xy_std, compat=crf.pos_w)
    model.addPairwiseBilateral(sxy=crf.bi_xy_std, srgb=crf.bi_rgb_std, rgbim=image,
                               compat=crf.bi_w)
    return np.asarray(model.inference(crf.iterations)).reshape(c, h, w)


def best_times(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Time every named function ``repeats`` times, interleaved (so that a passing load hits
    all of them alike); return the best time and the last output of each."""
    best, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", default="photo,synthetic")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the markdown table here (e.g. benchmarks/crf_results.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    crf = DenseCRF(iterations=args.iterations)
    h, w, c = args.height, args.width, args.classes
    makers = {"photo": photo, "synthetic": synthetic}

    def ours(p: np.ndarray, im: np.ndarray, threads: int):
        def run():
            torch.set_num_threads(threads)
            try:
                return crf(torch.from_numpy(p), torch.from_numpy(im))
            finally:
                torch.set_num_threads(args.threads)
        return run

    rows = []
    for kind in args.images.split(","):
        make = makers[kind]
        image, probs = make(h, w), unaries(h, w, c)
        best, out = best_times({"ref": lambda: reference(probs, image, crf),
                                "ours": ours(probs[None], image[None], args.threads),
                                "one": ours(probs[None], image[None], 1)}, args.repeats)
        mine, theirs = out["ours"][0].numpy(), out["ref"]
        agree = float((mine.argmax(0) == theirs.argmax(0)).mean())
        mean_diff = float(np.abs(mine - theirs).mean())
        rows.append((f"{kind}, 1 image", best["ours"], best["one"], best["ref"], agree,
                     mean_diff))

        if args.batch > 1:
            images = np.stack([make(h, w, i) for i in range(args.batch)])
            batch_probs = np.stack([unaries(h, w, c, i) for i in range(args.batch)])
            best, _ = best_times({
                "ref": lambda: [reference(batch_probs[i], images[i], crf)
                                for i in range(args.batch)],
                "ours": ours(batch_probs, images, args.threads),
                "one": ours(batch_probs, images, 1)}, args.repeats)
            rows.append((f"{kind}, batch of {args.batch}, per image",
                         *(best[k] / args.batch for k in ("ours", "one", "ref")), None, None))

    header = (f"{h}x{w}, {c} classes, {args.iterations} iterations, DeepLab v2 VOC parameters; "
              f"best of {args.repeats} interleaved runs, seconds per image. pydensecrf is "
              f"single-threaded; the ratio is ours with {args.threads} torch threads over "
              "pydensecrf.")
    lines = [header, "",
             f"| input | ours, {args.threads} threads | ours, 1 thread | pydensecrf | ratio | "
             "same label as pydensecrf | mean abs prob diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, ours_s, one_s, ref_s, agree, diff in rows:
        same = f"{100 * agree:.2f} % | {diff:.5f}" if agree is not None else "- | -"
        lines.append(f"| {name} | {ours_s:.2f} | {one_s:.2f} | {ref_s:.2f} | "
                     f"{ours_s / ref_s:.2f} | {same} |")
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        command = "python benchmarks/crf.py " + " ".join(sys.argv[1:] if argv is None else argv)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, torch {torch.__version__}; load average at "
                   f"the end {load}")
        args.output.write_text(f"# Dense CRF: deeplabv2.inference.crf vs pydensecrf\n\n{table}\n\n"
                               f"Command: `{command.strip()}`\n\nMachine: {machine}.\n")


if __name__ == "__main__":
    main()
