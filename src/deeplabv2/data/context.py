"""PASCAL-Context (Mottaghi et al., CVPR 2014): the 59 most frequent classes plus background.

Layout: the common PNG export of the official ``trainval_merged.json`` (e.g. by the Detail
API), inside the VOC 2010 folder (``root`` is the folder holding ``VOCdevkit``, or
``VOCdevkit/VOC2010`` itself)::

    JPEGImages/{name}.jpg
    SegmentationClassContext/{name}.png            values 0..59, 0 = background / other
    ImageSets/SegmentationContext/{train,val}.txt  one name a line (4,998 / 5,105)

Two protocols (``num_classes``):

* **60** (default; DeepLab v2's, paper Sec. 4.2 and Table 6: "the most frequent 59 classes
  along with one background category"): PNG value 0 is the class ``background``, trained and
  counted in the mIoU; values 1..59 are train ids 1..59, i.e. the PNG values themselves.
* **59** (most later work): value 0 is *ignored* (train id 255) and values 1..59 become train
  ids 0..58, so ``classes[0]`` is ``aeroplane``.

Values above 59 fall outside the classes and are reported by :meth:`check`. Colours are the
VOC palette entries of the PNG values, so coloured predictions look like the exported labels.
"""

from __future__ import annotations

import numpy as np

from .base import SegmentationDataset, pair_listed, read_label_png, require_dir
from .voc import list_names, resolve_voc_root, voc_palette

CLASSES = ("aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
           "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
           "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower",
           "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
           "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep",
           "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train",
           "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")

# PNG value -> train id. 60 classes: the identity. 59 classes: 0 -> 255 (ignored), v -> v - 1
# otherwise (255 stays 255).
_LUTS = {60: np.arange(256, dtype=np.uint8),
         59: np.array([255] + list(range(254)) + [255], dtype=np.uint8)}


class PascalContextDataset(SegmentationDataset):
    """PASCAL-Context ``split`` (``train``, ``val``) as ``(image, train ids)``: 0..59 with
    ``num_classes=60`` (background is class 0, the paper's protocol), 0..58 with 59."""

    classes = ("background",) + CLASSES
    palette = voc_palette(len(CLASSES) + 1)

    def __init__(self, root, split: str = "train", transform=None, seed: int = 0,
                 num_classes: int = 60):
        if num_classes not in _LUTS:
            raise ValueError(f"PASCAL-Context num_classes must be 60 (59 + background, the "
                             f"paper's) or 59 (background ignored), got {num_classes!r}")
        self.lut = _LUTS[num_classes]
        if num_classes == 59:
            self.classes, self.palette = CLASSES, voc_palette(len(CLASSES) + 1)[1:]
        base = resolve_voc_root(root, "2010")
        super().__init__(base, split, transform, seed)
        list_path = (require_dir(base / "ImageSets" / "SegmentationContext", "split list")
                     / f"{split}.txt")
        labels = require_dir(base / "SegmentationClassContext", "label")
        self.samples = pair_listed(list_names(list_path), base / "JPEGImages", ".jpg", labels,
                                   ".png", list_path)

    def read_label(self, path) -> np.ndarray:
        return self.lut[read_label_png(path)]
