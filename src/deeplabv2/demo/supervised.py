"""``deeplabv2 demo`` / ``make demo``: the main job on the embedded synthetic dataset.

Generates the synthetic street scenes, trains (``train``), evaluates the saved checkpoint
(``evaluate``), predicts on image files (``predict``) through the same functions a Cityscapes
run uses, and writes a report folder. The network is DeepLab v2 as everywhere else (atrous
ResNet, output stride 8, ASPP 6/12/18/24 summed, bilinear upsampling), with the depth and
width reduced so that it trains on 2 CPU cores in a few minutes (see ``configs/demo.yaml``).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..app.report import ReportCollector
from .colour_baseline import colour_baseline_miou
from ..config import load_config
from ..data import build_dataset
from ..evaluation.evaluate import evaluate
from ..deploy.fast import optimize_for_inference
from ..utils.fileio import atomic_write_buffered
from ..evaluation.metrics import format_table
from ..inference.predict import legend_image, predict_files
from .charts import write_report
from ..train import train
from ..utils.visualize import colorize
from ..weights import load_model

NUM_EXAMPLES = 6


def run_demo(out_dir="reports/demo", overrides=()) -> dict:
    """Run the whole demo; return the summary written to ``out_dir/summary.json``."""
    out = Path(out_dir)
    started = time.perf_counter()
    # Validation every 200 iterations on the first 100 images gives the training curve its
    # mIoU points for the time one full pass took before (the report's metrics come from the
    # full evaluation of model.pth below).
    cfg = load_config("demo", [f"train.out_dir={out / 'run'}", "train.val_every=200",
                               "train.val_limit=100", *overrides])
    d, m = cfg.data, cfg.model
    print(f"deeplabv2 demo: synthetic street scenes, DeepLab v2 with a reduced ResNet "
          f"(blocks {m.blocks}, width {m.width}), {cfg.train.iterations} iterations")

    # 1. train (validates at the end and writes run/model.pth); the demo's own run folder is
    # replaced on every `make demo`
    result = train(cfg, overwrite=True)
    train_seconds = time.perf_counter() - started

    # 2. evaluate the checkpoint as `deeplabv2 evaluate` would: BN folded, channels-last, fp32
    model = load_model(result.out_dir / "model.pth")
    net = optimize_for_inference(model)
    val_ds = build_dataset(d.dataset, d.root, d.val_split, **d.options)
    train_ds = build_dataset(d.dataset, d.root, d.train_split, **d.options)
    report = ReportCollector(out, val_ds.classes, val_ds.palette, names=val_ds.name)
    metrics = evaluate(net, val_ds, on_image=report)
    classes = list(val_ds.classes)
    print(format_table(metrics, classes))

    # 3. a colour-only classifier on the same data, to show the task is not trivial
    colour_miou = colour_baseline_miou(train_ds, val_ds, val_ds.num_classes)

    # 4. predict on image files as `deeplabv2 predict` would
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(NUM_EXAMPLES):
        image = Image.fromarray(val_ds.load(i)[0])
        atomic_write_buffered(inputs / f"{val_ds.name(i)}.png",
                              lambda f: image.save(f, format="PNG"), fsync=False)
    pred = predict_files(net, inputs, out / "predictions", val_ds.palette, progress=False,
                         class_names=classes)
    _example_panel(val_ds, out / "predictions", out / "examples.png", classes)

    summary = {
        "val_miou": metrics["miou"], "colour_baseline_miou": colour_miou,
        "margin_over_colour": metrics["miou"] - colour_miou,
        "pixel_accuracy": metrics["pixel_accuracy"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "iterations": cfg.train.iterations, "model": model.config,
        "dataset": {"name": d.dataset, "options": d.options, "train_images": len(train_ds),
                    "val_images": len(val_ds)},
        "predictions_written": len(pred.written),
    }
    write_report(out, metrics=metrics, class_names=classes, history=result.history,
                 extra=summary)
    page = report.write(metrics, title="deeplabv2 demo: synthetic street scenes, val split",
                        settings={"iterations": cfg.train.iterations,
                                  "colour-only classifier mIoU": f"{100 * colour_miou:.1f}%"})
    print(f"\nval mIoU {100 * metrics['miou']:.1f}  vs colour-only classifier "
          f"{100 * colour_miou:.1f}  ({summary['total_seconds']:.0f} s in all)")
    print(f"report: {out.resolve()}  (summary.json, metrics.json, iou_table.txt, "
          f"training_curve.png, confusion.png, examples.png, predictions/)")
    print(f"open {page.resolve()} in a browser: worst classes and images, confusion matrix")
    print(next_steps(result.out_dir / "model.pth", result.out_dir / "config.yaml", inputs, out))
    return summary


def shown(path) -> str:
    """``path`` as a command line should say it: relative to the working folder when inside
    it, else absolute, quoted for the shell where needed."""
    path = Path(path).resolve()
    try:
        path = path.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.quote(str(path))


def next_steps(checkpoint: Path, config: Path, images: Path, out: Path) -> str:
    """Where the demo's checkpoint is and the commands that use it, with the real paths (a
    newcomer guessed ``runs/demo/model.pth`` and the next command failed)."""
    ckpt, cfg, images = shown(checkpoint), shown(config), shown(images)
    return "\n".join([
        f"checkpoint: {ckpt} (trained with {cfg})",
        "next, with this checkpoint:",
        f"  deeplabv2 evaluate {ckpt} -c {cfg}",
        f"  deeplabv2 predict {ckpt} {images} -o {shown(out / 'my_predictions')}"
        "   (or your own images)",
        f"  deeplabv2 serve {ckpt}   (web app on http://127.0.0.1:8000; the serve extra)",
        f"  deeplabv2 quantize {ckpt} -c {cfg}   (INT8 for OpenVINO; the openvino extra), then",
        f"  deeplabv2 predict {ckpt} {images} -o {shown(out / 'int8_predictions')} "
        "--precision int8"])


def _example_panel(dataset, pred_dir: Path, path: Path, class_names=None) -> None:
    """Rows of image | ground truth | prediction (read back from the written PNGs), under
    column titles, with the class legend beside them."""
    rows = []
    for i in range(NUM_EXAMPLES):
        image, label = dataset.load(i)
        predicted = np.asarray(Image.open(pred_dir / f"{dataset.name(i)}.png"))
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([image, gap, colorize(label, dataset.palette), gap,
                                    colorize(predicted, dataset.palette)], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    panel = _titled(grid, image.shape[1], 4, ["image", "ground truth", "prediction"],
                    class_names, dataset.palette)
    atomic_write_buffered(path, lambda f: panel.save(f, format="PNG"), fsync=False)


def _titled(grid: np.ndarray, column_width: int, gap: int, titles, class_names, palette):
    """``grid`` under a row of column titles, with the legend of ``class_names`` on its right."""
    header = 20
    key = legend_image(class_names, palette) if class_names else None
    width = grid.shape[1] + (key.width + 8 if key else 0)
    height = header + max(grid.shape[0], key.height if key else 0)
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        x = i * (column_width + gap) + column_width // 2 - 3 * len(title)
        draw.text((max(x, 0), 4), title, fill="black")
    if key:
        canvas.paste(key, (grid.shape[1] + 8, header))
    return canvas
