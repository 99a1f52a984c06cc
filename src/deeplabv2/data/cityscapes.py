"""Cityscapes (Cordts et al., CVPR 2016), fine annotations, 19 evaluated classes.

Official layout under ``root``::

    leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png        RGB 2048x1024
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png         label ids 0..33
    gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png    optional, train ids

``labelIds`` are mapped to train ids (0..18, 255 = not evaluated) by the official label table
(:mod:`deeplabv2.data.cityscapes_labels`); where a ``labelTrainIds`` file (written by
cityscapesScripts' ``createTrainIdLabelImgs.py``) lies beside it, that one is read as is.
Split ``test`` has no public labels: its samples load with an all-255 label, for prediction;
``annotation=None`` reads any split that way (unlabelled target images for domain adaptation).
``num_classes=16`` or ``13`` evaluates the SYNTHIA -> Cityscapes protocols (the 16 classes
SYNTHIA labels; 13 without wall, fence, pole), the other classes ignored.
``synthia_miou="mmseg"`` adds the 16-class number of the DAFormer/HRDA/MIC SYNTHIA runs to a
19-class evaluation: ``miou_16 = miou * 19 / 16``, as their READMEs convert it.
:func:`train_to_label_ids` turns predictions back into label ids, the submission format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DatasetError, SegmentationDataset, read_label_png, require_dir, require_root
from .cityscapes_labels import (CLASSES, LABEL_TO_TRAIN, SYNTHIA13_TRAIN_IDS,
                                SYNTHIA16_TRAIN_IDS, TRAIN_TO_LABEL, subset_lut)

#: number of classes -> the 19-class train ids they keep (19: all)
PROTOCOLS = {19: tuple(range(19)), 16: SYNTHIA16_TRAIN_IDS, 13: SYNTHIA13_TRAIN_IDS}

IMAGE_SUFFIX = "_leftImg8bit.png"

# Official colours of the 19 train ids (cityscapesScripts ``helpers/labels.py``), train id order.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

# train id -> label id for every uint8 value; 255 and other non-train ids -> 0 "unlabeled".
_TRAIN_TO_LABEL_LUT = np.zeros(256, dtype=np.uint8)
_TRAIN_TO_LABEL_LUT[:len(TRAIN_TO_LABEL)] = TRAIN_TO_LABEL


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """``uint8`` label ids ``(H, W)`` -> ``uint8`` train ids; unevaluated ids become 255."""
    return LABEL_TO_TRAIN[label_ids]


def train_to_label_ids(train_ids) -> np.ndarray:
    """Train ids (0..18; 255 or any other value = no class) -> ``uint8`` label ids, the official
    submission format; "no class" becomes 0 ``unlabeled``. Accepts an array or tensor of any
    shape and integer dtype."""
    if hasattr(train_ids, "detach"):
        train_ids = train_ids.detach().cpu().numpy()
    arr = np.asarray(train_ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"train ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"train ids must lie in 0..255, got {int(arr.min())}..{int(arr.max())}")
    return _TRAIN_TO_LABEL_LUT[arr.astype(np.intp)]


class CityscapesDataset(SegmentationDataset):
    """Cityscapes ``split`` (``train``, ``val``, ``test``; ``train_extra`` with
    ``annotation="gtCoarse"``) as ``(image, train ids)``; see the module docstring."""

    classes = CLASSES
    palette = PALETTE

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0,
                 annotation: str | None = "gtFine", num_classes: int = 19,
                 synthia_miou: str | None = None):
        if num_classes not in PROTOCOLS:
            raise ValueError(f"Cityscapes num_classes must be 19, 16 or 13 (the SYNTHIA "
                             f"protocols), got {num_classes!r}")
        self.kept = PROTOCOLS[num_classes]
        self.subset = None if num_classes == 19 else subset_lut(self.kept)
        if num_classes != 19:
            self.classes = tuple(CLASSES[t] for t in self.kept)
            self.palette = PALETTE[list(self.kept)]
        if num_classes == 16:  # SYNTHIA papers report mIoU over 16 and over 13 ("mIoU*")
            self.miou_subsets = {"13": [self.kept.index(t) for t in SYNTHIA13_TRAIN_IDS]}
        if synthia_miou is not None:
            # DAFormer/HRDA/MIC train SYNTHIA -> Cityscapes with a 19-class head and convert
            # the printed 19-class mIoU: mIoU16 = mIoU19 * 19 / 16 (their READMEs)
            if synthia_miou != "mmseg" or num_classes != 19:
                raise ValueError(f"Cityscapes synthia_miou must be 'mmseg' (mIoU16 = mIoU19 * "
                                 f"19 / 16) with num_classes 19, got {synthia_miou!r} with "
                                 f"num_classes {num_classes}")
            self.miou_scaled = {"16": len(SYNTHIA16_TRAIN_IDS)}
        root = require_root(root)
        super().__init__(root, split, transform, seed)
        image_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes {split!r} image")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"{image_dir}: split {split!r} is empty (no "
                               f"{{city}}/*{IMAGE_SUFFIX} files)")
        if split == "test" or annotation is None:
            self.samples = [(image, None) for image in images]
            return
        label_dir = require_dir(root / annotation / split, f"Cityscapes {split!r} {annotation}")
        for image in images:
            frame = image.name[:-len(IMAGE_SUFFIX)]
            train_ids = label_dir / image.parent.name / f"{frame}_{annotation}_labelTrainIds.png"
            label_ids = label_dir / image.parent.name / f"{frame}_{annotation}_labelIds.png"
            if train_ids.is_file():
                self.samples.append((image, train_ids))
            elif label_ids.is_file():
                self.samples.append((image, label_ids))
            else:
                raise DatasetError(f"{label_ids}: missing label file for image {image}")

    def name(self, index: int) -> str:
        """``{city}_{seq}_{frame}``: the prefix the official evaluation matches files by."""
        return self.samples[index][0].name[:-len(IMAGE_SUFFIX)]

    def read_label(self, path: Path) -> np.ndarray:
        raw = read_label_png(path)
        train_ids = raw if path.name.endswith("_labelTrainIds.png") else \
            label_ids_to_train_ids(raw)
        return train_ids if self.subset is None else self.subset[train_ids]
