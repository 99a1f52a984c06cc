"""SYNTHIA-RAND-CITYSCAPES (Ros et al., CVPR 2016): 9,400 rendered 1280x760 frames labelled
with the Cityscapes classes it shares, the source domain of SYNTHIA -> Cityscapes adaptation.

Official layout under ``root``::

    RGB/0000000.png ...           RGB frames
    GT/LABELS/0000000.png ...     16-bit PNGs: channel 0 is the SYNTHIA class id (0..22),
                                  channel 1 the instance id
    train.txt, val.txt, ...       optional split lists (file names); without one, splits
                                  ``all`` and ``train`` are the whole folder

Class ids map to the 16 Cityscapes classes of the SYNTHIA protocol (the table every
AdaptSegNet/ADVENT/FDA/DACS SYNTHIA loader uses), in Cityscapes train id order:
road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, sky,
person, rider, car, bus, motorcycle, bicycle; every other id (void, parking, road work,
terrain, truck, train, lane marking) is ignored (255). ``num_classes=13`` drops wall, fence and
pole as well (the 13-class protocol). ``num_classes=19`` is FDA's: a 19-class network whose
table (YanchaoYang/FDA ``data/synthia_dataset.py``) also maps SYNTHIA terrain (16), truck (18)
and train (20) to their Cityscapes classes, scored on all 19 with mIoU over the 16 and 13
reported from the same confusion matrix (``eval.protocol: fda``). Pillow keeps only the high
byte of 16-bit RGB PNGs, so labels are decoded with pypng.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import png

from .base import DatasetError
from .cityscapes import PALETTE
from .cityscapes_labels import CLASSES, SYNTHIA13_TRAIN_IDS, SYNTHIA16_TRAIN_IDS
from .gta5 import GTA5Dataset

# SYNTHIA class id -> Cityscapes 19-class train id (0..18); others ignored
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11,
                    17: 12, 8: 13, 19: 15, 12: 17, 11: 18}
# FDA's 19-class table (data/synthia_dataset.py id_to_trainid): the 16 above, and terrain,
# truck, train
SYNTHIA_TO_TRAIN_19 = {**SYNTHIA_TO_TRAIN, 16: 9, 18: 14, 20: 16}


def _lut(kept: tuple[int, ...]) -> np.ndarray:
    lut = np.full(65536, 255, dtype=np.uint8)
    table = SYNTHIA_TO_TRAIN_19 if len(kept) == 19 else SYNTHIA_TO_TRAIN
    for synthia_id, train_id in table.items():
        if train_id in kept:
            lut[synthia_id] = kept.index(train_id)
    return lut


def read_png16(path) -> np.ndarray:
    """A PNG of any bit depth as ``(H, W, planes)`` uint16/uint8, decoded with pypng."""
    try:
        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        data = np.vstack([np.asarray(row) for row in rows])
    except (png.Error, OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable SYNTHIA label ({e})") from None
    return data.reshape(height, width, info["planes"])


class SynthiaDataset(GTA5Dataset):
    """SYNTHIA-RAND-CITYSCAPES ``split`` as ``(image, class ids of the 16- or 13-class
    protocol)``; see the module docstring."""

    image_folder, label_folder, what = "RGB", "GT/LABELS", "SYNTHIA"
    labels_match_images = True

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0,
                 num_classes: int = 16):
        kept = {16: SYNTHIA16_TRAIN_IDS, 13: SYNTHIA13_TRAIN_IDS,
                19: tuple(range(19))}.get(num_classes)
        if kept is None:
            raise ValueError(f"SYNTHIA num_classes must be 16, 13 or 19 (FDA's), got "
                             f"{num_classes!r}")
        self.classes = tuple(CLASSES[t] for t in kept)
        self.palette = PALETTE[list(kept)]
        self.lut = _lut(kept)
        super().__init__(root, split, transform, seed)

    def read_label(self, path: Path) -> np.ndarray:
        return self.lut[read_png16(path)[..., 0]]
