"""The demo's report folder: metrics, per-class table, curves, confusion matrix, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..evaluation.metrics import format_table, save_json
from ..utils.fileio import atomic_write_text
from ..utils.visualize import pyplot, save_figure


def training_curve(history: list[dict], path, val_points: list[tuple[int, float]] = ()) -> None:
    """Training loss (log scale) and, on a second axis, validation mIoU: the points given, or
    the ``val_miou`` entries of ``history`` (what :func:`deeplabv2.train.train` records)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    its = [h["iteration"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    line = ax.plot(its, losses, label="training loss")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.grid(alpha=0.3, which="both")
    val_points = list(val_points) or [(h["iteration"], h["val_miou"]) for h in history
                                      if h.get("val_miou") is not None]
    if val_points:
        ax2 = ax.twinx()
        line += ax2.plot(*zip(*val_points), "o-", color="tab:orange", label="val mIoU")
        ax2.set_ylabel("val mIoU")
        ax2.set_ylim(0, 1)
    ax.legend(line, [x.get_label() for x in line], loc="center right")
    ax.set_title("training")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def confusion_figure(confusion, class_names, path) -> None:
    """Row-normalised confusion matrix (rows: ground truth) as a heat map."""
    plt = pyplot()
    m = np.asarray(confusion, dtype=np.float64)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n), dpi=110)
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > 0.5 else "black")
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(out_dir, *, metrics: dict, class_names, history, extra: dict) -> Path:
    """Write ``metrics.json``, ``iou_table.txt``, ``training_curve.png``, ``confusion.png`` and
    ``summary.json`` (``extra``: baseline, timings, settings) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(metrics, class_names, out / "metrics.json")
    atomic_write_text(out / "iou_table.txt", format_table(metrics, class_names) + "\n")
    training_curve(history, out / "training_curve.png")
    confusion_figure(metrics["confusion"], class_names, out / "confusion.png")
    atomic_write_text(out / "summary.json", json.dumps(extra, indent=2) + "\n")
    return out
