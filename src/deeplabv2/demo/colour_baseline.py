"""A per-pixel colour classifier: the floor any segmentation network must beat.

Each pixel's RGB is quantised to one of ``bins**3`` cells; each cell predicts the train class
seen most often in that cell on the training set. It sees no context and no texture, so its
mIoU says how much of a dataset colour alone explains (on the synthetic set: little, by design).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.base import IGNORE_INDEX


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


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` ``int64`` counts, rows = true class, columns = predicted; 255 is skipped."""
    keep = label != IGNORE_INDEX
    idx = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def miou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mIoU, per-class IoU (C,))``; classes absent from both truth and prediction are NaN
    and left out of the mean."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou)), iou


def colour_baseline_miou(train_ds, val_ds, num_classes: int, bins: int = 16,
                         max_samples: int | None = None) -> float:
    """Fit :func:`fit_colour_classifier` on ``train_ds`` and return its mIoU on ``val_ds``."""
    clf = fit_colour_classifier(train_ds, bins, max_samples, num_classes)
    conf = np.zeros((num_classes, num_classes), np.int64)
    for i in range(len(val_ds)):
        image, label = val_ds.load(i)
        conf += confusion_matrix(label, clf.predict(image), num_classes)
    return miou_from_confusion(conf)[0]
