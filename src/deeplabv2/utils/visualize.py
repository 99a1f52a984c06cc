"""Colour label maps and overlays for predictions, reports and TensorBoard; the matplotlib
figure helpers of the charts (the demo's, a snapshot series' curve)."""

from __future__ import annotations

import numpy as np

from .fileio import atomic_write_buffered

IGNORE_COLOUR = (0, 0, 0)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 colours; 255 (ignore) is black."""
    palette = np.asarray(palette, dtype=np.uint8)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    table[255] = IGNORE_COLOUR
    return table[np.asarray(label, dtype=np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
    """Blend the colour label map over the RGB ``uint8`` image; ignored pixels stay the image."""
    colours = colorize(label, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = np.asarray(label) == 255
    out[keep] = image[keep]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported only when a chart is drawn (it costs
    about half a second)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically."""
    atomic_write_buffered(path, lambda f: fig.savefig(f, format="png"), fsync=False)
