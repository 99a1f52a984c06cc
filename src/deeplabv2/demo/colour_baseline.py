"""A per-pixel colour classifier: the floor any segmentation network must beat.

Each pixel's RGB is quantised to one of ``bins**3`` cells; each cell predicts the train class
seen most often in that cell on the training set. It sees no context and no texture, so its
mIoU says how much of a dataset colour alone explains (on the synthetic set: little, by design).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.base import IGNORE_INDEX
from ..evaluation.metrics import ConfusionMatrix


@dataclass
class ColourClassifier:
    """``lookup[cell]`` is the class predicted for the colour cell ``cell`` (``bins**3`` cells)."""

    bins: int
    lookup: np.ndarray  # (bins**3,) int64 class ids

    def predict(self, image: np.ndarray) -> np.ndarray:
        """RGB ``uint8`` ``(H, W, 3)`` -> predicted train ids ``int64`` ``(H, W)``."""
        return self.lookup[colour_cells(image, self.bins)]


def colour_cells(image: np.ndarray, bins: int) -> np.ndarray:
    """Colour cell of each pixel of an RGB ``uint8`` image: ``int64`` ``(H, W)`` in
    ``0 .. bins**3 - 1``."""
    q = image.astype(np.int64) * bins // 256
    return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]


def fit_colour_classifier(dataset, bins: int = 16, max_samples: int | None = None,
                          num_classes: int | None = None) -> ColourClassifier:
    """Count (colour cell, class) pairs over ``dataset.load(i)`` and keep each cell's most
    frequent class; cells never seen predict the most frequent class overall. Pixels labelled
    255 are skipped."""
    num_classes = num_classes or dataset.num_classes
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    counts = np.zeros(bins ** 3 * num_classes, np.int64)
    for i in range(n):
        image, label = dataset.load(i)
        keep = label != IGNORE_INDEX
        cells = colour_cells(image, bins)[keep]
        counts += np.bincount(cells * num_classes + label[keep].astype(np.int64),
                              minlength=counts.size)
    counts = counts.reshape(bins ** 3, num_classes)
    lookup = counts.argmax(1)
    lookup[counts.sum(1) == 0] = counts.sum(0).argmax()
    return ColourClassifier(bins, lookup)


def colour_baseline_miou(train_ds, val_ds, num_classes: int, bins: int = 16,
                         max_samples: int | None = None) -> float:
    """Fit :func:`fit_colour_classifier` on ``train_ds`` and return its mIoU on ``val_ds``,
    counted and computed by :class:`~deeplabv2.evaluation.metrics.ConfusionMatrix` as the
    network's own evaluation is."""
    clf = fit_colour_classifier(train_ds, bins, max_samples, num_classes)
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for i in range(len(val_ds)):
        image, label = val_ds.load(i)
        cm.update(clf.predict(image), label)
    return cm.compute()["miou"]
