"""PASCAL VOC 2012 segmentation (21 classes incl. background), and the SBD-augmented set.

Official layout (``root`` is the folder holding ``VOCdevkit``, or ``VOCdevkit/VOC2012``
itself)::

    VOCdevkit/VOC2012/JPEGImages/{name}.jpg
    VOCdevkit/VOC2012/SegmentationClass/{name}.png         palette PNGs: index = class,
                                                           255 = object border (ignored)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt     one name a line

The SBD-augmented training set (Hariharan et al., 2011; 10,582 images, the paper's
``train_aug``) is split ``train_aug`` (any split ending in ``_aug``)::

    VOCdevkit/VOC2012/SegmentationClassAug/{name}.png     grayscale PNGs, value = class
    VOCdevkit/VOC2012/ImageSets/SegmentationAug/train_aug.txt

whose lines are either ``name`` or the common ``/JPEGImages/name.jpg
/SegmentationClassAug/name.png``. Split ``test`` reads images only (all-255 labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (DatasetError, SegmentationDataset, pair_listed, read_list, require_dir,
                   require_root)

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
           "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor")


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The VOC palette, ``(num_colours, 3)`` ``uint8``: the bits of the index, interleaved
    into the high bits of R, G and B (index 1 = (128, 0, 0), 2 = (0, 128, 0), 255 = (224,
    224, 192), the border colour)."""
    palette = np.zeros((num_colours, 3), dtype=np.uint8)
    for i in range(num_colours):
        c, r, g, b = i, 0, 0, 0
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def resolve_voc_root(root, year: str) -> Path:
    """The ``VOC{year}`` folder: ``root`` itself, ``root/VOCdevkit/VOC{year}`` or
    ``root/VOC{year}``, whichever holds ``JPEGImages``."""
    root = require_root(root)
    for base in (root, root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}"):
        if (base / "JPEGImages").is_dir():
            return base
    raise DatasetError(f"{root}: missing JPEGImages folder (looked in {root}, "
                       f"{root / 'VOCdevkit' / f'VOC{year}'} and {root / f'VOC{year}'})")


def list_names(list_path: Path) -> list[str]:
    """Sample names from a split list: the stem of each line's first field."""
    return [Path(line.split()[0]).stem for line in read_list(list_path)]


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 ``split`` (``train``, ``val``, ``trainval``, ``train_aug``, ``test``) as
    ``(image, class indices)``; see the module docstring."""

    classes = CLASSES
    palette = voc_palette(len(CLASSES))

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0):
        base = resolve_voc_root(root, "2012")
        super().__init__(base, split, transform, seed)
        if split.endswith("_aug"):
            list_dir, label_dir = "ImageSets/SegmentationAug", "SegmentationClassAug"
        else:
            list_dir, label_dir = "ImageSets/Segmentation", "SegmentationClass"
        if split.endswith("_aug") and not ((base / list_dir).is_dir() and
                                           (base / label_dir).is_dir()):
            raise DatasetError(
                f"{base}: split {split!r} needs the SBD augmented labels (10,582 images), not "
                f"part of VOC 2012: put SegmentationClassAug/*.png and "
                f"ImageSets/SegmentationAug/{split}.txt under {base} (the 'SegmentationClassAug' "
                f"archive of the DeepLab releases), or use data.train_split=train for the "
                f"1,464 VOC images")
        list_path = require_dir(base / list_dir, "split list") / f"{split}.txt"
        labels = None if split == "test" else require_dir(base / label_dir, "label")
        self.samples = pair_listed(list_names(list_path), base / "JPEGImages", ".jpg", labels,
                                   ".png", list_path)
